"""``import hvd_lb.tf.keras as hvd`` / ``import hvd_lb.tf as hvd`` in scripts written the way
Horovod's examples teach (tests/scripts/keras_horovod_style.py, tf_horovod_style.py)."""
import inspect
import json

import numpy as np
import pytest

from tests.hvdrun import ROOT, run_horovod

SCRIPTS = ROOT / "tests" / "scripts"


def _params(f):
    return [p for p in inspect.signature(f).parameters if p not in ("self", "kwargs")]


def test_modules_give_what_horovod_gives_with_horovods_signatures():
    hk = pytest.importorskip("horovod.tensorflow.keras")
    import horovod.tensorflow as htf

    import hvd_lb.tf as lb_tf
    import hvd_lb.tf.keras as lb_keras

    assert not [n for n in dir(htf) if not n.startswith("_") and not hasattr(lb_tf, n)]
    internals = {"K", "inspect", "is_version_greater_equal_than"}
    assert not [n for n in dir(hk) if not n.startswith("_") and n not in internals and not hasattr(lb_keras, n)]
    for name in ("init", "rank", "allreduce", "Compression", "Sum", "ProcessSet"):
        assert getattr(lb_keras, name) is getattr(hk, name)
    # elastic: Keras 3 states and callbacks of our own, Horovod's names and parameters.
    for ours, theirs in ((lb_keras.elastic, hk.elastic), (lb_tf.elastic, htf.elastic)):
        assert ours is not theirs and not [n for n in theirs.__all__ if not hasattr(ours, n)]
        for name in theirs.__all__:
            if isinstance(getattr(theirs, name), type):
                assert _params(getattr(ours, name))[:len(_params(getattr(theirs, name)))] == \
                    _params(getattr(theirs, name)), name
    # Horovod's parameters, in Horovod's order, then hvd_lb's (keyword-only).
    assert _params(lb_keras.DistributedOptimizer)[:13] == _params(hk.DistributedOptimizer)[:13]
    assert _params(lb_tf.DistributedGradientTape)[:10] == _params(htf.DistributedGradientTape)[:10]
    for cb in ("BroadcastGlobalVariablesCallback", "MetricAverageCallback", "LearningRateWarmupCallback",
               "LearningRateScheduleCallback", "BestModelCheckpoint"):
        assert _params(getattr(lb_keras.callbacks, cb))[:len(_params(getattr(hk.callbacks, cb)))] == \
            _params(getattr(hk.callbacks, cb)), cb
    assert lb_keras.callbacks.LearningRateWarmupCallback is lb_tf.LearningRateWarmupCallback


@pytest.mark.parametrize("kwargs, needle", [
    ({"op": 2}, "op=hvd.Adasum"),
    ({"op": 1, "gsnr": True}, "op=hvd.Sum"),
    ({"gsnr": True, "groups": 2}, "groups=2"),
    ({"device_sparse": "/gpu:0"}, "device_sparse='/gpu:0'"),
    ({"gradient_predivide_factor": 0.0}, "gradient_predivide_factor=0.0"),
    ({"learning_rate": 0.1}, "learning_rate"),
    ({"gsnr": True}, "k = workers × micro_batches ≥ 2"),
])
def test_bad_horovod_arguments_name_the_argument(kwargs, needle):
    pytest.importorskip("horovod.tensorflow")
    import keras

    import hvd_lb.tf.keras as hvd

    hvd.init()
    opt = keras.optimizers.SGD(0.1)
    if kwargs.pop("gsnr", False):
        opt = hvd.GSNR(opt)
    with pytest.raises(ValueError) as e:
        hvd.DistributedOptimizer(opt, **kwargs)
    assert needle in str(e.value)


def test_compile_accepts_experimental_run_tf_function():
    pytest.importorskip("horovod.tensorflow")
    import keras

    import hvd_lb.tf.keras as hvd

    model = keras.Sequential([keras.layers.Dense(1)])
    model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.1)), loss="mse",
                  experimental_run_tf_function=False)


@pytest.fixture(scope="module")
def keras_fit(tmp_path_factory):
    out = tmp_path_factory.mktemp("keras_fit")
    run_horovod([SCRIPTS / "keras_horovod_style.py", out], np=2, timeout=300)
    return [json.loads((out / f"keras_rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def tape(tmp_path_factory):
    out = tmp_path_factory.mktemp("tape")
    run_horovod([SCRIPTS / "tf_horovod_style.py", out], np=2, timeout=300)
    return [json.loads((out / f"tape_rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.multiprocess
@pytest.mark.parametrize("variant", ["plain", "gsnr"])
def test_keras_fit_script_with_every_callback(keras_fit, variant):
    """Unbuilt model (no Input layer), broadcast after the first batch: ranks end identical."""
    r0, r1 = keras_fit[0][variant], keras_fit[1][variant]
    assert r0["weights"] == r1["weights"]
    assert r0["optimizer"] == ("GSNR" if variant == "gsnr" else "SGD")
    hist = r0["history"]
    assert hist["loss"] == r1["history"]["loss"]  # MetricAverageCallback
    assert hist["lr"] == pytest.approx([0.02, 0.01])  # warm-up to 0.01·size, then × 0.5 from epoch 1
    assert r0["iterations"] == 2 * 32 // 2  # real steps: 32 batches per epoch, 2 per step
    assert r0["best_saved"]
    assert hist["val_accuracy"][-1] > 0.5  # 10 classes: chance is 0.1


@pytest.mark.multiprocess
@pytest.mark.parametrize("variant", ["plain", "gsnr"])
def test_gradient_tape_script(tape, variant):
    r0, r1 = tape[0][variant], tape[1][variant]
    assert r0["weights"] == r1["weights"]
    assert np.mean(r0["losses"][-5:]) < np.mean(r0["losses"][:5])
    assert r0["accuracy"] > 0.5
    if variant == "gsnr":
        assert r0["optimizer"] == "GSNR" and r0["diag"]
