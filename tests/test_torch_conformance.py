"""torch.optim's optimizer contract, checked on every hvd_lb optimizer (issue 17).

The generic test bodies of PyTorch's ``test/test_optim.py`` (hooks, state dicts, deepcopy and
pickle, closures, tensor lr, complex parameters, ``torch.compile``, schedulers, implementations
equal), written anew and run on one parametrisation of *subjects*: every hvd_lb base rule, every
``vr-`` rule, ``GSNR`` in front of torch's AdamW and SGD, hvd_lb's ``DistributedOptimizer`` around
a base rule and around GSNR (in-process Horovod, size 1, ``micro_batches=2``), and torch's own
SGD and AdamW as controls: a test that a control fails is a wrong test.

Only the public API is used. One harness drives every subject alike: each step has two gradient
samples per parameter (g₁, g₂); ḡ = g₁ + g₂ goes into ``p.grad`` and, for a GSNR optimizer in one
process, s = 2(g₁² + g₂²) (SPEC §1 with M = 2, x_m = 2g_m) into ``set_grad_sq``; a
``DistributedOptimizer`` gets two real backward passes instead and computes both itself.
"""
from __future__ import annotations

import copy
import gc
import io
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import hvd_lb.torch as lbt
from hvd_lb import rules
from hvd_lb.torch.optimizers import KERNELS

M = 2  # gradient samples per step: micro-batches of the DistributedOptimizer subjects
STEPS = 3
# Constructor values that differ from every default, so that "the constructor's values" is visible.
HP = {"lr": 0.0123, "weight_decay": 0.1, "momentum": 0.5, "gamma": 0.3}


@dataclass
class Subject:
    """An optimizer under test: ``make(params, **overrides)`` and what it supports."""

    name: str
    make: Callable
    hp: Dict[str, float]                      # its constructor's values, as the param groups hold them
    gsnr: bool = False                        # needs s before each step
    dist: bool = False                        # a DistributedOptimizer: M backward passes per step
    impls: List[Dict] = field(default_factory=list)   # foreach / per-tensor / fused variants
    maximize: bool = False

    def __repr__(self):
        return self.name


_HVD = []


def _hvd():
    """``hvd.init()`` once in this process (size 1)."""
    if not _HVD:
        hvd = pytest.importorskip("horovod.torch")
        hvd.init()
        _HVD.append(hvd)
    return _HVD[0]


def _rule(name: str) -> Subject:
    rule = rules.get_rule(name)
    hp = {k: v for k, v in HP.items() if k in rule.defaults}
    impls = [{"foreach": False}, {"foreach": True}] + ([{}] if rule.gsnr else [])  # {}: the GSNR kernel, auto
    if KERNELS[rule.base].fused is not None:
        impls.append({"fused": True})
    return Subject(name, lambda ps, **kw: lbt.OPTIMIZERS[name](ps, **{**hp, **kw}), hp, gsnr=rule.gsnr,
                   impls=impls)


def _gsnr_make(inner_cls, inner_hp):
    def make(ps, fused=None, **kw):
        inner = inner_cls(ps, **{**inner_hp, **kw})
        return lbt.GSNR(inner, gamma=HP["gamma"], fused=fused)
    return make


def _dist(inner: Subject) -> Subject:
    def make(ps, **kw):
        _hvd()
        return lbt.DistributedOptimizer(inner.make(ps, **kw), micro_batches=M)
    return Subject("Distributed(" + inner.name + ")", make, inner.hp, gsnr=False, dist=True,
                   impls=inner.impls, maximize=inner.maximize)


_ADAMW = {"lr": HP["lr"], "weight_decay": HP["weight_decay"]}
_SGD = {"lr": HP["lr"], "weight_decay": HP["weight_decay"], "momentum": HP["momentum"]}
_TORCH_IMPLS = [{"foreach": False}, {"foreach": True}, {"fused": True}]

GSNR_ADAMW = Subject("GSNR(AdamW)", _gsnr_make(torch.optim.AdamW, _ADAMW), {**_ADAMW, "gamma": HP["gamma"]},
                     gsnr=True, impls=_TORCH_IMPLS + [{}], maximize=True)
GSNR_SGD = Subject("GSNR(SGD)", _gsnr_make(torch.optim.SGD, _SGD), {**_SGD, "gamma": HP["gamma"]},
                   gsnr=True, impls=_TORCH_IMPLS + [{}], maximize=True)
CONTROLS = [
    Subject("torch.SGD", lambda ps, **kw: torch.optim.SGD(ps, **{**_SGD, **kw}), _SGD, impls=_TORCH_IMPLS,
            maximize=True),
    Subject("torch.AdamW", lambda ps, **kw: torch.optim.AdamW(ps, **{**_ADAMW, **kw}), _ADAMW,
            impls=_TORCH_IMPLS, maximize=True),
]
SUBJECTS = ([_rule(n) for n in rules.BASE_NAMES] + [_rule("vr-" + n) for n in rules.BASE_NAMES]
            + [GSNR_ADAMW, GSNR_SGD, _dist(_rule("lamb")), _dist(GSNR_ADAMW)] + CONTROLS)


@pytest.fixture(params=SUBJECTS, ids=[s.name for s in SUBJECTS])
def subject(request):
    return request.param


# --- the harness ------------------------------------------------------------------------------

def params_of(opt) -> List[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def leaves(shapes=((4, 3), (3,)), dtype=torch.float64, seed=0) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True) for s in shapes]


def clones(ps) -> List[torch.Tensor]:
    return [p.detach().clone().requires_grad_(p.requires_grad) for p in ps]


def samples(ps, step: int):
    """(g₁, g₂) per parameter for ``step``, in the parameter's dtype (the same values for any dtype;
    a complex parameter gets those of its real view)."""
    gen = torch.Generator().manual_seed(1000 + step)
    out = []
    for p in ps:
        shape = torch.view_as_real(p).shape if p.is_complex() else p.shape
        pair = []
        for _ in range(M):
            g = torch.randn(shape, generator=gen, dtype=torch.float64) + 0.5
            pair.append(torch.view_as_complex(g.to(p.real.dtype).contiguous()) if p.is_complex() else g.to(p.dtype))
        out.append(tuple(pair))
    return out


def _square(g):
    """x² per real component: a complex tensor's s holds mean(re²) + i·mean(im²)."""
    wide = torch.promote_types(g.real.dtype, torch.float32)
    if g.is_complex():
        r = torch.view_as_real(g).to(wide)
        return torch.view_as_complex((r * r).contiguous())
    return g.to(wide) * g.to(wide)


def give_grads(subject: Subject, opt, step: int, with_grad: Optional[List[bool]] = None, sign: float = 1.0):
    """This step's gradients as the subject takes them (``sign``·samples); returns ⟨w, ḡ⟩, a tensor."""
    ps = params_of(opt)
    use = [True] * len(ps) if with_grad is None else with_grad
    pairs = [tuple(sign * g for g in pair) for pair in samples(ps, step)]
    loss = torch.zeros((), dtype=torch.float64)
    if subject.dist:
        for m in range(M):
            total = sum(_inner(p, pair[m]) for p, pair, u in zip(ps, pairs, use) if u)
            total.backward()
            loss = loss + total.detach().double()
        return loss
    for p, (g1, g2), u in zip(ps, pairs, use):
        p.grad = (g1 + g2) if u else None
        if u:
            loss = loss + _inner(p.detach(), g1 + g2).double()
    if subject.gsnr:
        opt.set_grad_sq([M * (_square(g1) + _square(g2)) if u else None for (g1, g2), u in zip(pairs, use)])
    return loss


def _inner(p, g):
    """⟨p, g⟩ over real components: its gradient with respect to p is g (complex included)."""
    if p.is_complex():
        return (torch.view_as_real(p) * torch.view_as_real(g)).sum()
    return (p * g).sum()


def run(subject: Subject, opt, steps=STEPS, first=1, step_fn=None, **kw):
    for t in range(first, first + steps):
        give_grads(subject, opt, t, **kw)
        (step_fn or opt.step)()
        opt.zero_grad()
    return opt


def assert_same(a, b, tol=1e-12):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        x, y = x.detach(), y.detach()
        if x.is_complex():
            x = torch.view_as_real(x)
        if y.is_complex():
            y = torch.view_as_real(y)
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def fresh_run(subject, steps=STEPS, **kw):
    ps = leaves()
    return params_of(run(subject, subject.make(ps, **kw), steps))


# --- hooks ------------------------------------------------------------------------------------

def test_repr_names_every_group(subject):
    opt = subject.make(leaves())
    opt.add_param_group({"params": leaves(((2,),), seed=3)})
    assert "Parameter Group 1" in repr(opt)


def test_step_hooks_run_once_per_step(subject):
    opt = subject.make(leaves())
    calls = []
    handles = [opt.register_step_pre_hook(lambda o, a, k: calls.append("pre")),
               opt.register_step_post_hook(lambda o, a, k: calls.append("post")),
               register_optimizer_step_pre_hook(lambda o, a, k: calls.append("gpre")),
               register_optimizer_step_post_hook(lambda o, a, k: calls.append("gpost"))]
    try:
        run(subject, opt, steps=2)
    finally:
        for h in handles:
            h.remove()
    assert sorted(calls) == sorted(["pre", "post", "gpre", "gpost"] * 2)


def test_state_dict_hooks(subject):
    opt = run(subject, subject.make(leaves()), steps=1)
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("pre"))

    def post(o, sd):
        seen.append("post")
        sd["extra"] = 42
        return sd

    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert seen == ["pre", "post"] and sd["extra"] == 42


def test_load_state_dict_hooks(subject):
    src = run(subject, subject.make(leaves()), steps=2)
    sd = copy.deepcopy(src.state_dict())
    opt = subject.make(clones(params_of(src)))
    seen = []

    def pre(o, state_dict):
        seen.append("pre")
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][0]["lr"] = 0.005
        return state_dict

    def post(o):
        seen.append("post")
        o.state["ran_post_hook"] = True   # torch's own test leaves a non-dict entry in state

    opt.register_load_state_dict_pre_hook(pre)
    opt.register_load_state_dict_post_hook(post)
    opt.load_state_dict(sd)
    assert seen == ["pre", "post"] and opt.state["ran_post_hook"] is True
    assert opt.param_groups[0]["lr"] == 0.005 and sd["param_groups"][0]["lr"] == HP["lr"]
    run(subject, opt, steps=1, first=3)


# --- param groups -------------------------------------------------------------------------------

def test_add_param_group_gets_the_constructors_values(subject):
    a, b = leaves(), leaves(((2, 2),), seed=1)
    opt = subject.make(a)
    opt.add_param_group({"params": b})
    new = opt.param_groups[-1]
    assert {k: new[k] for k in subject.hp} == subject.hp
    run(subject, opt, steps=1)


def test_empty_and_duplicate_params_are_refused(subject):
    with pytest.raises(ValueError, match="empty"):
        subject.make([])
    ps = leaves()
    opt = subject.make(ps[:1])
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": ps})


# --- copies and checkpoints ---------------------------------------------------------------------

def _copy_steps_identically(subject, duplicate):
    opt = run(subject, subject.make(leaves()), steps=2)
    other = duplicate(opt)
    assert params_of(other)[0] is not params_of(opt)[0]
    assert_same(params_of(other), params_of(opt), 0)
    run(subject, opt, steps=2, first=3)
    run(subject, other, steps=2, first=3)
    assert_same(params_of(other), params_of(opt))


def test_deepcopy_steps_identically(subject):
    _copy_steps_identically(subject, copy.deepcopy)


def test_pickle_steps_identically(subject):
    def through_torch_save(opt):
        buf = io.BytesIO()
        torch.save(opt, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)
    _copy_steps_identically(subject, through_torch_save)


def test_state_dict_round_trip_steps_identically(subject):
    opt = run(subject, subject.make(leaves()), steps=2)
    sd = copy.deepcopy(opt.state_dict())
    other = subject.make(clones(params_of(opt)))
    other.load_state_dict(sd)
    run(subject, opt, steps=2, first=3)
    run(subject, other, steps=2, first=3)
    assert_same(params_of(other), params_of(opt))
    a, b = opt.state_dict(), other.state_dict()
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()


# Group keys that optimizers gained over their versions: checkpoints from before lack them.
LATER_KEYS = ("foreach", "fused", "maximize", "differentiable", "capturable", "decoupled_weight_decay",
              "gsnr_fused", "gsnr_exclude")


def test_older_state_dict_loads_and_steps(subject):
    opt = run(subject, subject.make(leaves()), steps=2)
    sd = copy.deepcopy(opt.state_dict())
    for group in sd["param_groups"]:
        for key in LATER_KEYS:
            group.pop(key, None)
    for st in sd["state"].values():
        if isinstance(st.get("step"), torch.Tensor):
            st["step"] = st["step"].item()
    other = subject.make(clones(params_of(opt)))
    other.load_state_dict(sd)
    run(subject, opt, steps=2, first=3)
    run(subject, other, steps=2, first=3)
    assert_same(params_of(other), params_of(opt))


# --- step ----------------------------------------------------------------------------------------

def test_step_with_closure_runs_it_once_and_returns_its_loss(subject):
    opt = subject.make(leaves())
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        return give_grads(subject, opt, 1)

    loss = opt.step(closure)
    assert len(calls) == 1 and torch.is_tensor(loss)
    ref = fresh_run(subject, steps=1)
    assert_same(params_of(opt), ref)


@pytest.mark.parametrize("kind", ["tensor", "numpy"])
def test_tensor_and_numpy_lr(subject, kind):
    """A 0-d tensor lr, or a NumPy scalar, steps as the same Python float does (NumPy 2 keeps
    float32 arithmetic on an np.float32 lr in torch.optim: float32 rounding)."""
    lr = torch.tensor(HP["lr"], dtype=torch.float64) if kind == "tensor" else np.float32(HP["lr"])
    assert_same(fresh_run(subject, lr=lr), fresh_run(subject, lr=float(lr)), 1e-12 if kind == "tensor" else 1e-6)


def test_negative_lr_is_refused(subject):
    with pytest.raises(ValueError, match=r"-0\.5"):
        subject.make(leaves(), lr=-0.5)


def test_params_without_grad_are_untouched(subject):
    ps = leaves(((4, 3), (3,), (2, 2)))
    opt = subject.make(ps)
    before = [p.detach().clone() for p in ps]
    state_before = copy.deepcopy({i: dict(opt.state[p]) for i, p in enumerate(ps) if p in opt.state})
    run(subject, opt, steps=2, with_grad=[True, False, True])
    assert torch.equal(ps[1].detach(), before[1])
    assert not torch.equal(ps[0].detach(), before[0])
    assert ps[1].grad is None
    st = opt.state.get(ps[1])
    if 1 in state_before:    # state built eagerly (hvd_lb's rules): still as built
        assert set(st) == set(state_before[1])
        for k, v in state_before[1].items():
            assert torch.equal(torch.as_tensor(st[k]), torch.as_tensor(v)), k
    else:                    # built at the first step with a gradient (torch.optim): none
        assert not st


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(subject, set_to_none):
    opt = subject.make(leaves())
    give_grads(subject, opt, 1)
    opt.step()
    opt.zero_grad(set_to_none=set_to_none)
    for p in params_of(opt):
        assert p.grad is None if set_to_none else torch.equal(p.grad, torch.zeros_like(p))


def test_complex_params_equal_their_real_view(subject):
    cs = [torch.randn(5, 4, dtype=torch.complex128, generator=torch.Generator().manual_seed(1)),
          torch.randn(3, dtype=torch.complex128, generator=torch.Generator().manual_seed(2)),
          torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))]
    cs = [c.requires_grad_(True) for c in cs]
    rs = [torch.view_as_real(c).detach().clone().requires_grad_(True) if c.is_complex() else
          c.detach().clone().requires_grad_(True) for c in cs]
    run(subject, subject.make(cs))
    run(subject, subject.make(rs))
    assert_same(cs, rs)


def test_bfloat16_params_follow_a_float32_run(subject):
    """bf16 parameters: within bf16 rounding (a few units of 2⁻⁸ relative) of the float32 run."""
    lo = leaves(dtype=torch.bfloat16)
    hi = [p.detach().float().requires_grad_(True) for p in lo]
    run(subject, subject.make(lo))
    run(subject, subject.make(hi))
    for a, b in zip(lo, hi):
        assert a.dtype == torch.bfloat16
        scale = float(b.detach().abs().max())
        torch.testing.assert_close(a.detach().float(), b.detach(), rtol=0, atol=(STEPS + 1) * 2 ** -8 * scale)


def test_compiled_step_equals_eager(subject):
    """``torch.compile(opt.step)``: within 1e-6 (torch's compiled Adam keeps t as a float32 tensor)."""
    torch._dynamo.reset()
    opt = subject.make(leaves())
    run(subject, opt, steps=2, step_fn=torch.compile(opt.step))
    assert_same(params_of(opt), fresh_run(subject, steps=2), 1e-6)


@pytest.mark.parametrize("sched", ["StepLR", "OneCycleLR"])
def test_lr_scheduler_drives_lr(subject, sched):
    opt = subject.make(leaves())
    if sched == "StepLR":
        s = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    else:
        s = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS + 1, cycle_momentum=False)
    lrs = []
    manual = subject.make(leaves())
    for t in range(1, STEPS + 1):
        lrs.append(opt.param_groups[0]["lr"])
        give_grads(subject, opt, t)
        opt.step()
        opt.zero_grad()
        s.step()
        for g in manual.param_groups:
            g["lr"] = lrs[-1]
        give_grads(subject, manual, t)
        manual.step()
        manual.zero_grad()
    assert len(set(lrs)) == STEPS
    assert_same(params_of(opt), params_of(manual))


def test_implementations_are_equal(subject):
    """foreach, per-tensor and fused: the same numbers (float64, parameters of 0-d to 2-d)."""
    shapes = ((4, 3), (3,), (), (1,))
    outs = []
    for impl in subject.impls:
        ps = leaves(shapes)
        outs.append((impl, params_of(run(subject, subject.make(ps, **impl)))))
    for impl, out in outs[1:]:
        assert_same(out, outs[0][1], 1e-10)


def test_maximize_or_a_clear_error(subject):
    """maximize=True on ḡ is minimising on −ḡ; a rule without it refuses the argument."""
    if not subject.maximize:
        with pytest.raises(ValueError, match="maximize"):
            subject.make(leaves(), maximize=True)
        return
    up = run(subject, subject.make(leaves(), maximize=True))
    down = run(subject, subject.make(leaves()), sign=-1.0)
    assert_same(params_of(up), params_of(down))


# --- Horovod wrapper ------------------------------------------------------------------------------

def test_second_distributed_optimizer_after_deleting_the_first(subject):
    """``DistributedOptimizer`` (micro_batches=2) of the subject, deleted, then a second one."""
    dist = subject if subject.dist else _dist(subject)
    ps = leaves()
    first = run(dist, dist.make(ps), steps=1)
    del first
    gc.collect()
    for p in ps:
        p.grad = None
    start = clones(ps)
    second = run(dist, dist.make(ps), steps=2)
    ref = run(dist, dist.make(start), steps=2)
    assert_same(params_of(second), params_of(ref))
