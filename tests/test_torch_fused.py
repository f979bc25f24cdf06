"""The fused (torch.compile'd) paths: the rules' per-tensor updates (``fused=True``) and the GSNR
transform (``gsnr_fused``), tested equal to the per-tensor formulas (issue 11: float64 1e-12,
float32 1e-6). Compiles once per graph; the first run on a fresh machine takes about a minute."""
import pytest
import torch

import hvd_lb.torch as lbt
from hvd_lb import rules
from hvd_lb.torch import _ops, gsnr
from hvd_lb.torch.optimizers import KERNELS
from tests.test_torch_parity import SEQ, hparams, initial_params, run_torch, to_dtype

FUSED = sorted(k for k, v in KERNELS.items() if v.fused is not None)
STEPS = 6


def _run(name, hp, dtype, foreach=None, **flags):
    return run_torch(name, hp, dtype, foreach, SEQ, STEPS, **flags)


def test_every_rule_but_the_global_ones_has_a_fused_path():
    """SNGM's global norm and TVLARS' first-step iterate are not per-tensor updates."""
    assert {"adam", "lamb", "lars", "momentum", "sgd"} <= set(FUSED)
    assert not {"sngm", "tvlars"} & set(FUSED)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)], ids=["f64", "f32"])
@pytest.mark.parametrize("config", ["default", "custom"])
@pytest.mark.parametrize("name", [n for b in FUSED for n in (b, "vr-" + b)])
def test_fused_equals_per_tensor(name, config, dtype, tol):
    """Parameters and every state slot (p_t included) after 6 steps, one step all-zero."""
    hp = hparams(name, config)
    ref, ref_opt = _run(name, hp, dtype, foreach=False)
    out, opt = _run(name, hp, dtype, fused=True)
    assert all(g["fused"] for g in opt.param_groups)
    if opt.rule.gsnr:
        assert all(g["gsnr_fused"] for g in opt.param_groups)
    for p, q in zip(ref, out):
        torch.testing.assert_close(q, p, rtol=tol, atol=tol)
        for slot in opt.rule.slots:
            torch.testing.assert_close(opt.state[q][slot], ref_opt.state[p][slot], rtol=tol, atol=tol)


def test_gsnr_fused_follows_fused_unless_given():
    ps = [torch.zeros(3, requires_grad=True)]
    assert lbt.create("vr-lamb", ps, fused=True).param_groups[0]["gsnr_fused"] is True
    assert lbt.create("vr-lamb", ps, fused=False).param_groups[0]["gsnr_fused"] is False
    opt = lbt.create("vr-lamb", ps, fused=True, gsnr_fused=False)
    assert (opt.param_groups[0]["fused"], opt.param_groups[0]["gsnr_fused"]) == (True, False)
    assert lbt.create("vr-lamb", ps, gsnr_fused=True).param_groups[0]["fused"] is None  # update: foreach
    assert lbt.create("vr-lamb", ps).param_groups[0]["gsnr_fused"] is None             # auto


needs_compiler = pytest.mark.skipif(not _ops.compiler_present("cpu"), reason="no C++ compiler for Inductor")


@needs_compiler
@pytest.mark.parametrize("make,compiled", [
    (lambda ps: lbt.create("vr-lamb", ps), True),
    (lambda ps: lbt.GSNR(torch.optim.AdamW(ps)), True),
    (lambda ps: lbt.create("vr-lamb", ps, foreach=True), False),     # an explicit choice stays
    (lambda ps: lbt.create("vr-lamb", ps, foreach=False), False),
    (lambda ps: lbt.create("vr-lamb", ps, fused=False), False),
    (lambda ps: lbt.GSNR(torch.optim.AdamW(ps, foreach=True)), False),
    (lambda ps: lbt.create("vr-sngm", ps), True),                    # the transform, whatever the rule
], ids=["vr-lamb", "GSNR(AdamW)", "foreach=True", "foreach=False", "fused=False", "AdamW(foreach)", "vr-sngm"])
def test_default_gsnr_path_is_the_compiled_kernel_where_a_compiler_is_present(make, compiled):
    opt = make([torch.zeros(3, requires_grad=True)])
    assert gsnr._use_fused(opt.param_groups[0], torch.device("cpu")) is compiled


def test_auto_is_foreach_without_a_compiler_or_inside_an_outer_compile(monkeypatch):
    group = lbt.create("vr-lamb", [torch.zeros(3, requires_grad=True)]).param_groups[0]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert gsnr._use_fused(group, torch.device("cpu")) is False
    monkeypatch.undo()
    _ops.compiler_present.cache_clear()
    monkeypatch.setattr(_ops.shutil, "which", lambda name: None)
    try:
        assert _ops.compiler_present("cpu") is False
        assert gsnr._use_fused(group, torch.device("cpu")) is False
        assert _ops.compiler_present("meta") is False
        assert _ops.compiler_present("cuda") is False   # Triton: only with gsnr_fused=True (untested here)
    finally:
        _ops.compiler_present.cache_clear()


@pytest.mark.parametrize("name", ["vr-momentum", "vr-lamb"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)], ids=["f64", "f32"])
def test_default_equals_per_tensor(name, dtype, tol):
    """Parameters and every slot (p_t included) after 6 steps, one all-zero, with no flags at all."""
    hp = hparams(name, "custom")
    ref, ref_opt = _run(name, hp, dtype, foreach=False)
    out, opt = _run(name, hp, dtype)
    for p, q in zip(ref, out):
        torch.testing.assert_close(q, p, rtol=tol, atol=tol)
        for slot in opt.rule.slots:
            torch.testing.assert_close(opt.state[q][slot], ref_opt.state[p][slot], rtol=tol, atol=tol)


def test_auto_that_cannot_compile_warns_once_and_runs_the_formulas(monkeypatch):
    """A compiler that fails under auto: one warning, the same numbers; ``gsnr_fused=True`` raises."""
    def broken(fn, key=()):
        raise RuntimeError("CppCompileError: no working compiler\n(details)")
    monkeypatch.setattr(gsnr, "compile_kernel", broken)
    monkeypatch.setattr(gsnr, "_AUTO_OFF", {})
    monkeypatch.setattr(gsnr, "compiler_present", lambda device: True)
    hp = hparams("vr-adam", "custom")
    ref, _ = _run("vr-adam", hp, torch.float64, foreach=False)
    with pytest.warns(RuntimeWarning, match="not compiled .*CppCompileError.* cpu for the rest") as caught:
        out, _ = _run("vr-adam", hp, torch.float64)
    assert len([w for w in caught if "gsnr_fused" in str(w.message)]) == 1
    assert gsnr._AUTO_OFF == {"cpu": "RuntimeError: CppCompileError: no working compiler"}
    for p, q in zip(ref, out):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="no working compiler"):
        _run("vr-adam", hp, torch.float64, gsnr_fused=True)


def test_auto_past_the_hyperparameter_limit_runs_the_formulas_for_that_set(monkeypatch):
    """A γ schedule compiling a kernel per step is refused (``KernelLimit``): auto runs that set
    on the formulas, with one warning, and keeps compiling the sets it has."""
    monkeypatch.setattr(_ops, "_KEYS", {gsnr._gsnr_into: {(g, 0.0) for g in range(_ops.KEYS_PER_KERNEL)}})
    monkeypatch.setattr(gsnr, "_AUTO_OFF", {})
    hp = {**hparams("vr-momentum", "custom"), "gamma": 0.4321}
    ref, _ = _run("vr-momentum", hp, torch.float64, foreach=False)
    with pytest.warns(RuntimeWarning, match="would compile for a 17th set"):
        out, _ = _run("vr-momentum", hp, torch.float64)
    for p, q in zip(ref, out):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12)
    refused = (0.4321, hp.get("gsnr_momentum", 0.0))
    assert set(gsnr._AUTO_OFF) == {refused}   # that set only, and straight to foreach from now on
    group = {"gsnr_fused": None, "foreach": None, "gamma": refused[0], "gsnr_momentum": refused[1]}
    assert gsnr._use_fused(group, torch.device("cpu")) is False
    assert gsnr._use_fused({**group, "gamma": 0.1}, torch.device("cpu")) is _ops.compiler_present("cpu")


@pytest.mark.parametrize("kwargs,needle", [
    ({"name": "lamb", "fused": True, "foreach": True}, "foreach=True with fused=True"),
    ({"name": "lamb", "fused": 1}, "invalid fused=1"),
    ({"name": "tvlars", "fused": True}, "fused path exists for adam, lamb, lars, momentum, sgd"),
    ({"name": "vr-sngm", "fused": True}, "optimizer 'vr-sngm'"),
])
def test_bad_fused_arguments_are_clear_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        lbt.create(kwargs.pop("name"), [torch.zeros(3, requires_grad=True)], **kwargs)


def test_no_recompile_across_steps_and_learning_rates():
    """t is a 0-d tensor and lr a graph input: a schedule changing lr every step compiles nothing new."""
    from torch._dynamo.utils import counters
    w = torch.randn(64, 8, dtype=torch.float64, requires_grad=True)
    opt = lbt.create("vr-lamb", [w], lr=0.1, fused=True)

    def step(lr):
        opt.param_groups[0]["lr"] = lr
        w.grad = torch.randn_like(w)
        opt.set_grad_sq([w.grad * w.grad * 2])
        opt.step()

    step(0.1)
    step(0.05)
    graphs = counters["stats"]["unique_graphs"]
    for lr in (0.04, 0.03, 0.02):
        step(lr)
    assert counters["stats"]["unique_graphs"] == graphs
    assert opt.state[w]["step"] == 5 and opt.state[w]["gsnr_step"] == 5


def test_fused_state_dict_resumes_exactly():
    """A checkpoint of a fused optimizer loads into a foreach one and goes on identically."""
    hp = hparams("vr-adam", "custom")
    full, _ = _run("vr-adam", hp, torch.float64, fused=True)
    params = [t.clone().requires_grad_(True) for t in to_dtype(initial_params(), torch.float64)]
    opt = lbt.create("vr-adam", params, fused=True, **hp)
    for mean, sq in SEQ[:3]:
        for p, g in zip(params, to_dtype(mean, torch.float64)):
            p.grad = g
        opt.set_grad_sq(to_dtype(sq, torch.float64))
        opt.step()
    resumed = lbt.create("vr-adam", params, foreach=True, **hp)
    resumed.load_state_dict(opt.state_dict())
    assert resumed.param_groups[0]["fused"] is True   # the checkpoint's choice comes with it
    for group in resumed.param_groups:
        group["fused"], group["gsnr_fused"] = False, False
    for mean, sq in SEQ[3:STEPS]:
        for p, g in zip(params, to_dtype(mean, torch.float64)):
            p.grad = g
        resumed.set_grad_sq(to_dtype(sq, torch.float64))
        resumed.step()
    for p, q in zip(full, params):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12)
    assert rules.GSNR_SLOT in resumed.state[params[0]]


@pytest.mark.parametrize("name", ["adam", "lamb", "vr-lamb", "vr-momentum"])
def test_accelerator_foreach_branch_equals_per_tensor(name, monkeypatch):
    """The foreach kernels' accelerator branch (few launches, no out=), run here on CPU."""
    from hvd_lb.torch import _ops
    hp = hparams(name, "custom")
    ref, _ = _run(name, hp, torch.float64, foreach=False)
    monkeypatch.setattr(_ops, "out_kernels", lambda device: False)
    monkeypatch.setattr("hvd_lb.torch.optimizers.out_kernels", lambda device: False)
    out, _ = _run(name, hp, torch.float64, foreach=True)
    for p, q in zip(ref, out):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12)


# More than 20 distinct sizes: 0-d, 1-element and empty tensors among them (Dynamo specialises 0 and 1).
MANY = [(), (1,), (0,), (1, 1)] + [(n,) for n in range(2, 12)] + [(n, 3) for n in range(2, 10)]


@pytest.mark.parametrize("name,dtype,tol,wd,flags", [
    ("adam", torch.float64, 1e-12, 0.0321, {"fused": True}), ("lamb", torch.float32, 1e-6, 0.0322, {"fused": True}),
    ("vr-lamb", torch.float32, 1e-6, 0.0323, {"fused": True}),
    ("vr-lamb", torch.float32, 1e-6, 0.0324, {}),   # the default: the GSNR kernel only
], ids=["adam", "lamb", "vr-lamb", "vr-lamb-default"])
def test_many_sizes_one_graph_per_kernel_and_no_eager_fallback(name, dtype, tol, wd, flags):
    """One graph per kernel whatever the sizes; equal to the per-tensor path on every tensor.

    The hyperparameters are this test's own, so each kernel compiles here: its graphs are
    counted exactly (a 0/1-size specialisation would add two, a fallback would compile none).
    """
    from torch._dynamo.utils import counters
    hp = {"lr": 0.01, "weight_decay": wd, **({"gamma": 0.321 + wd} if name.startswith("vr-") else {})}
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in MANY]
    runs = []
    before = counters["stats"]["unique_graphs"]
    for kw in (flags, {"foreach": False}):
        ps = [t.clone().requires_grad_(True) for t in init]
        opt = lbt.OPTIMIZERS[name](ps, **hp, **kw)
        for step in range(3):
            grads = [torch.randn(s, generator=torch.Generator().manual_seed(step), dtype=torch.float64).to(dtype)
                     for s in MANY]
            for p, g in zip(ps, grads):
                p.grad = g
            if opt.rule.gsnr:
                opt.set_grad_sq([2.5 * g * g for g in grads])
            opt.step()
        runs.append(ps)
        if kw is flags:
            assert counters["stats"]["unique_graphs"] - before == (1 if not flags else 2 if opt.rule.gsnr else 1)
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)


def test_channels_last_tensors_share_the_one_graph():
    """Conv weights in ``channels_last`` (dense, not contiguous) of many shapes: still one graph
    for the default GSNR kernel, equal to the per-tensor path."""
    from torch._dynamo.utils import counters
    shapes = [(8, 3, 3, 3), (16, 8, 3, 3), (16, 16, 1, 1), (4, 2, 5, 5), (32, 16, 3, 3), (1, 1, 3, 3)]
    gen = torch.Generator().manual_seed(7)
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    runs, before = [], counters["stats"]["unique_graphs"]
    for kw in ({}, {"foreach": False}):
        ps = [t.clone().to(memory_format=torch.channels_last).requires_grad_(True) for t in init]
        opt = lbt.create("vr-momentum", ps, lr=0.01, gamma=0.3217, **kw)
        for _ in range(2):
            for p, g in zip(ps, grads):
                p.grad = g.to(memory_format=torch.channels_last)
            assert not ps[1].grad.is_contiguous()
            opt.set_grad_sq([2.5 * p.grad * p.grad for p in ps])
            opt.step()
        runs.append(ps)
        if not kw:
            assert counters["stats"]["unique_graphs"] - before == 1
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_recompile_limit_is_an_error_not_a_silent_eager_fallback():
    """Past Dynamo's limit a kernel would run eagerly for the rest of the process; it raises."""
    ps = [torch.ones(2, 3, dtype=dt, requires_grad=True) for dt in (torch.float32, torch.float64)]
    opt = lbt.SGD(ps, lr=0.1, weight_decay=0.0123, fused=True)   # λ of its own: a kernel not compiled before
    for p in ps:
        p.grad = torch.ones_like(p)
    with torch._dynamo.config.patch(recompile_limit=1), pytest.raises(RuntimeError, match="fused=False"):
        opt.step()   # float32 and float64 need two graphs


@pytest.mark.parametrize("noise", [1.0, 0.1, 0.01])
def test_float32_gsnr_paths_within_the_documented_bound(noise):
    """SPEC §7: float32 fused = per-tensor to 1e-6 of max|ḡ| at any variance; foreach (s − ḡ²
    rounded once) differs per element by at most 64u·(s/var)·|ĝ|, u = 2⁻²⁴: r_raw = ḡ²/(s − ḡ²) has
    condition number s/var."""
    import numpy as np
    from hvd_lb import reference
    rng = np.random.default_rng(3)
    signal = rng.standard_normal(4096) * rng.uniform(0.1, 3, 4096)
    samples = [[signal + noise * np.abs(signal) * rng.uniform(0.1, 10, 4096) * rng.standard_normal(4096)]
               for _ in range(8)]
    mean, sq = (torch.tensor(x[0], dtype=torch.float32) for x in reference.gradient_stats(samples))

    def g_hat(**flags):
        w = torch.zeros_like(mean, requires_grad=True)
        opt = lbt.GSNR(torch.optim.SGD([w], lr=1.0, foreach=flags.pop("foreach", False)), gamma=0.1, **flags)
        w.grad = mean.clone()
        opt.set_grad_sq([sq.clone()])
        opt.step()
        return -w.detach().double()

    single, fused, foreach = g_hat(), g_hat(fused=True), g_hat(foreach=True)
    top = float(mean.abs().max())
    assert float((fused - single).abs().max()) <= 1e-6 * top
    s, g = sq.double(), mean.double()
    cond = s / torch.clamp(s - g * g, min=2.0 ** -21 * s)
    assert bool(((foreach - single).abs() <= 64 * 2.0 ** -24 * cond * single.abs() + 1e-7 * top).all())


def test_hyperparameters_changing_every_step_are_an_error_not_a_compile_per_step(monkeypatch):
    """OneCycleLR cycles momentum by default: each value would be a new compiled kernel."""
    from hvd_lb.torch import _ops
    monkeypatch.setattr(_ops, "_KEYS", {})  # this test's keys only
    w = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = lbt.create("momentum", [w], lr=0.1, fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=40)
    with pytest.raises(RuntimeError, match="fused=False, or schedule lr only"):
        for _ in range(40):
            w.grad = torch.ones_like(w)
            opt.step()
            sched.step()

