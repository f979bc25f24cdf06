"""Keras integration in one process: model.fit (XLA), save/restore, wrapper config and errors."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import hvd_lb.tf as H  # noqa: E402
from tests.scripts.tf_common import (BATCH, EPOCHS, IN_DIM, OUT_DIM, TEST_HP, init_dense,  # noqa: E402
                                     replay, shard)


@pytest.fixture(autouse=True, scope="module")
def float64_keras():
    # Keras losses compute in floatx; float64 keeps model.fit comparable to the reference at 1e-10.
    old = keras.config.floatx()
    keras.config.set_floatx("float64")
    yield
    keras.config.set_floatx(old)


def horovod():
    return pytest.importorskip("horovod.tensorflow")


def make_model():
    model = keras.Sequential([keras.Input((IN_DIM,), dtype="float64"),
                              keras.layers.Dense(OUT_DIM, name="dense", dtype="float64")], name="net")
    model.set_weights(init_dense(0))
    return model


def fit(model, epochs=EPOCHS, **kw):
    X, y = shard(0)
    return model.fit(X, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, **kw)


def assert_weights(model, params, tol=1e-10):
    for w, p in zip(model.get_weights(), params):
        np.testing.assert_allclose(w, p, rtol=tol, atol=tol * np.abs(p).max())


def test_fit_with_xla_equals_reference():
    model = make_model()
    model.compile(optimizer=H.create("lamb", **TEST_HP["lamb"]), loss="mse", jit_compile=True)
    fit(model)
    ref, _ = replay("lamb", TEST_HP["lamb"], 1, 1)
    assert_weights(model, ref.params)


def test_fit_micro_batches_in_one_process_equals_reference():
    """One worker, M = 2: k = 2 samples per step, so a VR rule can run without horovodrun."""
    horovod()
    model = make_model()
    opt = H.DistributedOptimizer(H.create("vr-adam", **TEST_HP["vr-adam"]), micro_batches=2)
    model.compile(optimizer=opt, loss="mse")
    fit(model)
    ref, _ = replay("vr-adam", TEST_HP["vr-adam"], 1, 2)
    assert_weights(model, ref.params)
    assert int(opt.iterations.numpy()) == int(opt.inner_optimizer.iterations.numpy()) == 6


def test_vr_needs_two_samples():
    horovod()
    with pytest.raises(ValueError, match=r"micro_batches=2 or more"):
        H.DistributedOptimizer(H.create("vr-sgd"))
    with pytest.raises(ValueError, match=r"horovodrun -np 2"):
        H.DistributedGradientTape(tf.GradientTape(), optimizer=H.create("vr-lamb"))
    H.DistributedOptimizer(H.create("sgd"))  # non-VR rules need no variance


@pytest.mark.parametrize("kwargs, needle", [
    ({"micro_batches": 0}, "micro_batches=0"),
    ({"compression": "zip"}, "compression='zip'"),
    ({"square_dtype": "float8"}, "square_dtype='float8'"),
    ({"gsnr_interval": 0}, "gsnr_interval=0"),
    ({"micro_batches": 2, "backward_passes_per_step": 3}, "backward_passes_per_step=3"),
    ({"average_aggregated_gradients": 1}, "average_aggregated_gradients=1"),
    ({"square_dtype": "int8"}, "square_dtype='int8'"),
])
def test_distributed_optimizer_arguments(kwargs, needle):
    horovod()
    with pytest.raises(ValueError) as e:
        H.DistributedOptimizer(H.create("momentum"), **kwargs)
    assert needle in str(e.value)
    with pytest.raises(ValueError, match="optimizer="):
        H.DistributedOptimizer("sgd")


def test_tape_micro_batches_need_persistent_tape():
    horovod()
    v = keras.Variable(np.ones(2), name="w")
    with tf.GradientTape() as tape:
        losses = [tf.reduce_sum(v * 1.0), tf.reduce_sum(v * 2.0)]
    with pytest.raises(ValueError, match="persistent=True"):
        H.DistributedGradientTape(tape, micro_batches=2).gradient(losses, [v])


def test_distributed_optimizer_config_round_trip():
    horovod()
    opt = H.DistributedOptimizer(H.create("vr-lamb", learning_rate=0.25, gamma=0.5), micro_batches=3,
                                 compression="fp16")
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(again, H.DistributedOptimizer)
    assert again.get_config() == opt.get_config()
    assert again.inner_optimizer.get_config() == opt.inner_optimizer.get_config()


def test_wraps_plain_keras_optimizers():
    horovod()
    model = make_model()
    model.compile(optimizer=H.DistributedOptimizer(keras.optimizers.SGD(0.1)), loss="mse")
    fit(model)
    ref, _ = replay("sgd", {"learning_rate": 0.1, "weight_decay": 0.0}, 1, 1)
    assert_weights(model, ref.params)


@pytest.mark.parametrize("wrap", [False, True])
def test_save_load_continue_equals_uninterrupted(tmp_path, wrap):
    """model.save → keras.saving.load_model → fit again = one uninterrupted fit."""
    name = "vr-tvlars" if wrap else "tvlars"
    if wrap:
        horovod()

    def optimizer():
        opt = H.create(name, **TEST_HP[name])
        return H.DistributedOptimizer(opt, micro_batches=2) if wrap else opt

    straight = make_model()
    straight.compile(optimizer=optimizer(), loss="mse")
    fit(straight, epochs=2)

    first = make_model()
    first.compile(optimizer=optimizer(), loss="mse")
    fit(first, epochs=1)
    path = tmp_path / "model.keras"
    first.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.optimizer) is type(first.optimizer)
    for a, b in zip(loaded.optimizer.variables, first.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    fit(loaded, epochs=1)
    for a, b in zip(loaded.get_weights(), straight.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_tf_train_checkpoint_round_trip(tmp_path):
    name = "vr-lamb"
    rng = np.random.default_rng(3)
    grads = [[rng.normal(size=(IN_DIM, OUT_DIM)), rng.normal(size=OUT_DIM)] for _ in range(6)]

    def run(model, opt, steps):
        for g in steps:
            opt.set_grad_sq([tf.constant(x * x * 1.5) for x in g])
            opt.apply([tf.constant(x) for x in g], model.trainable_variables)

    model, opt = make_model(), H.create(name, **TEST_HP[name])
    run(model, opt, grads[:3])
    ckpt = tf.train.Checkpoint(model=model, optimizer=opt)
    path = ckpt.save(str(tmp_path / "ckpt"))
    run(model, opt, grads[3:])

    model2, opt2 = make_model(), H.create(name, **TEST_HP[name])
    opt2.build(model2.trainable_variables)
    tf.train.Checkpoint(model=model2, optimizer=opt2).restore(path).assert_consumed()
    assert int(opt2.iterations.numpy()) == 3
    run(model2, opt2, grads[3:])
    for a, b in zip(model2.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    for s in opt.rule.slots:
        for a, b in zip(opt2.slots()[s], opt.slots()[s]):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_callbacks_and_broadcast_validate_arguments():
    horovod()
    with pytest.raises(ValueError, match="root_rank=-1"):
        H.BroadcastGlobalVariablesCallback(-1)
    with pytest.raises(ValueError, match="warmup_epochs=0"):
        H.LearningRateWarmupCallback(0.1, warmup_epochs=0)
    with pytest.raises(ValueError, match="root_rank=5"):
        H.broadcast_variables([keras.Variable(1.0)], root_rank=5)
    H.broadcast_variables([keras.Variable(1.0)], root_rank=0)  # one process: nothing to do


def test_loss_scale_optimizer_inside_distributed_optimizer():
    """DistributedOptimizer(LossScaleOptimizer(vr rule)): s is unscaled too (power-of-2 scale: exact)."""
    horovod()
    model = make_model()
    lso = keras.optimizers.LossScaleOptimizer(H.create("vr-adam", **TEST_HP["vr-adam"]))
    model.compile(optimizer=H.DistributedOptimizer(lso, micro_batches=2), loss="mse",
                  auto_scale_loss=False)
    fit(model)
    assert float(lso.dynamic_scale.numpy()) == 2.0 ** 15
    ref, _ = replay("vr-adam", TEST_HP["vr-adam"], 1, 2)
    assert_weights(model, ref.params)
