"""Every rule against the float64 NumPy reference (SPEC §6), both implementations."""
import copy

import numpy as np
import pytest
import torch

import hvd_lb.torch as lbt
from hvd_lb import reference, rules

STEPS = 20
ZERO_GRAD_STEP = 7          # an all-zero gradient step (ḡ = s = 0)
SHAPES = [(4, 3), (3, 2), (3,)]
ADAPT = [True, True, False]  # the rank-1 tensor is excluded from adapt/decay (create's default)

# Non-default values for every hyperparameter a rule has; filtered per rule.
CUSTOM = {
    "weight_decay": 0.01, "nesterov": True, "betas": (0.8, 0.99), "eps": 1e-5, "max_trust": 2.0,
    "gamma": 0.3, "gsnr_momentum": 0.5, "alpha": 0.5, "decay_coefficient": 0.3, "delay_steps": 5,
    "min_ratio": 0.01, "trust_clip": True, "trust_coefficient": 0.01,
}


def hparams(name, config):
    if config == "default":
        return {}
    allowed = {h.name for h in rules.get_rule(name).hypers}
    hp = {k: v for k, v in CUSTOM.items() if k in allowed}
    if name.endswith("lars") and "trust_clip" in hp:
        hp["lr"] = 0.5  # trust_clip uses min(trust, lr): keep lr in a range where both branches occur
    return hp


def initial_params():
    rng = np.random.default_rng(0)
    w = [rng.standard_normal(s) for s in SHAPES]
    w[1][:] = 0.0  # an all-zero weight tensor with adaptation on
    return w


def gradient_sequence(seed=1, k=4):
    """Per step: (ḡ, s) from k seeded samples; step ZERO_GRAD_STEP is all zeros."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(1, STEPS + 1):
        signal = [rng.standard_normal(s) for s in SHAPES]
        samples = [[sig + 1.5 * rng.standard_normal(sig.shape) for sig in signal] for _ in range(k)]
        if t == ZERO_GRAD_STEP:
            samples = [[np.zeros(s) for s in SHAPES] for _ in range(k)]
        out.append(reference.gradient_stats(samples))
    return out


def to_dtype(arrays, dtype):
    """Round to the torch dtype and back, so reference and torch see the same inputs."""
    return [torch.tensor(a, dtype=dtype) for a in arrays]


def run_torch(name, hp, dtype, foreach, seq, steps=STEPS, **flags):
    params = [t.clone().requires_grad_(True) for t in to_dtype(initial_params(), dtype)]
    opt = lbt.create(name, params, foreach=foreach, **flags, **hp)
    for mean, sq in seq[:steps]:
        for p, g in zip(params, to_dtype(mean, dtype)):
            p.grad = g
        if opt.rule.gsnr:
            opt.set_grad_sq(to_dtype(sq, dtype))
        opt.step()
    return params, opt


def run_reference(name, hp, dtype, seq):
    w0 = [t.double().numpy() for t in to_dtype(initial_params(), dtype)]
    ref = reference.ReferenceOptimizer(name, w0, adapt=ADAPT, decay=ADAPT, **hp)
    for mean, sq in seq:
        ref.step([t.double().numpy() for t in to_dtype(mean, dtype)],
                 [t.double().numpy() for t in to_dtype(sq, dtype)] if ref.rule.gsnr else None)
    return ref


def assert_close(actual, expected, tol, what):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=what)


SEQ = gradient_sequence()


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("config", ["default", "custom"])
@pytest.mark.parametrize("name", rules.NAMES)
def test_parity_with_reference(name, config, dtype, tol, foreach):
    hp = hparams(name, config)
    params, opt = run_torch(name, hp, dtype, foreach, SEQ)
    ref = run_reference(name, hp, dtype, SEQ)
    for i, (p, w) in enumerate(zip(params, ref.params)):
        assert_close(p.detach(), w, tol, f"{name} param {i}")
        st = opt.state[p]
        assert st["step"] == STEPS
        for slot in opt.rule.slots:
            assert_close(st[slot], ref.state[slot][i], tol, f"{name} slot {slot}[{i}]")


@pytest.mark.parametrize("name", rules.NAMES)
def test_foreach_equals_per_tensor_float64(name):
    a, oa = run_torch(name, hparams(name, "custom"), torch.float64, False, SEQ)
    b, ob = run_torch(name, hparams(name, "custom"), torch.float64, True, SEQ)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
        for slot in oa.rule.slots:
            torch.testing.assert_close(oa.state[p][slot], ob.state[q][slot], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("base", rules.BASE_NAMES)
def test_gamma_one_is_base_optimizer(base, foreach):
    """SPEC §2: γ = 1 makes every VR optimizer its base (exactly when β₃ = 0)."""
    for b3 in (0.0, 0.9):
        a, _ = run_torch(base, {}, torch.float64, foreach, SEQ)
        b, _ = run_torch("vr-" + base, {"gamma": 1.0, "gsnr_momentum": b3}, torch.float64, foreach, SEQ)
        for p, q in zip(a, b):
            if b3 == 0.0:
                assert torch.equal(p, q)
            else:
                torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("name", rules.NAMES)
def test_state_dict_round_trip(name, foreach):
    """Save after 8 steps, load into a fresh optimizer, continue: equals the uninterrupted run."""
    hp = hparams(name, "custom")
    full, _ = run_torch(name, hp, torch.float64, foreach, SEQ)
    params, opt = run_torch(name, hp, torch.float64, foreach, SEQ, steps=8)
    saved_w = [p.detach().clone() for p in params]
    saved = copy.deepcopy(opt.state_dict())
    fresh = [w.clone().requires_grad_(True) for w in saved_w]
    opt2 = lbt.create(name, fresh, foreach=foreach, **hp)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for mean, sq in SEQ[8:]:
        for p, g in zip(fresh, to_dtype(mean, torch.float64)):
            p.grad = g
        if opt2.rule.gsnr:
            opt2.set_grad_sq(to_dtype(sq, torch.float64))
        opt2.step()
    for p, q in zip(full, fresh):
        assert torch.equal(p, q)


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_gsnr_diagnostics_match_reference(foreach):
    params, opt = run_torch("vr-lamb", {"gamma": 0.5}, torch.float64, foreach, SEQ, steps=3)
    mean, sq = SEQ[2]
    diag = opt.gsnr_diagnostics()
    assert list(diag) == ["param_groups.0.0", "param_groups.0.1", "param_groups.1.0"]
    for (name, d), g, s in zip(diag.items(), mean, sq):
        _, mu, clipped = reference.gsnr_ratio(g, s, 0.5)
        assert d["mean_gsnr"] == pytest.approx(mu, rel=1e-12)
        assert d["clipped_fraction"] == pytest.approx(clipped, abs=1e-12)
    assert 0.0 < diag["param_groups.0.0"]["clipped_fraction"] < 1.0
