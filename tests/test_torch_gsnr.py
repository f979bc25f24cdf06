"""The GSNR transform in front of any torch optimizer (docs/SPEC.md §2, §7), single process."""
import copy

import numpy as np
import pytest
import torch

import hvd_lb.torch as lbt
from hvd_lb import reference, rules
from tests.test_torch_parity import (SEQ, STEPS, assert_close, hparams, initial_params, run_reference,
                                     to_dtype)


def _leaves(dtype=torch.float64):
    return [t.clone().requires_grad_(True) for t in to_dtype(initial_params(), dtype)]


def _run(opt, params, seq, dtype=torch.float64, with_sq=True):
    for mean, sq in seq:
        for p, g in zip(params, to_dtype(mean, dtype)):
            p.grad = g
        if with_sq:
            opt.set_grad_sq(to_dtype(sq, dtype))
        opt.step()
    return params


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("base", rules.BASE_NAMES)
def test_vr_rule_equals_gsnr_of_its_base_rule(base, foreach):
    """``vr-X`` is ``GSNR(X)`` with the same γ and β₃, to float64 rounding, state included."""
    hp = hparams("vr-" + base, "custom")
    base_hp = {k: v for k, v in hp.items() if k not in ("gamma", "gsnr_momentum")}
    a = _leaves()
    vr = lbt.create("vr-" + base, a, foreach=foreach, **hp)
    _run(vr, a, SEQ)
    b = _leaves()
    opt = lbt.GSNR(lbt.create(base, b, foreach=foreach, **base_hp), gamma=hp["gamma"],
                   momentum=hp["gsnr_momentum"])
    _run(opt, b, SEQ)
    assert isinstance(opt, lbt.GSNR) and isinstance(vr, lbt.GSNR)
    assert type(opt.optimizer) is type(vr.optimizer) is lbt.OPTIMIZERS[base]
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
        assert opt.state[q]["gsnr_step"] == vr.state[p]["gsnr_step"] == STEPS
        for slot in rules.get_rule("vr-" + base).slots:
            torch.testing.assert_close(opt.state[q][slot], vr.state[p][slot], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_gsnr_adamw_equals_reference_vr_adam(dtype, tol, foreach):
    """torch.optim.AdamW's decoupled decay is SPEC §3's Adam: GSNR(AdamW) = reference vr-adam."""
    hp = {"lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-8, "weight_decay": 0.01}
    params = _leaves(dtype)
    opt = lbt.GSNR(torch.optim.AdamW(params, foreach=foreach, **hp), gamma=0.3, momentum=0.5)
    _run(opt, params, SEQ, dtype)
    w0 = [t.double().numpy() for t in to_dtype(initial_params(), dtype)]
    ref = reference.ReferenceOptimizer("vr-adam", w0, gamma=0.3, gsnr_momentum=0.5, **hp)
    for mean, sq in SEQ:
        ref.step([t.double().numpy() for t in to_dtype(mean, dtype)],
                 [t.double().numpy() for t in to_dtype(sq, dtype)])
    for i, (p, w) in enumerate(zip(params, ref.params)):
        assert_close(p.detach(), w, tol, f"param {i}")
        assert_close(opt.state[p]["gsnr_avg"], ref.state["gsnr_avg"][i], tol, f"gsnr_avg {i}")
        assert_close(opt.state[p]["exp_avg_sq"], ref.state["exp_avg_sq"][i], tol, f"exp_avg_sq {i}")


@pytest.mark.parametrize("nesterov", [False, True])
def test_gsnr_sgd_equals_reference_vr_momentum(nesterov):
    """torch.optim.SGD(momentum, weight_decay) is SPEC §3's Momentum (b₀ = first value)."""
    hp = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01, "nesterov": nesterov}
    params = _leaves()
    _run(lbt.GSNR(torch.optim.SGD(params, **hp), gamma=0.2), params, SEQ)
    ref = reference.ReferenceOptimizer("vr-momentum", initial_params(), gamma=0.2, gsnr_momentum=0.0, **hp)
    for mean, sq in SEQ:
        ref.step(mean, sq)
    for i, (p, w) in enumerate(zip(params, ref.params)):
        assert_close(p.detach(), w, 1e-10, f"param {i}")


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    lambda ps: lbt.create("lamb", ps),
], ids=["SGD", "AdamW", "lamb"])
def test_gamma_one_is_exactly_the_inner_optimizer(make):
    a = _leaves()
    _run(make(a), a, SEQ, with_sq=False)
    b = _leaves()
    _run(lbt.GSNR(make(b), gamma=1.0, momentum=0.0), b, SEQ)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_exclude_passes_the_mean_gradient_through():
    model = torch.nn.Linear(3, 2).double()
    plain = copy.deepcopy(model)
    opt = lbt.GSNR(torch.optim.SGD(model.parameters(), lr=0.1), gamma=0.1, exclude=["*.bias", "bias"],
                   named_parameters=model.named_parameters())
    ref = torch.optim.SGD(plain.parameters(), lr=0.1)
    rng = np.random.default_rng(3)
    for _ in range(3):
        samples = [[rng.standard_normal((2, 3)), rng.standard_normal(2)] for _ in range(4)]
        mean, sq = reference.gradient_stats(samples)
        for m in (model, plain):
            m.weight.grad, m.bias.grad = torch.tensor(mean[0]), torch.tensor(mean[1])
        opt.set_grad_sq([torch.tensor(s) for s in sq])
        opt.step()
        ref.step()
    assert torch.equal(model.bias, plain.bias)           # excluded: ḡ unscaled
    assert not torch.equal(model.weight, plain.weight)   # scaled by r
    assert "gsnr_avg" not in opt.state[model.bias] and "gsnr_avg" in opt.state[model.weight]
    assert list(opt.gsnr_diagnostics()) == ["weight"]


def test_mean_gradient_is_back_in_grad_after_step():
    params = _leaves()
    opt = lbt.GSNR(torch.optim.SGD(params, lr=0.1), gamma=0.1)
    mean, sq = SEQ[0]
    for p, g in zip(params, to_dtype(mean, torch.float64)):
        p.grad = g
    grads = [p.grad for p in params]
    opt.set_grad_sq(to_dtype(sq, torch.float64))
    opt.step()
    assert all(p.grad is g for p, g in zip(params, grads))


def test_state_dict_round_trip_with_lazy_inner_state():
    """GSNR(AdamW): p_t and the step count live in AdamW's state dict and resume exactly."""
    full = _leaves()
    _run(lbt.GSNR(torch.optim.AdamW(full, lr=0.01), momentum=0.9), full, SEQ)
    part = _leaves()
    opt = lbt.GSNR(torch.optim.AdamW(part, lr=0.01), momentum=0.9)
    _run(opt, part, SEQ[:8])
    saved = copy.deepcopy(opt.state_dict())
    assert {"gsnr_avg", "gsnr_step", "exp_avg"} <= set(saved["state"][0])
    assert saved["param_groups"][0]["gsnr_momentum"] == 0.9
    fresh = [p.detach().clone().requires_grad_(True) for p in part]
    opt2 = lbt.GSNR(torch.optim.AdamW(fresh, lr=0.01))          # γ, β₃ come back from the groups
    opt2.load_state_dict(saved)
    _run(opt2, fresh, SEQ[8:])
    for p, q in zip(full, fresh):
        assert torch.equal(p, q)


def test_old_vr_checkpoint_without_gsnr_step_resumes():
    """A vr-* state dict from before the transform (no gsnr_step) continues its bias correction."""
    hp = {"gsnr_momentum": 0.9}
    full = _leaves()
    _run(lbt.create("vr-adam", full, **hp), full, SEQ)
    part = _leaves()
    opt = lbt.create("vr-adam", part, **hp)
    _run(opt, part, SEQ[:8])
    saved = copy.deepcopy(opt.state_dict())
    for st in saved["state"].values():
        del st["gsnr_step"]
    fresh = [p.detach().clone().requires_grad_(True) for p in part]
    opt2 = lbt.create("vr-adam", fresh, **hp)
    opt2.load_state_dict(saved)
    _run(opt2, fresh, SEQ[8:])
    for p, q in zip(full, fresh):
        assert torch.equal(p, q)


def test_zero_gradient_step_needs_no_statistics():
    """Horovod's broadcast_optimizer_state steps once on zero gradients to build lazy state."""
    params = _leaves()
    opt = lbt.GSNR(torch.optim.AdamW(params, lr=0.01))
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all("exp_avg" in opt.state[p] for p in params)
    params[0].grad = torch.ones_like(params[0])
    with pytest.raises(RuntimeError, match="hvd_lb.torch.DistributedOptimizer"):
        opt.step()


@pytest.mark.parametrize("kwargs,needle", [
    ({"gamma": 0.0}, "gamma=0.0"), ({"gamma": 1.5}, "(0, 1]"), ({"momentum": 1.0}, "gsnr_momentum=1.0"),
    ({"exclude": [3]}, "exclude"), ({"exclude": ["*.bias"]}, "named_parameters"),
])
def test_bad_arguments_are_clear_errors(kwargs, needle):
    with pytest.raises(ValueError) as e:
        lbt.GSNR(torch.optim.SGD(_leaves(), lr=0.1), **kwargs)
    assert needle in str(e.value)


def test_refuses_double_transform_and_non_optimizers():
    with pytest.raises(ValueError, match="already"):
        lbt.GSNR(lbt.create("vr-sgd", _leaves()))
    with pytest.raises(ValueError, match="torch.optim.Optimizer"):
        lbt.GSNR(object())


def test_low_precision_gradients_use_float32_statistics():
    params = _leaves(torch.bfloat16)
    opt = lbt.GSNR(torch.optim.SGD(params, lr=0.1), gamma=0.3)
    _run(opt, params, SEQ[:3], torch.bfloat16)
    ref = reference.ReferenceOptimizer("vr-sgd", [p.double().numpy() for p in to_dtype(initial_params(),
                                                                                        torch.bfloat16)],
                                       lr=0.1, gamma=0.3)
    for mean, sq in SEQ[:3]:
        ref.step([t.double().numpy() for t in to_dtype(mean, torch.bfloat16)],
                 [t.double().numpy() for t in to_dtype(sq, torch.bfloat16)])
    for p, w in zip(params, ref.params):
        assert_close(p.detach().double(), w, 2e-2, "bf16")


@pytest.mark.parametrize("scale", [1e-20, 1e-10, 1.0, 1e4, 1e10, 1e18])
@pytest.mark.parametrize("identical", [False, True], ids=["noisy", "zero-variance"])
@pytest.mark.parametrize("k", [2, 8])
def test_float32_gsnr_is_finite_and_follows_float64(scale, identical, k):
    """SPEC §2 variance floor: float32 r stays finite (identical samples give r̃ = 1) and close to
    the float64 reference, from |g| = 1e-20 up to where float32 squares overflow (|x| ≈ 1.8e19;
    beyond, send s as float64)."""
    from hvd_lb import formulas
    from hvd_lb.torch._ops import T

    rng = np.random.default_rng(int(np.log10(scale)) + 40 + k)
    signal = rng.standard_normal(256)
    samples = [[scale * (signal if identical else signal + rng.standard_normal(256))] for _ in range(k)]
    mean, sq = reference.gradient_stats(samples)
    r64, mu64, _ = reference.gsnr_ratio(mean[0], sq[0], 0.1)
    g32, s32 = torch.tensor(mean[0], dtype=torch.float32), torch.tensor(sq[0], dtype=torch.float32)
    r32, mu32, c32 = formulas.gsnr_ratio(T, g32, s32, 0.1, formulas.variance_floor(False))
    assert torch.isfinite(r32).all() and torch.isfinite(mu32)
    r32 = r32.double().numpy()
    if scale < 1.0:
        # δ's absolute 1e-30 is not small against ε_w·s here, and 1e-20² is below float32's
        # normal range: only finiteness is asked.
        return
    if identical:
        # r̃ = 1 up to δ's share on near-zero elements, in both precisions.
        np.testing.assert_allclose(r32, 1.0, rtol=1e-5)
        np.testing.assert_allclose(r64, 1.0, rtol=1e-5)
    elif k == 2:
        # r_raw has no finite mean at k = 2: which few elements dominate μ_r moves with rounding,
        # so float32 follows float64 in distribution (clipped share, mean r), not element by element.
        _, _, c64 = reference.gsnr_ratio(mean[0], sq[0], 0.1)
        assert abs(float(c32) - c64) < 0.05 and abs(r32.mean() - r64.mean()) < 0.05
    else:
        np.testing.assert_allclose(r32, r64, rtol=2e-3, atol=2e-3)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)], ids=["f64", "f32"])
def test_fused_path_equals_per_tensor(dtype, tol):
    """torch.compile'd GSNR (one graph for every size and step) = the per-tensor formulas."""
    hp = {"lr": 0.05, "weight_decay": 0.01}
    a, b = _leaves(dtype), _leaves(dtype)
    ref = lbt.GSNR(torch.optim.AdamW(a, foreach=False, **hp), gamma=0.3, momentum=0.5)
    ref.param_groups[0]["foreach"] = False
    fused = lbt.GSNR(torch.optim.AdamW(b, foreach=False, **hp), gamma=0.3, momentum=0.5, fused=True)
    _run(ref, a, SEQ[:6], dtype)
    _run(fused, b, SEQ[:6], dtype)
    for p, q in zip(a, b):
        torch.testing.assert_close(q, p, rtol=tol, atol=tol)
        torch.testing.assert_close(fused.state[q]["gsnr_avg"], ref.state[p]["gsnr_avg"], rtol=tol, atol=tol)
    assert fused.gsnr_diagnostics().keys() == ref.gsnr_diagnostics().keys()
    vr = lbt.create("vr-sgd", _leaves(dtype), gsnr_fused=True)
    assert all(g["gsnr_fused"] for g in vr.param_groups)


@pytest.mark.parametrize("scale", [1e20, 1e30])
def test_float32_parameters_with_float64_squares_stay_finite_beyond_float32_squares(scale):
    """|x| > 1.8e19 overflows float32 squares; with s in float64 (square_dtype="float64") the GSNR
    maths runs in float64 and ĝ follows the float64 reference."""
    rng = np.random.default_rng(5)
    samples = [[scale * (np.ones(64) + rng.standard_normal(64))] for _ in range(8)]
    mean, sq = reference.gradient_stats(samples)
    w = torch.zeros(64, dtype=torch.float32, requires_grad=True)
    opt = lbt.GSNR(torch.optim.SGD([w], lr=1e-30), gamma=0.1)
    w.grad = torch.tensor(mean[0], dtype=torch.float32)
    opt.set_grad_sq([torch.tensor(sq[0], dtype=torch.float64)])
    opt.step()
    assert torch.isfinite(w).all()
    r, _, _ = reference.gsnr_ratio(mean[0], sq[0], 0.1)
    np.testing.assert_allclose(w.detach().double().numpy(), -1e-30 * r * mean[0], rtol=1e-5)


@pytest.mark.parametrize("path", ["foreach", "single", "fused"])
def test_complex_parameters_equal_their_real_view(path):
    """A complex tensor is its real and imaginary parts (torch.optim's view_as_real rule)."""
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(3, 2, dtype=torch.complex128, generator=gen).requires_grad_(True)
    r = torch.view_as_real(c.detach()).clone().requires_grad_(True)
    kw = {} if path == "fused" else {"foreach": path == "foreach"}
    opts = [lbt.GSNR(torch.optim.SGD([p], lr=0.1, momentum=0.9, **kw), gamma=0.2, momentum=0.5,
                     fused=path == "fused") for p in (c, r)]
    for _ in range(3):
        g = torch.randn(3, 2, 2, dtype=torch.float64, generator=gen)
        sq = g * g * (1 + 4 * torch.rand(3, 2, 2, dtype=torch.float64, generator=gen))
        c.grad, r.grad = torch.view_as_complex(g.clone()), g.clone()
        opts[0].set_grad_sq([torch.view_as_complex(sq.clone())])
        opts[1].set_grad_sq([sq.clone()])
        for opt in opts:
            opt.step()
    torch.testing.assert_close(torch.view_as_real(c.detach()), r.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.view_as_real(opts[0].state[c]["gsnr_avg"]), opts[1].state[r]["gsnr_avg"])


def test_load_state_dict_post_hooks_see_the_finished_state():
    """A post hook runs after the transform filled in what older state dicts lack (and once)."""
    params = _leaves()
    opt = lbt.GSNR(torch.optim.AdamW(params, lr=0.01), gamma=0.2)
    _run(opt, params, SEQ[:2])
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        del group["gamma"], group["gsnr_exclude"]
    seen = []
    opt.register_load_state_dict_post_hook(lambda o: seen.append((o.param_groups[0]["gamma"],
                                                                  o.param_groups[0]["gsnr_exclude"])))
    opt.load_state_dict(saved)
    assert seen == [(0.2, ())]
