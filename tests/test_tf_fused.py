"""``fused=True`` on TF (XLA-compiled per-variable maths) equals the per-tensor path (issue 11).

Every base rule, its vr- twin and GSNR(keras AdamW), eagerly and inside a ``tf.function``,
to 1e-12 in float64 and 1e-6 in float32; no retracing after the first step; config
round trip; argument checks. GSNR's default ``fused=None`` (issue 20): XLA where the probe
says it works, else the per-tensor path, both equal to ``fused=False``, also on a model
with more than 20 distinct sizes (0-d, size-1 and empty variables included). The
variables are tiny so that XLA compiles stay cheap.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from hvd_lb import rules  # noqa: E402
from hvd_lb.reference import gradient_stats  # noqa: E402
from tests.scripts.tf_common import (BATCH, GSNR_HP, TEST_HP, init_dense, init_params,  # noqa: E402
                                     keras_optimizer, sample_grads, shard)

import hvd_lb.tf as H  # noqa: E402
from hvd_lb.tf import gsnr as tf_gsnr  # noqa: E402
from hvd_lb.tf import optimizers as tf_opt  # noqa: E402

# 5 steps: the fifth (t = 4 in sample_grads) is the all-zero gradient, r = 1 (SPEC §2).
STEPS, K = 5, 3
TOL = {"float64": 1e-12, "float32": 1e-6}


@pytest.fixture
def floatx():
    """float64 floatx: Keras' own optimizers keep their lr in it."""
    old = keras.config.floatx()
    keras.config.set_floatx("float64")
    yield
    keras.config.set_floatx(old)


def close(actual, expected, tol, what):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    # (initial: an empty variable; nan: its diagnostics row, the mean of no elements)
    scale = max(float(np.nanmax(np.abs(expected), initial=0.0)), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=what)


def per_tensor(name):
    """``name``'s arguments for the per-tensor path throughout (a vr- rule's GSNR maths too)."""
    return dict(TEST_HP[name], fused=False, **({"gsnr_fused": False} if rules.get_rule(name).gsnr else {}))


def params():
    """tf_common's three tensors and a third 2-d shape: a shared trace of unknown dimensions
    (reduce_retracing) serves the third shape of a rank."""
    return dict(init_params(), wide=np.random.default_rng(1).normal(size=(2, 5)))


def run(make, dtype, mode, steps=STEPS):
    """Step ``make()`` on the seeded (ḡ, s) of tf_common, eagerly or in one ``tf.function``."""
    variables = [keras.Variable(v.astype(dtype), name=n) for n, v in params().items()]
    opt = make()
    shapes = [tuple(v.shape) for v in variables]

    def step(grads, sq):
        if isinstance(opt, H.GSNR):
            opt.set_grad_sq(sq)
        opt.apply(grads, variables)

    if mode == "function":
        opt.build(variables)
        step = tf.function(step)
    for t in range(steps):
        mean, sq = gradient_stats([sample_grads(t, i, shapes) for i in range(K)])
        step([tf.constant(g, dtype) for g in mean], [tf.constant(s, dtype) for s in sq])
    return opt, variables


def assert_same(a, b, tol, what):
    """Parameters and every slot (gsnr_avg included) of two (optimizer, variables) runs."""
    (opt_a, va), (opt_b, vb) = a, b
    for x, y in zip(va, vb):
        close(x.numpy(), y.numpy(), tol, f"{what} {x.path}")
    slots_a = opt_a.slots() if hasattr(opt_a, "slots") else {}
    assert set(slots_a) == set(opt_b.slots() if hasattr(opt_b, "slots") else {})
    for name, vars_a in slots_a.items():
        for x, y, v in zip(vars_a, opt_b.slots()[name], va):
            close(x.numpy(), y.numpy(), tol, f"{what} slot {name} of {v.path}")
    for x, y in zip(opt_a.variables, opt_b.variables):  # Keras' own slots (AdamW)
        close(x.numpy(), y.numpy(), tol, f"{what} {x.path}")


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", rules.NAMES)
def test_fused_equals_per_tensor(name, dtype, mode):
    fused = run(lambda: H.create(name, fused=True, **TEST_HP[name]), dtype, mode)
    plain = run(lambda: H.create(name, **per_tensor(name)), dtype, mode)
    assert fused[0].fused and plain[0].fused is False
    if rules.get_rule(name).gsnr:
        assert fused[0].inner_optimizer.fused and rules.GSNR_SLOT in fused[0].slots()
    assert_same(fused, plain, TOL[dtype], name)


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gsnr_of_keras_adamw(dtype, mode, floatx):
    fused = run(lambda: H.GSNR(keras_optimizer("adamw"), fused=True, **GSNR_HP), dtype, mode)
    plain = run(lambda: H.GSNR(keras_optimizer("adamw"), fused=False, **GSNR_HP), dtype, mode)
    assert_same(fused, plain, TOL[dtype], "GSNR(AdamW)")


def test_inside_an_xla_function():
    """A user's ``tf.function(jit_compile=True)`` around the step: the fused calls nest."""
    def make():
        return H.create("vr-lamb", fused=True, **TEST_HP["vr-lamb"])

    variables = [keras.Variable(v.astype("float32"), name=n) for n, v in params().items()]
    opt = make()
    opt.build(variables)

    @tf.function(jit_compile=True)
    def step(grads, sq):
        opt.set_grad_sq(sq)
        opt.apply(grads, variables)

    shapes = [tuple(v.shape) for v in variables]
    for t in range(STEPS):
        mean, sq = gradient_stats([sample_grads(t, i, shapes) for i in range(K)])
        step([tf.constant(g, tf.float32) for g in mean], [tf.constant(s, tf.float32) for s in sq])
    assert_same((opt, variables), run(make, "float32", "eager"), TOL["float32"], "vr-lamb in XLA")


def traces(opt):
    """How often the XLA functions ``opt`` uses have been traced (process-wide caches)."""
    update = tf_opt.UPDATES[opt.inner_optimizer.rule.base][0]
    return (tf_gsnr._gsnr_xla().experimental_get_tracing_count(),
            tf_opt._update_xla(update).experimental_get_tracing_count())


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_no_retracing_after_the_first_step(mode):
    """t and lr reach the XLA functions as tensors: steps 2 and 3 reuse step 1's programs.

    The learning rate comes from a schedule, a new value every step.
    """
    variables = [keras.Variable(v, name=n) for n, v in params().items()]
    opt = H.create("vr-lamb", fused=True, learning_rate=H.WarmupDecay(0.1, 2, 10))
    opt.build(variables)
    shapes = [tuple(v.shape) for v in variables]

    def step(grads, sq):
        opt.set_grad_sq(sq)
        opt.apply(grads, variables)

    outer = tf.function(step) if mode == "function" else step
    counts = []
    for t in range(3):
        mean, sq = gradient_stats([sample_grads(t, i, shapes) for i in range(K)])
        outer([tf.constant(g) for g in mean], [tf.constant(s) for s in sq])
        counts.append(traces(opt))
    assert min(counts[0]) > 0 and counts[1] == counts[2] == counts[0], counts
    if mode == "function":
        assert outer.experimental_get_tracing_count() == 1


@pytest.mark.filterwarnings("ignore:hvd_lb. GSNR from k")
def test_fit_with_distributed_optimizer(floatx):
    """model.fit behind DistributedOptimizer (one process, M = 2) gives the same weights."""
    pytest.importorskip("horovod.tensorflow")
    X, y = shard(0)
    weights = []
    for fused in (True, False):
        model = keras.Sequential([keras.Input((X.shape[1],), dtype="float64"),
                                  keras.layers.Dense(y.shape[1], name="dense", dtype="float64")])
        model.set_weights(init_dense(0))
        opt = H.DistributedOptimizer(H.create("vr-lamb", fused=fused, gsnr_fused=fused, **TEST_HP["vr-lamb"]),
                                     micro_batches=2)
        # Horovod's all-reduce has no XLA kernel: the step itself is not jit-compiled.
        model.compile(optimizer=opt, loss="mse", jit_compile=False)
        model.fit(X, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        weights.append(model.get_weights())
    for a, b in zip(*weights):
        close(a, b, TOL["float64"], "model.fit")


@pytest.mark.parametrize("make", [
    lambda: H.create("lamb", fused=True, clipnorm=1.0),
    lambda: H.create("vr-lamb", fused=True),
    lambda: H.create("vr-sngm", fused=True, gsnr_fused=False),
    lambda: H.create("vr-lars", gsnr_fused=True),
    lambda: H.GSNR(keras.optimizers.AdamW(), fused=True),
    lambda: H.GSNR(keras.optimizers.AdamW()),
    lambda: H.create("vr-adam"),
    lambda: H.create("vr-adam", gsnr_fused=False),
])
def test_config_round_trip_keeps_fused(make):
    opt = make()
    cfg = opt.get_config()
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(again) is type(opt) and again.get_config() == cfg
    assert again.fused == opt.fused
    inner = getattr(opt, "inner_optimizer", None)
    if isinstance(inner, H.LargeBatchOptimizer):
        assert again.inner_optimizer.fused == inner.fused
        assert (cfg["fused"], cfg["gsnr_fused"]) == (inner.fused, opt.fused)


def test_vr_gsnr_fused_follows_fused():
    opt = H.create("vr-lamb", fused=True)
    assert opt.fused and opt.inner_optimizer.fused
    opt = H.create("vr-lamb", fused=True, gsnr_fused=False)
    assert not opt.fused and opt.inner_optimizer.fused
    opt = H.create("vr-lamb")
    assert opt.fused is None and opt.inner_optimizer.fused is False  # GSNR maths: auto
    assert H.create("vr-lamb", gsnr_fused=True).inner_optimizer.fused is False


@pytest.mark.parametrize("call, needle", [
    (lambda: H.create("lamb", fused=1), "invalid fused=1: must be True or False"),
    (lambda: H.create("sgd", fused="yes"), "invalid fused='yes': must be True or False"),
    (lambda: H.create("vr-lamb", fused=None), "invalid fused=None: must be True or False"),
    (lambda: H.create("vr-adam", gsnr_fused=0), "invalid gsnr_fused=0: must be True, False or None"),
    (lambda: H.GSNR(keras.optimizers.SGD(), fused=np.bool_(True)),
     f"invalid fused={np.bool_(True)!r}: must be True, False or None"),
    (lambda: H.GSNR(keras.optimizers.SGD(), fused="auto"), "invalid fused='auto': must be True, False or None"),
])
def test_invalid_fused(call, needle):
    with pytest.raises(ValueError) as e:
        call()
    assert needle in str(e.value)


# -- GSNR's default, fused=None: auto (issue 20) --------------------------------------------------

@pytest.fixture
def xla_calls(monkeypatch):
    """How many GSNR steps took the XLA path (``_scale`` asks for ``_gsnr_xla()`` once a step)."""
    real, calls = tf_gsnr._gsnr_xla, []

    def spy():
        calls.append(1)
        return real()

    monkeypatch.setattr(tf_gsnr, "_gsnr_xla", spy)
    return calls


def gsnr_adamw(**kwargs):
    return H.GSNR(keras_optimizer("adamw"), **GSNR_HP, **kwargs)


def test_default_is_fused_where_xla_works(xla_calls, floatx):
    opt, _ = run(gsnr_adamw, "float64", "eager", steps=2)
    assert opt.fused is None and len(xla_calls) == (2 if tf_gsnr.xla_available() else 0)
    assert tf_gsnr.resolve_fused(None) is tf_gsnr.xla_available()
    assert (tf_gsnr.resolve_fused(True), tf_gsnr.resolve_fused(False)) == (True, False)


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_default_without_xla_is_the_per_tensor_path(mode, xla_calls, monkeypatch, floatx):
    monkeypatch.setattr(tf_gsnr, "xla_available", lambda: False)
    auto = run(gsnr_adamw, "float64", mode)
    assert not xla_calls
    assert_same(auto, run(lambda: gsnr_adamw(fused=False), "float64", mode), 0.0, "auto without XLA")


def test_probe_runs_inside_a_trace():
    """Asked first while ``model.fit``'s step is traced, the probe still runs eagerly (init_scope)."""
    eager = tf_gsnr.xla_available()
    tf_gsnr.xla_available.cache_clear()
    seen = []
    tf.function(lambda: seen.append(tf_gsnr.xla_available()) or tf.constant(0))()
    assert seen == [eager]


def test_probe_failure_means_no_xla(monkeypatch):
    """A TF build or device without XLA fails the probe with an OpError: plain ops, no error."""
    def no_jit(fn, jit_compile=None, **kwargs):
        def call(*args):
            raise tf.errors.UnimplementedError(None, None, "XLA is not available")
        return call

    tf_gsnr.xla_available.cache_clear()
    monkeypatch.setattr(tf, "function", no_jit)
    try:
        assert tf_gsnr.xla_available() is False and tf_gsnr.resolve_fused(None) is False
    finally:
        tf_gsnr.xla_available.cache_clear()


# 26 distinct sizes (0 to 25) of ranks 0 to 4: 0-d, size-1 and empty variables included.
MANY_SHAPES = [(), (1,), (1, 1), (0,), (2,), (3,), (2, 2), (5,), (2, 3), (7,), (2, 2, 2), (3, 3), (10,), (11,),
               (3, 4), (13,), (2, 7), (3, 5), (4, 4), (17,), (3, 1, 6), (19,), (4, 5), (1, 3, 7), (2, 11),
               (23,), (2, 3, 4), (5, 5), (1, 1, 1, 1), (1, 2, 1, 3)]


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_default_on_many_sizes_equals_per_tensor(dtype, mode, xla_calls):
    """More than 20 distinct sizes: no fallback, one trace per rank and dtype, none after step 1."""
    assert len({int(np.prod(s)) for s in MANY_SHAPES}) > 20
    rng = np.random.default_rng(7)
    # (ḡ, s) per variable and step, s ≥ ḡ² as a mean of squares is.
    data = [[(g, g * g + np.abs(rng.normal(size=g.shape))) for g in (rng.normal(size=s) for s in MANY_SHAPES)]
            for _ in range(3)]

    def steps(fused):
        variables = [keras.Variable(np.ones(s, dtype), name=f"v{i}") for i, s in enumerate(MANY_SHAPES)]
        opt = H.GSNR(keras.optimizers.SGD(0.1, momentum=0.9), momentum=0.9, fused=fused)
        opt.build(variables)

        def step(grads, sq):
            opt.set_grad_sq(sq)
            opt.apply(grads, variables)

        step = tf.function(step) if mode == "function" else step
        counts = []
        for stats in data:
            step([tf.constant(g, dtype) for g, _ in stats], [tf.constant(s, dtype) for _, s in stats])
            counts.append(tf_gsnr._gsnr_xla().experimental_get_tracing_count())
        return (opt, variables), counts

    auto, counts = steps(None)
    assert len(xla_calls) == (3 if mode == "eager" else 1) + 3 and counts[0] == counts[2], counts
    assert_same(auto, steps(False)[0], TOL[dtype], "many sizes")
