"""hvd_lb.tf under real ``horovodrun -np 2`` (Gloo): model.fit and custom loops vs the reference.

One launch runs every case (tests/scripts/tf_dist_worker.py); each rank writes
its results and the tests replay the same per-sample gradients through the
float64 NumPy reference (tests/scripts/tf_common.replay).
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hvd_lb.reference import gsnr_ratio  # noqa: E402
from tests.hvdrun import ROOT, read_rank_json, run_horovod  # noqa: E402
from tests.scripts.tf_common import TEST_HP, replay, replay_gsnr  # noqa: E402

pytestmark = pytest.mark.multiprocess
NP = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("tf_dist")
    run_horovod([ROOT / "tests/scripts/tf_dist_worker.py", out], np=NP, controller="gloo", timeout=300)
    return read_rank_json(out, NP)


def check_case(ranks, key, name, M, lr_fn=None):
    ref, last = replay(name, TEST_HP[name], NP, M, lr_fn)
    for r, res in enumerate(ranks):
        got = res[key]["weights"]
        for w, p in zip(got, ref.params):
            np.testing.assert_allclose(w, p, rtol=1e-10, atol=1e-10 * np.abs(p).max(),
                                       err_msg=f"{key} rank {r}")
        # Every rank takes the same step from the same all-reduced statistics: bit-identical.
        assert got == ranks[0][key]["weights"], f"{key}: rank {r} differs from rank 0"
    return ref, last


@pytest.mark.parametrize("name, M", [("vr-lamb", 1), ("vr-lamb", 2), ("vr-sgd", 1)])
def test_model_fit_equals_reference(ranks, name, M):
    check_case(ranks, f"fit/{name}/{M}", name, M)
    assert ranks[0][f"fit/{name}/{M}"]["iterations"] == 12 // M  # real steps, not micro-batches


def test_fused_model_fit_equals_reference(ranks):
    """vr-lamb with fused=True (XLA per variable, rule and transform) under model.fit."""
    check_case(ranks, "fit-fused/vr-lamb/2", "vr-lamb", 2)


def test_model_fit_with_lr_warmup_callback(ranks):
    """LARS, 2 micro-batches, Horovod's LearningRateWarmupCallback from lr/size to lr over epoch 1.

    Set at every batch to (lr/size)·((batch + 1)/6·(size − 1) + 1); real step t runs at batch 2t + 1.
    """
    target = TEST_HP["lars"]["learning_rate"]
    check_case(ranks, "fit/lars/2", "lars", 2,
               lr_fn=lambda t: target / NP * (min(2 * t + 2, 6) / 6 * (NP - 1) + 1))


@pytest.mark.parametrize("key, name, M", [("fit-lso/vr-lamb/1", "vr-lamb", 1),
                                          ("tape/vr-momentum/1", "vr-momentum", 1),
                                          ("tape/vr-adam/2", "vr-adam", 2),
                                          ("tape/sngm/1", "sngm", 1),
                                          ("apply/vr-tvlars/2", "vr-tvlars", 2)])
def test_custom_loop_and_loss_scaling_equal_reference(ranks, key, name, M):
    check_case(ranks, key, name, M)


def test_metrics_are_averaged_across_ranks(ranks):
    losses = [res["fit/vr-lamb/1"]["loss"] for res in ranks]
    assert losses[0] == losses[1]


def test_gsnr_diagnostics_match_reference(ranks):
    _, (mean, sq) = replay("vr-lamb", TEST_HP["vr-lamb"], NP, 1)
    diag = ranks[0]["fit/vr-lamb/1"]["diag"]
    assert set(diag) == {"net/dense/kernel", "net/dense/bias"}
    for path, g, s in zip(("net/dense/kernel", "net/dense/bias"), mean, sq):
        _, mu, clipped = gsnr_ratio(g, s, TEST_HP["vr-lamb"]["gamma"])
        assert diag[path]["mean_gsnr"] == pytest.approx(mu, rel=1e-5)
        assert diag[path]["clipped_fraction"] == pytest.approx(clipped, abs=1e-6)
    assert ranks[0]["fit/lars/2"]["diag"] == {}


def test_one_allreduce_per_gradient(ranks):
    """Non-VR: one grouped call with each gradient once; VR: the same call also carries s;
    both carry (M, M²), the check that every worker uses the same micro_batches, and the
    per-variable flags of which ranks have a None gradient (with a zero s for VR)."""
    for res in ranks:
        assert res["calls/momentum"] == [4]
        assert res["calls/vr-momentum"] == [7]


def test_fp16_compression_keeps_squares_float32(ranks):
    g = np.array([[1.0 + r, -0.5, 0.25 * (r + 1)] for r in range(NP)])
    for res in ranks:
        c = res["compressed"]
        assert c["mean_dtype"] == "float32" and c["sq_dtype"] == "float32"
        np.testing.assert_allclose(c["mean"], g.mean(0), rtol=1e-3)
        np.testing.assert_allclose(c["sq"], (g * g).mean(0), rtol=1e-6)
        assert res["compressed_calls"] == [1, 1]  # one group per dtype, one graph


@pytest.mark.parametrize("key, kind, M", [("fit/gsnr-adamw/2", "adamw", 2), ("tape/gsnr-sgd/1", "sgd", 1)])
def test_gsnr_over_keras_optimizers_equals_reference(ranks, key, kind, M):
    """GSNR(keras AdamW/SGD) = the plain optimizer fed the reference's ĝ (SPEC §7)."""
    keras = pytest.importorskip("keras")
    old = keras.config.floatx()
    keras.config.set_floatx("float64")  # as in the worker: Keras' lr variables are floatx
    try:
        want = replay_gsnr(kind, NP, M)
    finally:
        keras.config.set_floatx(old)
    for r, res in enumerate(ranks):
        for w, p in zip(res[key]["weights"], want):
            np.testing.assert_allclose(w, p, rtol=1e-10, atol=1e-10 * np.abs(p).max(),
                                       err_msg=f"{key} rank {r}")
        assert res[key]["weights"] == ranks[0][key]["weights"]
    assert ranks[0]["fit/gsnr-adamw/2"]["iterations"] == 6


def test_bfloat16_squares_go_as_one_allgather(ranks):
    """square_dtype="bfloat16" at 2 workers: ḡ all-reduced, s all-gathered as bf16 (SPEC §7)."""
    tf = pytest.importorskip("tensorflow")
    g = np.array([[[0.5 + r, -1.0], [0.25, 2.0 * r]] for r in range(NP)])
    s = tf.constant([[[1.0 + r / 3, 0.1 * (r + 1)], [3.14159, 7.0]] for r in range(NP)], tf.float32)
    want = tf.reduce_mean(tf.cast(tf.cast(s, tf.bfloat16), tf.float32), 0).numpy()
    for res in ranks:
        c = res["bf16"]
        np.testing.assert_allclose(c["mean"], g.mean(0), rtol=1e-7)
        np.testing.assert_array_equal(np.float32(c["sq"]), want)
        assert c["sq_dtype"] == "float32" and c["calls"] == [1] and c["gathers"] == ["int16"]
