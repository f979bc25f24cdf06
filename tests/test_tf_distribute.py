"""hvd_lb.tf.distribute: TensorFlow's own engine, no Horovod (SPEC §1 with R replicas, k = R·M).

One process with MirroredStrategy over 2 logical CPU devices and one 2-worker
MultiWorkerMirroredStrategy job (``hvd-lb run --launcher tf``: TF_CONFIG on loopback ports)
each run every case of tests/scripts/tf_strategy_worker.py; replica r trains on the batches
the horovodrun workers use, so the float64 reference replays the same samples.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from hvd_lb import rules
from tests.hvdrun import ROOT, horovod_env, read_rank_json, run_command
from tests.scripts.tf_common import APPLIES, TEST_HP, replay, replay_gsnr

pytestmark = pytest.mark.multiprocess
WORKER = ROOT / "tests/scripts/tf_strategy_worker.py"
NAMES = list(rules.NAMES)
RESUME = [f"{k}:{how}:{M}" for k, M in (("vr-lamb", 2), ("gsnr-adamw", 1)) for how in ("keras", "ckpt")]
OTHERS = ["gsnr-adamw:fit:1", "gsnr-adamw:fit:2", "vr-momentum:loop:2", "sngm:loop:1", "gsnr-adamw:loop:1",
          "lamb:bare:1", "vr-adam:bare:1", "vr-lamb:loopnone:2", "vr-sgd:sparse:1"]
CASES = [f"{n}:fit:{M}" for n in NAMES for M in (1, 2)] + OTHERS + RESUME
# MultiWorkerMirroredStrategy on this 2-core machine: ~20 s per case under load (a fit's set-up
# and collectives between two processes), so the default run takes vr-lamb (M = 2), GSNR(AdamW)
# (M = 1), a custom loop and one resume; "mwms-full" (slow) runs every case (measured: all
# pass: 587 s as a script at load 10-14, 371 s under pytest at load 3-7).
MWMS_CASES = ["vr-lamb:fit:2", "gsnr-adamw:fit:1", "vr-momentum:loop:2", "vr-lamb:ckpt:2"]


def _env():
    env = horovod_env()
    env["TF_NUM_INTEROP_THREADS"] = "4"  # a MirroredStrategy replica thread waits in its collective
    return env


@pytest.fixture(scope="module", params=["mirrored", "mwms", pytest.param("mwms-full", marks=pytest.mark.slow)])
def ranks(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    if request.param == "mirrored":
        cmd = [sys.executable, str(WORKER), str(out), "mirrored", *CASES]
        n = 1
    else:
        cmd = [sys.executable, "-m", "hvd_lb.launch.tfrun", "-np", "2", "--", sys.executable, str(WORKER),
               str(out), "mwms", *(CASES if request.param == "mwms-full" else MWMS_CASES)]
        n = 2
    run_command(cmd, timeout=900, env=_env())
    res = read_rank_json(out, n)
    assert all(r["replicas"] == 2 for r in res)
    return res


def _want(kind, M):
    if kind == "gsnr-adamw":
        keras = pytest.importorskip("keras")
        old = keras.config.floatx()
        keras.config.set_floatx("float64")  # as in the worker
        try:
            return replay_gsnr("adamw", 2, M)
        finally:
            keras.config.set_floatx(old)
    return replay(kind, TEST_HP[kind], 2, M)[0].params


def max_diff(ranks, case, want):
    """Max |w − reference| over every replica's copy on every process; also asserts the copies
    are bit-identical."""
    if case not in ranks[0]:
        pytest.skip(f"{case} runs in the mirrored and mwms-full (slow) configurations")
    first = ranks[0][case]["weights"]
    worst = 0.0
    for res in ranks:
        for copies, p, ref_copies in zip(res[case]["weights"], want, first):
            for w in copies:
                assert w == ref_copies[0], f"{case}: the replicas' copies differ"
                worst = max(worst, float(np.abs(np.asarray(w) - p).max()))
    return worst


@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_fit_every_rule_equals_reference(ranks, name, M):
    """model.fit with hvd_lb.tf.distribute.DistributedOptimizer(rule, micro_batches=M)."""
    case = f"{name}:fit:{M}"
    assert max_diff(ranks, case, _want(name, M)) <= 1e-10
    assert ranks[0][case]["iterations"] == APPLIES // M  # real steps, not micro-batches


@pytest.mark.parametrize("M", [1, 2])
def test_fit_gsnr_adamw_equals_reference(ranks, M):
    """GSNR(keras AdamW) = AdamW fed the reference's ĝ (SPEC §7)."""
    assert max_diff(ranks, f"gsnr-adamw:fit:{M}", _want("gsnr-adamw", M)) <= 1e-10


@pytest.mark.parametrize("case", ["vr-momentum:loop:2", "sngm:loop:1", "gsnr-adamw:loop:1"])
def test_custom_strategy_run_loop_equals_reference(ranks, case):
    kind, _, M = case.split(":")
    assert max_diff(ranks, case, _want(kind, int(M))) <= 1e-10


@pytest.mark.parametrize("case", ["lamb:bare:1", "vr-adam:bare:1"])
def test_built_in_the_scope_without_wrapper(ranks, case):
    """A rule or a vr- rule built in the scope and given to compile as it is (M = 1)."""
    kind = case.split(":")[0]
    assert max_diff(ranks, case, _want(kind, 1)) <= 1e-10


def test_none_gradient_left_alone(ranks):
    """A variable outside the loss (None gradient on every replica) is not touched, as Keras does;
    the others step as without it."""
    case = "vr-lamb:loopnone:2"
    assert max_diff(ranks, case, _want("vr-lamb", 2)) <= 1e-10
    for res in ranks:
        assert res[case]["unused"] == [[[1.0, 1.0], [1.0, 1.0]]] * len(res[case]["unused"])


def test_sparse_gradient_reduced_dense(ranks):
    """An Embedding's tf.IndexedSlices gradient is reduced dense (GSNR warns once): every
    variable moves and the replicas' copies stay identical."""
    case = "vr-sgd:sparse:1"
    if case not in ranks[0]:
        pytest.skip("runs in the mirrored and mwms-full (slow) configurations")
    first = ranks[0][case]["weights"]
    for res in ranks:
        assert res[case]["moved"] == [True, True, True] and res[case]["warned"]
        for copies, ref in zip(res[case]["weights"], first):
            assert all(w == ref[0] for w in copies)


def test_one_collective_per_step(ranks):
    """One traced all-reduce per step, of one flat buffer ([g, x², (M, M²)] in float64)."""
    for res in ranks:
        for name in NAMES:
            for M in (1, 2):
                if f"{name}:fit:{M}" in res:
                    assert res[f"{name}:fit:{M}"]["calls"] == [1], (name, M)
        for case in ("vr-adam:bare:1", "gsnr-adamw:fit:2"):
            if case in res:
                assert res[case]["calls"] == [1], case


@pytest.mark.parametrize("kind, M", [("vr-lamb", 2), ("gsnr-adamw", 1)])
@pytest.mark.parametrize("how", ["keras", "ckpt"])
def test_resume_equals_uninterrupted(ranks, kind, M, how):
    """Half the steps, save (.keras / tf.train.Checkpoint), restore into a fresh model and
    optimizer in the scope, the other half: weights and optimizer state (p_t, step) as the
    uninterrupted run, bit for bit."""
    if f"{kind}:{how}:{M}" not in ranks[0]:
        pytest.skip("runs in the mirrored and mwms-full (slow) configurations")
    for res in ranks:
        full, got = res[f"{kind}:fit:{M}"], res[f"{kind}:{how}:{M}"]
        assert got["weights"] == full["weights"]
        assert got["state"] == full["state"]
        assert got["iterations"] == full["iterations"] == APPLIES // M


def test_k_below_two_refused_in_the_scope():
    """One replica, M = 1: the Horovod path's error, at construction."""
    code = ("import tensorflow as tf, hvd_lb.tf as H, hvd_lb.tf.distribute as D\n"
            "with tf.distribute.MirroredStrategy(['/cpu:0']).scope():\n"
            "    try:\n        D.DistributedOptimizer(H.create('vr-sgd'))\n"
            "    except ValueError as e:\n        print('REFUSED', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=_env(), cwd=ROOT)
    assert "REFUSED" in proc.stdout and "k = 1 × 1 = 1" in proc.stdout, proc.stderr[-3000:]


FAULT = ROOT / "tests/scripts/tf_strategy_fault.py"


@pytest.mark.parametrize("supervised", [pytest.param(False, marks=pytest.mark.slow), True])
def test_killed_worker_ends_the_job(tmp_path, supervised):
    """Worker 1 is SIGKILLed in the middle of a step (between micro-batches, while worker 0
    waits in the all-reduce). Alone, worker 0 ends with an error within its collective timeout
    (10 s) plus TF's detection; under ``hvd-lb run --launcher tf`` the launcher stops it at once."""
    from hvd_lb.launch import tfrun

    if supervised:
        cmd = [sys.executable, "-m", "hvd_lb.launch.tfrun", "-np", "2", "--grace", "5", "--",
               sys.executable, str(FAULT), str(tmp_path), "10"]
        proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs = [proc]
    else:
        procs = [subprocess.Popen([sys.executable, str(FAULT), str(tmp_path), "10"], env=e, cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for e in tfrun.worker_envs(2, _env())]
    try:
        procs[0].wait(timeout=400)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("the job did not end within 400 s of starting")
    ended = time.time()
    for p in procs[1:]:
        p.wait(timeout=60)
    killed = float((tmp_path / "killed").read_text())
    seconds = ended - killed
    print(f"supervised={supervised}: job ended {seconds:.1f} s after the kill")
    assert procs[0].returncode != 0
    assert seconds < (15 if supervised else 60)
    if not supervised:
        survivor = json.loads((tmp_path / "survivor").read_text())
        # Worker 1 died before micro-batch 14; micro-batch 15 ends the 4th step, whose all-reduce fails.
        assert survivor["step"] == 15
