"""Keras 3 optimizers against the float64 NumPy reference (SPEC §6), config, validation."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from hvd_lb import rules, schedules  # noqa: E402
from hvd_lb.reference import ReferenceOptimizer, gradient_stats, gsnr_ratio  # noqa: E402
from tests.scripts.tf_common import TEST_HP, flags, init_params, sample_grads  # noqa: E402

import hvd_lb.tf as H  # noqa: E402

STEPS, K = 20, 3
TOL = {"float64": 1e-10, "float32": 1e-5}


def make_vars(dtype, seed=0):
    return [keras.Variable(v.astype(dtype), name=n) for n, v in init_params(seed).items()]


def close(actual, expected, tol, what):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=what)


def run_pair(name, dtype, hp, steps=STEPS):
    """Step the TF optimizer and the reference side by side on the same ḡ, s."""
    variables = make_vars(dtype)
    opt = H.create(name, **hp)
    cast = (lambda a: a.astype(dtype).astype(np.float64))
    ref = ReferenceOptimizer(name, [cast(v.numpy()) for v in variables], adapt=flags(),
                             decay=flags(), **rules.from_keras(hp))
    shapes = [tuple(v.shape) for v in variables]
    for t in range(steps):
        samples = [[cast(x) for x in sample_grads(t, i, shapes)] for i in range(K)]
        mean, sq = gradient_stats(samples)
        if opt.rule.gsnr:
            opt.set_grad_sq([tf.constant(s, dtype) for s in sq])
        opt.apply([tf.constant(g, dtype) for g in mean], variables)
        ref.step(mean, sq if opt.rule.gsnr else None)
    return opt, variables, ref


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", rules.NAMES)
def test_parity_with_reference(name, dtype):
    opt, variables, ref = run_pair(name, dtype, TEST_HP[name])
    tol = TOL[dtype]
    for v, p in zip(variables, ref.params):
        close(v.numpy(), p, tol, f"{name} {v.path}")
    slots = opt.slots()
    assert set(slots) == set(opt.rule.slots) == set(ref.state)
    for slot in opt.rule.slots:
        for var, arr, v in zip(slots[slot], ref.state[slot], variables):
            close(var.numpy(), arr, tol, f"{name} slot {slot} of {v.path}")
    assert int(opt.iterations.numpy()) == STEPS


def test_gsnr_avg_is_r_without_gsnr_momentum():
    """β₃ = 0: the gsnr_avg slot holds r of the last step (SPEC §2)."""
    variables = make_vars("float64")
    opt = H.create("vr-sgd", gamma=0.2)
    shapes = [tuple(v.shape) for v in variables]
    samples = [sample_grads(0, i, shapes) for i in range(K)]
    mean, sq = gradient_stats(samples)
    opt.set_grad_sq([tf.constant(s) for s in sq])
    opt.apply([tf.constant(g) for g in mean], variables)
    diag = opt.gsnr_diagnostics()
    for var, g, s, v in zip(opt.slots()["gsnr_avg"], mean, sq, variables):
        r, mu, clipped = gsnr_ratio(g, s, 0.2)
        close(var.numpy(), r, 1e-12, v.path)
        assert diag[v.path]["mean_gsnr"] == pytest.approx(mu, rel=1e-6)
        assert diag[v.path]["clipped_fraction"] == pytest.approx(clipped, abs=1e-7)


@pytest.mark.parametrize("base", rules.BASE_NAMES)
def test_gamma_one_is_base_rule(base):
    """γ = 1 makes every VR optimizer exactly its base optimizer (SPEC §2)."""
    hp = {k: v for k, v in TEST_HP[base].items()}
    _, vr_vars, _ = run_pair("vr-" + base, "float64", dict(hp, gamma=1.0), steps=6)
    _, base_vars, _ = run_pair(base, "float64", hp, steps=6)
    for a, b in zip(vr_vars, base_vars):
        close(a.numpy(), b.numpy(), 1e-12, base)


@pytest.mark.parametrize("name", ["vr-lamb", "tvlars", "vr-sngm"])
def test_tf_function_and_xla_match_eager(name):
    hp = TEST_HP[name]
    _, eager_vars, _ = run_pair(name, "float32", hp, steps=5)
    variables = make_vars("float32")
    opt = H.create(name, **hp)
    shapes = [tuple(v.shape) for v in variables]

    @tf.function(jit_compile=True)
    def step(grads, sq):
        if opt.rule.gsnr:
            opt.set_grad_sq(sq)
        opt.apply(grads, variables)

    opt.build(variables)
    for t in range(5):
        mean, sq = gradient_stats([sample_grads(t, i, shapes) for i in range(K)])
        step([tf.constant(g, tf.float32) for g in mean], [tf.constant(s, tf.float32) for s in sq])
    for a, b in zip(variables, eager_vars):
        close(a.numpy(), b.numpy(), 1e-5, name)


def test_defaults_come_from_the_table():
    for name in rules.NAMES:
        opt = H.create(name)
        cfg = opt.get_config()
        for k, v in rules.to_keras(rules.get_rule(name).defaults).items():
            if k == "learning_rate":
                assert cfg[k] == pytest.approx(v)
            else:
                assert cfg[k] == v, (name, k)


@pytest.mark.parametrize("name", rules.NAMES)
def test_config_round_trip(name):
    hp = dict(TEST_HP[name], learning_rate=0.125)
    opt = H.create(name, exclude=["*zero*"], clipnorm=2.0, **hp)
    cfg = opt.get_config()
    clone = type(opt).from_config(cfg)
    assert clone.get_config() == cfg
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(again) is type(opt) and again.get_config() == cfg
    for k, v in hp.items():
        assert cfg[k] == v


def test_config_round_trip_schedule():
    sched = H.WarmupDecay(0.1, 5, 50, final_lr=0.001, decay="polynomial", power=2.0)
    opt = H.create("lars", learning_rate=sched)
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert again.get_config() == opt.get_config()
    assert isinstance(again._learning_rate, H.WarmupDecay)


@pytest.mark.parametrize("decay", ["cosine", "polynomial", "constant"])
def test_warmup_decay_equals_core(decay):
    kw = dict(base_lr=0.4, warmup_steps=5, total_steps=30, final_lr=0.01, decay=decay, power=1.5)
    sched = H.WarmupDecay(**kw)
    got = sched(tf.range(40)).numpy()
    want = [schedules.warmup_decay(s, **kw) for s in range(40)]
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-15)


def test_schedule_drives_the_optimizer_step():
    """The optimizer queries the schedule with the zero-based iteration of each step."""
    sched = H.WarmupDecay(0.5, 3, 10)
    opt = H.create("sgd", learning_rate=sched)
    var = keras.Variable(np.zeros(2), dtype="float64", name="w")
    lrs = []
    for _ in range(5):
        before = var.numpy().copy()
        opt.apply([tf.constant(np.ones(2))], [var])
        lrs.append(before[0] - var.numpy()[0])
    np.testing.assert_allclose(lrs, [schedules.warmup_decay(s, 0.5, 3, 10) for s in range(5)],
                               rtol=1e-12)


@pytest.mark.parametrize("kwargs, needle", [
    # Keras spellings in the messages, not torch's lr/betas/eps (issue 12, defect 8).
    ({"learning_rate": -1.0}, "invalid learning_rate=-1.0"),
    ({"momentum": 1.0}, "momentum=1.0"),
    ({"beta_1": 1.5}, "invalid beta_1=1.5"),
    ({"beta_1": "0.9"}, "invalid beta_1='0.9'"),
    ({"beta_2": float("nan")}, "invalid beta_2=nan"),
    ({"epsilon": -1.0}, "invalid epsilon=-1.0"),
    ({"weight_decay": float("inf")}, "invalid weight_decay=inf"),
    ({"gamma": 0.0}, "gamma=0.0"),
    ({"betas": (0.9, 0.99)}, "unknown argument(s) betas"),
    ({"exclude": [3]}, "exclude"),
])
def test_invalid_arguments(kwargs, needle):
    name = "vr-lamb" if {"beta_1", "beta_2", "betas", "epsilon"} & set(kwargs) else "vr-momentum"
    with pytest.raises(ValueError) as e:
        H.create(name, **kwargs)
    assert needle in str(e.value)


@pytest.mark.parametrize("wrap", ["rule", "gsnr", "distributed"])
@pytest.mark.parametrize("lr", [float("nan"), -0.5, float("inf")])
def test_learning_rate_set_later_is_checked(wrap, lr):
    """A NaN/negative/inf rate assigned after construction fails on the Python value (issue 12)."""
    if wrap == "distributed":
        pytest.importorskip("horovod.tensorflow")
    opt = {"rule": lambda: H.create("vr-lamb"), "gsnr": lambda: H.GSNR(keras.optimizers.SGD(0.1)),
           "distributed": lambda: H.DistributedOptimizer(keras.optimizers.SGD(0.1))}[wrap]()
    with pytest.raises(ValueError, match=r"invalid learning_rate=(nan|-0.5|inf)"):
        opt.learning_rate = lr
    opt.learning_rate = 0.25
    assert float(opt.learning_rate.numpy()) == 0.25


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown optimizer"):
        H.create("adamw")


def test_vr_without_squares_is_a_clear_error():
    var = keras.Variable(np.ones((2, 2)), name="w")
    opt = H.create("vr-sgd")
    with pytest.raises(ValueError, match="DistributedOptimizer"):
        opt.apply([tf.ones((2, 2))], [var])
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        H.create("vr-adam", gradient_accumulation_steps=2)


def test_exclusion_by_path_pattern():
    """``exclude`` turns decay/adaptation off by path; ``include`` forces a 1-D tensor back in."""
    w = keras.Variable(np.ones((2, 2)), dtype="float64", name="kernel")
    b = keras.Variable(np.ones(2), dtype="float64", name="bias")
    opt = H.create("sgd", learning_rate=0.1, weight_decay=0.5, exclude=["*kernel*"], include=["bias"])
    opt.apply([tf.zeros((2, 2), tf.float64), tf.zeros(2, tf.float64)], [w, b])
    np.testing.assert_allclose(w.numpy(), 1.0)  # excluded: no decay
    np.testing.assert_allclose(b.numpy(), 1.0 - 0.1 * 0.5)  # included despite ndim 1


def test_keras_weight_decay_not_applied_twice():
    w = keras.Variable(np.ones((2, 2)), dtype="float64", name="kernel")
    opt = H.create("adam", learning_rate=0.1, weight_decay=0.5)
    opt.apply([tf.zeros((2, 2), tf.float64)], [w])
    # Adam on g = 0: direction 0, decoupled decay once: w(1 − lr·λ).
    np.testing.assert_allclose(w.numpy(), 1.0 - 0.1 * 0.5, rtol=1e-12)
    w2 = keras.Variable(np.ones((2, 2)), dtype="float64", name="kernel")
    opt2 = H.create("adam", learning_rate=0.1, weight_decay=0.5)
    opt2.exclude_from_weight_decay(var_names=["kernel"])
    opt2.apply([tf.zeros((2, 2), tf.float64)], [w2])
    np.testing.assert_allclose(w2.numpy(), 1.0)
