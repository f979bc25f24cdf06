"""Float16 squares and the statistics interval (SPEC §1, §2): the rules of hvd_lb.squares16, and
parity with the float64 reference given the same rounded squares, on torch Horovod (1 and 2
processes), DDP (2) and TF Horovod (1 and 2)."""
import importlib.util
import math
import subprocess
import sys

import numpy as np
import pytest

from hvd_lb import reference, rules, squares16
from tests.hvdrun import ROOT, horovod_env, read_rank_json, run_horovod, run_torchrun

WORKER = ROOT / "tests" / "scripts" / "squares16_worker.py"
_spec = importlib.util.spec_from_file_location("squares16_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


# --- the rules ---------------------------------------------------------------------------------

def test_float16_floor_is_the_reference_floor_and_grows_with_sqrt_w():
    for w in (1, 2, 3, 4, 5, 16, 17, 768, 1024):
        assert squares16.variance_floor(w) == reference.float16_floor(w)
    assert squares16.variance_floor(2) == 2.0 ** -7 and squares16.variance_floor(768) == 2.0 ** -3


@pytest.mark.parametrize("W", [1, 2, 768])
def test_exponent_puts_the_wire_peak_below_float16_max(W):
    for m in (1e-30, 3e-9, 1.0, 9e4, 1e30):
        e = squares16.next_exponent(m, W)
        peak = W * m * 2.0 ** e
        assert 2.0 ** 12 < peak <= 2.0 ** 13, (m, e, peak)
    assert squares16.next_exponent(0.0, W) == 0 and squares16.next_exponent(0.0, W, previous=5) == 5
    assert squares16.next_exponent(math.inf, W, previous=3) == 3


def test_tf_exponents_equal_the_core_rule_at_the_edges():
    """The in-graph twin (float64 bit shifts) and the core rule (frexp): the same e, down to a
    peak whose ratio overflows float64 (subnormal peaks left out: TF flushes them to zero)."""
    tf = pytest.importorskip("tensorflow")
    from hvd_lb.tf import _squares16
    peaks = [1e-306, 1e-300, 3e-9, 1.0, 9e4, 1e30]
    for W, f in ((1, 1.0), (2, 1.0), (768, 3.0)):
        got = _squares16._next_exponents(tf.constant(peaks, tf.float64), tf.zeros(len(peaks), tf.float32),
                                         tf.constant(True), W, f).numpy().tolist()
        assert got == [squares16.next_exponent(m, W, f) for m in peaks], (W, f, got)


def test_redo_rule():
    assert squares16.needs_redo(math.inf, True) and squares16.needs_redo(math.nan, False)
    assert squares16.needs_redo(2.0 ** -15, False) and not squares16.needs_redo(2.0 ** -14, False)
    assert squares16.needs_redo(0.0, True) and not squares16.needs_redo(0.0, False)


def test_bytes():
    assert squares16.bytes_ratio("float16") == 1.5 and squares16.bytes_ratio(None) == 2.0
    assert squares16.bytes_ratio(None, 4) == 1.25 and squares16.bytes_ratio("float16", 4) == 1.125
    rows = squares16.bytes_table([2, 768], [("bfloat16", 1), ("float16", 1)])
    assert rows == [["2", "1.500", "1.500"], ["768", "2.000", "1.500"]]


def test_arguments_are_checked():
    assert rules.check_square_dtype("float16") == "float16"
    for bad in (0, 1.5, True, "2", 2 ** 31):
        with pytest.raises(ValueError, match=r"invalid gsnr_interval=.*must be an integer in \[1, 2147483647\]"):
            squares16.check_interval(bad)
    assert squares16.check_interval(2 ** 31 - 1) == 2 ** 31 - 1


# --- parity: the reference fed the same rounded squares --------------------------------------

def reference_run(case, W, steps, divisor):
    """The float64 reference of ``case`` with s as the run had it: the reduced float16 squares
    (``steps``: per step, per tensor [values, e] or None) where they were not redone, float64 s
    from the samples where they were (or at a float32 step), reused between statistics steps."""
    name, dtype, n, M = case
    flags = [len(s) > 1 for s in worker.SHAPES]  # create(): no decay or trust ratio for ndim ≤ 1
    ref = reference.ReferenceOptimizer(name, worker.init_params(), adapt=flags, decay=flags, **worker.hp_for(name))
    floor = reference.float16_floor(W) if dtype == "float16" else reference.VARIANCE_FLOOR
    kept, redone = None, set()
    for t in range(1, worker.STEPS + 1):
        samples = reference.micro_batch_samples(
            [[worker.micro_grads(t, w, m, M) for m in range(M)] for w in range(W)])
        mean, sq = reference.gradient_stats(samples)
        if (t - 1) % n == 0:
            rec = steps[t - 1] or [None] * len(sq)
            for i, r in enumerate(rec):
                if r is None:
                    continue
                half = np.asarray(r[0]).reshape(np.shape(sq[i]))
                if squares16.needs_redo(float(np.max(half)), bool(np.any(mean[i]))):
                    redone.add((t, i))
                else:
                    sq[i] = reference.float16_squares(half, r[1], divisor, mean[i], W)
            kept = sq
        ref.step(mean, kept, floor=floor)
    return ref.params, redone


def check(ranks, tol, divisor_is_w):
    W = ranks[0]["W"]
    for case in worker.cases(W):
        k = worker.key(case)
        runs = [r["cases"][k] for r in ranks]
        assert all(r == runs[0] for r in runs[1:]), f"{k}: ranks differ"
        params, redone = reference_run(case, W, runs[0]["steps"], W if divisor_is_w else 1)
        for i, (a, e) in enumerate(zip(runs[0]["params"], params)):
            e = np.asarray(e, np.float64).reshape(-1)
            scale = max(float(np.max(np.abs(e))), 1e-300)
            np.testing.assert_allclose(a, e, rtol=tol, atol=tol * scale, err_msg=f"{k} [{i}]")
        if case[1] == "float16":
            # step 1 float32, then float16; the jump redoes both tensors (overflow, underflow)
            assert not any(runs[0]["steps"][0] or [])
            assert all(runs[0]["steps"][worker.JUMP_STEP - 1])
            assert {(worker.JUMP_STEP, 0), (worker.JUMP_STEP, 1)} <= redone, (k, redone)


def _exponents_follow_the_rule(ranks, divisor_is_w):
    """e of step t+1 = next_exponent(peak of step t's reduced s), where t was not redone."""
    W = ranks[0]["W"]
    steps = ranks[0]["cases"][worker.key(("vr-sgd", "float16", 1, 1 if W > 1 else 2))]["steps"]
    for now, nxt in zip(steps[1:-1], steps[2:]):
        for (h, e), (_, e2) in zip(now, nxt):
            m = max(h)
            if not squares16.needs_redo(m, True):
                assert e2 == squares16.next_exponent(m * 2.0 ** -e / (W if divisor_is_w else 1), W, 1.0, e)


@pytest.mark.multiprocess
@pytest.mark.parametrize("engine, np_", [("torch", 2), ("torch", 1), ("ddp", 2), ("tf", 2), ("tf", 1)])
def test_parity_with_the_reference_given_the_same_rounded_squares(tmp_path, engine, np_):
    """One launch per engine and process count (np 1: size-1 Horovod, k = 2 micro-batches, the
    reduction an identity); every rule × option inside the worker. DDP sums (s = Σ/W)."""
    if np_ == 1:
        proc = subprocess.run([sys.executable, str(WORKER), engine, str(tmp_path)], env=horovod_env(),
                              capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-4000:]
    elif engine == "ddp":
        run_torchrun([WORKER, engine, tmp_path], np=np_, timeout=300)
    else:
        run_horovod([WORKER, engine, tmp_path], np=np_, timeout=400)
    ranks = read_rank_json(tmp_path, np_)
    check(ranks, 1e-10, engine == "ddp")
    if engine != "tf":
        _exponents_follow_the_rule(ranks, engine == "ddp")
    if engine == "ddp":
        ex = ranks[0]["extras"]
        np.testing.assert_allclose(np.concatenate(ex["unscaled"]), np.concatenate(ex["plain"]),
                                   rtol=1e-12, atol=1e-12, err_msg="unscaled before the step")
        assert all("gsnr_interval (rank 0: 1; rank 1: 2)" in r["extras"]["disagree"] for r in ranks), ex["disagree"]
    if engine == "torch":
        ex = [r["extras"] for r in ranks]
        assert all(e == ex[0] for e in ex[1:]), "ranks differ"
        assert ex[0]["kept_unchanged"] and ex[0]["skipped"] == 1, ex[0]
        assert ex[0]["stale"] == 0, ex[0]
        assert ex[0]["reset"] == [0, 0, 0], ex[0]
    if engine == "tf":
        ex = ranks[0]["extras"]
        assert ex["skipped"] == 1, ex["skipped"]  # the kept s outlives a non-finite statistics step
        assert all(ex["kept_after_bad_first"]), ex["kept_after_bad_first"]
        np.testing.assert_allclose(np.concatenate(ex["loss_scaled"]), np.concatenate(ex["plain"]),
                                   rtol=1e-12, atol=1e-12, err_msg="LossScaleOptimizer")
        traced = [k for k in ranks[0]["cases"] if k.endswith("/traced")]
        assert traced
        for k in traced:
            np.testing.assert_allclose(np.concatenate(ranks[0]["cases"][k]),
                                       np.concatenate(ranks[0]["cases"][k[:-len("/traced")]]["params"]),
                                       rtol=1e-12, atol=1e-12, err_msg=k)
