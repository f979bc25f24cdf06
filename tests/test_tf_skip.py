"""skip_nonfinite on the Keras DistributedOptimizer: a non-finite averaged gradient skips the step."""
import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytest.importorskip("horovod.tensorflow")

import hvd_lb.tf as H  # noqa: E402


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("gsnr", [False, True], ids=["sgd", "gsnr-sgd"])
def test_nonfinite_step_is_skipped_state_untouched(graph, gsnr):
    import horovod.tensorflow as hvd

    hvd.init()
    inner = keras.optimizers.SGD(learning_rate=0.1, momentum=0.9)
    opt = H.DistributedOptimizer(H.GSNR(inner) if gsnr else inner, micro_batches=2, skip_nonfinite=True)
    w = keras.Variable(np.ones(3, np.float32), name="w")
    opt.build([w])  # as model.fit does, outside the traced step
    step = tf.function(lambda g: opt.apply(g, [w])) if graph else (lambda g: opt.apply(g, [w]))
    good = [tf.constant([1.0, 2.0, 3.0]), tf.constant([1.5, 2.5, 2.0])]
    bad = [tf.constant([1.0, np.inf, 3.0]), tf.constant([1.0, 2.0, 3.0])]
    for g in good:
        step([g])
    after_one = w.numpy().copy()
    state = [v.numpy().copy() for v in inner.variables]
    for g in bad:
        step([g])
    assert opt.skipped_steps == 1
    np.testing.assert_array_equal(w.numpy(), after_one)
    for v, before in zip(inner.variables, state):
        np.testing.assert_array_equal(v.numpy(), before)
    for g in good:
        step([g])
    assert opt.skipped_steps == 1 and not np.array_equal(w.numpy(), after_one)
    assert np.isfinite(w.numpy()).all()


def test_skip_nonfinite_must_be_bool():
    with pytest.raises(ValueError, match="invalid skip_nonfinite='yes'"):
        H.DistributedOptimizer(keras.optimizers.SGD(), skip_nonfinite="yes")


def test_float64_squares_keep_float32_gsnr_finite_beyond_float32_squares():
    """|x| = 1e30: float32 squares overflow; square_dtype="float64" keeps s and the GSNR maths finite."""
    import horovod.tensorflow as hvd

    hvd.init()
    opt = H.DistributedOptimizer(H.GSNR(keras.optimizers.SGD(learning_rate=1e-30)), micro_batches=2,
                                 square_dtype="float64")
    w = keras.Variable(np.zeros(4, np.float32), name="w")
    for g in ([1e30, -2e30, 3e30, 1e30], [1.5e30, -2e30, 2e30, 1e30]):
        opt.apply([tf.constant(g, tf.float32)], [w])
    assert np.isfinite(w.numpy()).all() and np.any(w.numpy() != 0)
