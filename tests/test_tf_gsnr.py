"""hvd_lb.tf.GSNR in front of Keras optimizers against the float64 reference (SPEC §2, §7).

ĝ depends only on ḡ, s and t, never on the weights, so ``GSNR(opt_a)`` fed (ḡ, s)
must equal an identical plain ``opt_b`` fed the reference's ĝ.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from hvd_lb import rules  # noqa: E402
from hvd_lb.reference import StepContext, gradient_stats, scale_by_gsnr  # noqa: E402
from tests.scripts.tf_common import (BATCH, EPOCHS, GSNR_HP, IN_DIM, OUT_DIM, TEST_HP,  # noqa: E402
                                     init_dense, init_params, keras_optimizer, replay_gsnr,
                                     sample_grads, shard)

import hvd_lb.tf as H  # noqa: E402

STEPS, K = 20, 3
TOL = {"float64": 1e-10, "float32": 1e-5}


@pytest.fixture
def floatx(request):
    """Keras floatx for the test (the lr variables of Keras' own optimizers use it)."""
    old = keras.config.floatx()
    keras.config.set_floatx(getattr(request, "param", "float64"))
    yield keras.config.floatx()
    keras.config.set_floatx(old)


def make_vars(dtype):
    return [keras.Variable(v.astype(dtype), name=n) for n, v in init_params().items()]


def close(actual, expected, tol, what):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=what)


def statistics(dtype, steps=STEPS):
    """(ḡ, s) per step from K seeded samples, rounded to ``dtype`` first as the backends see them."""
    shapes = [v.shape for v in init_params().values()]
    for t in range(steps):
        samples = [[x.astype(dtype).astype(np.float64) for x in sample_grads(t, i, shapes)] for i in range(K)]
        yield gradient_stats(samples)


def step(opt, variables, mean, sq, dtype):
    opt.set_grad_sq([tf.constant(s, dtype) for s in sq])
    opt.apply([tf.constant(g, dtype) for g in mean], variables)


@pytest.mark.parametrize("floatx", ["float64", "float32"], indirect=True)
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_gsnr_equals_plain_optimizer_on_reference_g_hat(kind, floatx):
    dtype = floatx
    va, vb = make_vars(dtype), make_vars(dtype)
    opt_a = H.GSNR(keras_optimizer(kind), **GSNR_HP)
    opt_b = keras_optimizer(kind)
    transform = scale_by_gsnr(GSNR_HP["gamma"], GSNR_HP["momentum"])
    state = transform.init([v.numpy() for v in va])
    for t, (mean, sq) in enumerate(statistics(dtype)):
        step(opt_a, va, mean, sq, dtype)
        g_hat, state = transform.update(mean, state, None, StepContext(0.0, t + 1, [], [], sq))
        opt_b.apply([tf.constant(g, dtype) for g in g_hat], vb)
    for a, b in zip(va, vb):
        close(a.numpy(), b.numpy(), TOL[dtype], f"{kind} {a.path}")
    for var, p, v in zip(opt_a.slots()[rules.GSNR_SLOT], state[rules.GSNR_SLOT], va):
        close(var.numpy(), p, TOL[dtype], f"gsnr_avg of {v.path}")
    assert int(opt_a.iterations.numpy()) == int(opt_a.inner_optimizer.iterations.numpy()) == STEPS


@pytest.mark.parametrize("base", rules.BASE_NAMES)
def test_vr_rule_is_gsnr_of_its_base(base):
    """Every vr-X is GSNR(X) with the defaults of SPEC §2 (float64)."""
    hp = TEST_HP["vr-" + base]
    vr_vars, wrapped_vars = make_vars("float64"), make_vars("float64")
    vr = H.create("vr-" + base, **hp)
    gsnr_momentum = hp.get("gsnr_momentum", rules.get_rule("vr-" + base).defaults["gsnr_momentum"])
    wrapped = H.GSNR(H.create(base, **TEST_HP[base]), gamma=hp["gamma"], momentum=gsnr_momentum)
    assert isinstance(vr, H.GSNR) and type(vr.inner_optimizer) is H.OPTIMIZERS[base]
    for mean, sq in statistics("float64", steps=8):
        step(vr, vr_vars, mean, sq, "float64")
        step(wrapped, wrapped_vars, mean, sq, "float64")
    for a, b in zip(vr_vars, wrapped_vars):
        close(a.numpy(), b.numpy(), TOL["float64"], f"vr-{base} {a.path}")
    slots = vr.slots()
    assert set(slots) == set(vr.rule.slots) == set(wrapped.slots())
    for name, variables in slots.items():
        for a, b in zip(variables, wrapped.slots()[name]):
            close(a.numpy(), b.numpy(), TOL["float64"], f"vr-{base} slot {name}")


@pytest.mark.parametrize("kind", ["sgd", "adamw", "lamb"])
def test_gamma_one_is_the_inner_optimizer(kind, floatx):
    """γ = 1, β₃ = 0: r = 1 and ĝ = ḡ exactly (SPEC §2)."""
    def make():
        return H.create("lamb", **TEST_HP["lamb"]) if kind == "lamb" else keras_optimizer(kind)

    va, vb = make_vars("float32"), make_vars("float32")
    opt_a, opt_b = H.GSNR(make(), gamma=1.0), make()
    for mean, sq in statistics("float32", steps=6):
        step(opt_a, va, mean, sq, "float32")
        opt_b.apply([tf.constant(g, tf.float32) for g in mean], vb)
    for a, b in zip(va, vb):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_exclude_passes_the_mean_gradient_through(floatx):
    va, vb = make_vars("float64"), make_vars("float64")
    opt_a = H.GSNR(keras_optimizer("sgd"), exclude=["*bias*"], **GSNR_HP)
    opt_b = keras_optimizer("sgd")
    flags = [True, False, True]
    transform = scale_by_gsnr(GSNR_HP["gamma"], GSNR_HP["momentum"], apply=flags)
    state = transform.init([v.numpy() for v in va])
    for t, (mean, sq) in enumerate(statistics("float64", steps=6)):
        step(opt_a, va, mean, sq, "float64")
        g_hat, state = transform.update(mean, state, None, StepContext(0.0, t + 1, [], [], sq))
        opt_b.apply([tf.constant(g) for g in g_hat], vb)
    for a, b in zip(va, vb):
        close(a.numpy(), b.numpy(), TOL["float64"], a.path)
    np.testing.assert_array_equal(opt_a.slots()[rules.GSNR_SLOT][1].numpy(), 0.0)
    assert set(opt_a.gsnr_diagnostics()) == {"kernel", "zero"}


def test_tf_function_and_xla_match_eager(floatx):
    eager_vars, vars_ = make_vars("float32"), make_vars("float32")
    eager, opt = H.GSNR(keras_optimizer("adamw"), **GSNR_HP), H.GSNR(keras_optimizer("adamw"), **GSNR_HP)

    @tf.function(jit_compile=True)
    def compiled(grads, sq):
        opt.set_grad_sq(sq)
        opt.apply(grads, vars_)

    opt.build(vars_)
    for mean, sq in statistics("float32", steps=5):
        step(eager, eager_vars, mean, sq, "float32")
        compiled([tf.constant(g, tf.float32) for g in mean], [tf.constant(s, tf.float32) for s in sq])
    for a, b in zip(vars_, eager_vars):
        close(a.numpy(), b.numpy(), 1e-5, a.path)


def test_learning_rate_and_iterations():
    inner = keras.optimizers.SGD(learning_rate=0.1)
    opt = H.GSNR(inner)
    assert float(opt.learning_rate.numpy()) == pytest.approx(0.1)
    opt.learning_rate = 0.25
    assert float(inner.learning_rate.numpy()) == pytest.approx(0.25)
    var = keras.Variable(np.ones(3), name="w")
    for _ in range(2):
        opt.set_grad_sq([tf.constant([2.0, 1.0, 1.0], tf.float64)])
        opt.apply([tf.constant([1.0, 1.0, 0.5], tf.float64)], [var])
    assert int(opt.iterations.numpy()) == int(inner.iterations.numpy()) == 2
    assert set(opt.gsnr_diagnostics()) == {"w"}


@pytest.mark.parametrize("make", [
    lambda: H.GSNR(keras.optimizers.AdamW(learning_rate=0.5, weight_decay=0.1), gamma=0.3, momentum=0.5,
                   exclude=["*bias*"], clipnorm=1.0),
    lambda: H.GSNR(H.create("lars", learning_rate=0.125, exclude=["*zero*"])),
])
def test_config_round_trip(make):
    opt = make()
    cfg = opt.get_config()
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(again) is H.GSNR and again.get_config() == cfg
    assert type(again.inner_optimizer) is type(opt.inner_optimizer)
    assert again.inner_optimizer.get_config() == opt.inner_optimizer.get_config()
    assert H.GSNR.from_config(cfg).get_config() == cfg


@pytest.mark.parametrize("call, needle", [
    (lambda: H.GSNR("sgd"), "optimizer='sgd'"),
    (lambda: H.GSNR(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD())), "LossScaleOptimizer(GSNR"),
    (lambda: H.GSNR(keras.optimizers.SGD(), gamma=0.0), "gamma=0.0"),
    (lambda: H.GSNR(keras.optimizers.SGD(), momentum=1.0), "gsnr_momentum=1.0"),
    (lambda: H.GSNR(keras.optimizers.SGD(), exclude=[1]), "exclude"),
    (lambda: H.GSNR(keras.optimizers.SGD(), learning_rate=0.1), "learning_rate"),
    (lambda: H.GSNR(keras.optimizers.SGD(), gradient_accumulation_steps=2), "micro_batches"),
    (lambda: H.GSNR(keras.optimizers.SGD(loss_scale_factor=8.0)), "loss_scale_factor"),
])
def test_invalid_arguments(call, needle):
    with pytest.raises(ValueError) as e:
        call()
    assert needle in str(e.value)


def test_needs_squares():
    var = keras.Variable(np.ones(2), name="w")
    with pytest.raises(ValueError, match="DistributedOptimizer"):
        H.GSNR(keras.optimizers.SGD()).apply([tf.ones(2, tf.float64)], [var])


# -- model.fit behind DistributedOptimizer (one process, M = 2 micro-batches) ------------

def make_model():
    model = keras.Sequential([keras.Input((IN_DIM,), dtype="float64"),
                              keras.layers.Dense(OUT_DIM, name="dense", dtype="float64")], name="net")
    model.set_weights(init_dense(0))
    return model


@pytest.mark.parametrize("average", [False, True])
def test_fit_with_distributed_optimizer_equals_reference(floatx, average):
    pytest.importorskip("horovod.tensorflow")
    model = make_model()
    opt = H.DistributedOptimizer(H.GSNR(keras_optimizer("adamw"), **GSNR_HP), micro_batches=2,
                                 average_aggregated_gradients=average)
    model.compile(optimizer=opt, loss="mse")
    X, y = shard(0)
    hist = model.fit(X, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    assert hist.history["loss"][-1] < hist.history["loss"][0]
    for w, p in zip(model.get_weights(), replay_gsnr("adamw", 1, 2, average)):
        np.testing.assert_allclose(w, p, rtol=1e-10, atol=1e-10 * np.abs(p).max())
    assert int(opt.iterations.numpy()) == 6 and set(opt.gsnr_diagnostics()) == {"net/dense/kernel",
                                                                                   "net/dense/bias"}


def test_distributed_options_have_one_meaning():
    pytest.importorskip("horovod.tensorflow")
    opt = H.DistributedOptimizer(keras.optimizers.SGD(), backward_passes_per_step=3)
    assert opt.micro_batches == 3 and opt.get_config()["micro_batches"] == 3
    for value, name in [(None, None), ("float32", "float32"), ("float64", "float64"),
                        (tf.bfloat16, "bfloat16"), ("bfloat16", "bfloat16")]:
        assert H.DistributedOptimizer(keras.optimizers.SGD(), square_dtype=value).square_dtype == name


def test_tape_unscales_squares_under_loss_scale_optimizer(floatx):
    """LossScaleOptimizer(GSNR(opt)) with DistributedGradientTape: s of the unscaled loss."""
    pytest.importorskip("horovod.tensorflow")
    X, y = shard(0)
    results = []
    for scaled in (False, True):
        model = make_model()
        opt = H.GSNR(keras_optimizer("sgd"), **GSNR_HP)
        if scaled:
            opt = keras.optimizers.LossScaleOptimizer(opt)
            opt.build(model.trainable_variables)
        for i in range(3):
            xb, yb = X[4 * i:4 * i + 4], y[4 * i:4 * i + 4]
            with tf.GradientTape(persistent=True) as tape:
                losses = [opt.scale_loss(tf.reduce_mean(tf.square(model(xb[j:j + 2]) - yb[j:j + 2])))
                          if scaled else tf.reduce_mean(tf.square(model(xb[j:j + 2]) - yb[j:j + 2]))
                          for j in (0, 2)]
            tape = H.DistributedGradientTape(tape, optimizer=opt, micro_batches=2)
            opt.apply(tape.gradient(losses, model.trainable_variables), model.trainable_variables)
        results.append(model.get_weights())
    for a, b in zip(*results):  # power-of-2 scale: exact
        np.testing.assert_array_equal(a, b)
