"""Every rule of docs/SPEC.md §4 as a ``torch.optim.Optimizer``.

One base class drives every base rule: the rule table (``hvd_lb.rules``) gives
hyperparameters, defaults, ranges and state slots; the maths is
``hvd_lb.formulas`` on torch tensors.  Each base rule is one kernel entry
(``register``) with two implementations side by side:

* per-tensor (``foreach=False``): readable, every formula called as written;
* multi-tensor (``foreach=True``, the default): the element-wise parts as
  in-place ``torch._foreach_*`` kernels, the per-tensor scalars (trust ratios,
  φ_t, global norm) through the same ``formulas`` functions on stacked norms.

Both are tested equal to the float64 NumPy reference and to each other.  A
``vr-X`` class is ``X`` with the GSNR transform in front (``hvd_lb.torch.gsnr``).

State slot names are exactly ``rules.Rule.slots`` plus ``step`` (t of SPEC,
1 on the first ``step()``).  State is allocated when parameters are added, so
``hvd.broadcast_optimizer_state`` and "load on rank 0, broadcast" resume work
without a dummy step; TVLARS sets m_1 = w_1 at t = 1, whatever the buffer held.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import torch

from .. import formulas, grouping, rules
from ._ops import (NARROW, T, compile_kernel, flat, graph_scalar, keep_wide_state, out_kernels, real_view,
                   run_closure, scratch, specialized_floats, state_dtype)
from .gsnr import param_name, vr_class


def _norms(tensors: List[torch.Tensor]) -> torch.Tensor:
    return torch.stack(torch._foreach_norm(tensors))


def _real_state(st: Dict[str, Any]) -> Dict[str, Any]:
    """A complex parameter's state with its slots as real views (kernels update them in place)."""
    return {k: real_view(v) if isinstance(v, torch.Tensor) else v for k, v in st.items()}


def _scalars(vec: torch.Tensor) -> List[torch.Tensor]:
    # 0-dim tensors broadcast in _foreach_mul_ without a host sync.
    return list(vec.unbind())


class Kernel(NamedTuple):
    """One base rule on torch: ``fn(group, ps, gs, states, shared)`` per group, two or three ways.

    ``prepare(work)`` (optional) computes what every group shares (SNGM's global
    norm) from ``[(group, ps, gs, states), ...]`` before the per-group calls.
    ``fused`` (optional, ``fused=True``): the per-tensor update compiled; see ``per_tensor``.
    """

    single: Callable
    foreach: Callable
    prepare: Optional[Callable] = None
    fused: Optional[Callable] = None


def per_tensor(one: Callable, slots, consts: Callable):
    """(single, fused) kernels from ``one(p, g, *state[slots], t, lr, **consts(group))``.

    ``one`` updates one tensor in place, written with ``formulas`` as the SPEC reads.
    ``single`` calls it as written (t an int, lr as the group holds it); ``fused`` calls
    it through ``torch.compile`` (Inductor: C++ on CPU, Triton on GPU) on flattened
    tensors, with t and lr as 0-d tensors (``graph_scalar``) so that neither steps nor
    schedules recompile, the hyperparameters as constants: the rule's element-wise maths
    becomes one or two loops over memory instead of a dozen foreach passes.
    """
    def single(group, ps, gs, states, _):
        kw = consts(group)
        for p, g, st in zip(ps, gs, states):
            one(p, g, *[st[k] for k in slots], st["step"], group["lr"], **kw)

    def fused(group, ps, gs, states, _):
        kw, ts, lrs = consts(group), {}, {}
        fn = compile_kernel(one, tuple(sorted(kw.items())))
        with specialized_floats():
            for p, g, st in zip(ps, gs, states):
                fn(*flat(p, g, *[st[k] for k in slots]), graph_scalar(st["step"], p.device, ts),
                   graph_scalar(group["lr"], p.device, lrs), **kw)

    return single, fused


KERNELS: Dict[str, Kernel] = {}
_LR = rules.LR(0.0)  # the range an lr set after construction is checked against at step time
OPTIMIZERS: Dict[str, type] = {}


class LargeBatchOptimizer(torch.optim.Optimizer):
    """Base of every hvd_lb torch optimizer; subclasses only set ``rule_name``.

    ``params`` may be tensors or param-group dicts; every group carries all
    hyperparameters of the rule plus ``adapt`` (trust ratio on/off), ``decay``
    (weight decay on/off), ``foreach`` (None = multi-tensor path) and ``fused``.

    ``fused=True`` runs the rule's per-tensor update through ``torch.compile`` (see
    ``per_tensor``; ``vr-*`` classes fuse the GSNR maths too). Measured on 2 CPU cores
    (``bench/real_shapes.py``, ResNet-18 shapes): ``vr-lamb`` steps 1.5–1.8× faster than
    foreach, and the first step compiles for 22 s (5 s with Inductor's on-disk cache warm).
    ``fused=None`` (default) leaves the update on foreach, as torch.optim does, while a
    ``vr-*`` class compiles its GSNR maths where a compiler is present (``gsnr_fused``
    auto, see ``GSNR``); ``fused=False`` keeps both on foreach. The update stays opt-in: it
    is a kernel per rule and hyperparameter set (a momentum or betas schedule, OneCycleLR's
    default, would compile every step, which ``_ops.compile_kernel`` refuses), and torch
    2.13's Inductor miscompiled two of these kernels until they were written around it
    (``_ops.specialized_floats``, ``gsnr._gsnr_into``), so another torch version is only as
    safe as ``tests/test_torch_fused.py`` says.
    """

    rule_name: str = ""

    @property
    def rule(self) -> rules.Rule:
        """The table entry of ``rule_name``: a class attribute, so copies and pickles keep it."""
        return rules.RULES[self.rule_name]

    def __init__(self, params, lr: Optional[float] = None, *, adapt: bool = True, decay: bool = True,
                 foreach: Optional[bool] = None, fused: Optional[bool] = None, **hparams):
        if lr is not None:
            hparams["lr"] = lr
        defaults = self._validated(hparams)
        defaults["adapt"] = rules.check_bool("adapt", adapt)
        defaults["decay"] = rules.check_bool("decay", decay)
        defaults["foreach"] = rules.check_bool("foreach", foreach, allow_none=True)
        defaults["fused"] = rules.check_bool("fused", fused, allow_none=True)
        self._param_names: Dict[torch.Tensor, str] = {}
        super().__init__(params, defaults)

    def _validated(self, hparams: Dict[str, Any]) -> Dict[str, Any]:
        """``rules.validate`` that also takes a 1-element tensor lr (kept as given, as torch.optim does).

        Its value is checked here, once (a device sync at construction, none per step).
        """
        lr = hparams.get("lr")
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1 or lr.is_complex() or not lr.is_floating_point():
                raise ValueError(f"invalid lr={lr!r} for optimizer '{self.rule.name}': a tensor lr must "
                                 "have one real floating-point element, in [0, inf)")
            hparams = dict(hparams, lr=lr.item())
        out = rules.validate(self.rule.name, hparams)
        if isinstance(lr, torch.Tensor):
            out["lr"] = lr
        return out

    def __getstate__(self) -> Dict[str, Any]:
        # torch's keeps defaults, state and param_groups only; the names serve diagnostics.
        return {**super().__getstate__(), "_param_names": self._param_names}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """Unpickling and ``load_state_dict``: groups of older versions get the keys added since."""
        super().__setstate__(state)
        self.__dict__.setdefault("_param_names", {})
        fill = {**self.rule.defaults, "adapt": True, "decay": True, "foreach": None, "fused": None}
        for group in self.param_groups:
            for key, value in fill.items():
                group.setdefault(key, self.defaults.get(key, value))

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group; its hyperparameters are checked against the rule table."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        hp = {h.name: group[h.name] for h in self.rule.hypers}
        group.update(self._validated(hp))
        for flag in ("adapt", "decay"):
            group[flag] = rules.check_bool(flag, group[flag])
        group["foreach"] = rules.check_bool("foreach", group["foreach"], allow_none=True)
        group["fused"] = rules.check_bool("fused", group.get("fused"), allow_none=True)
        if group["fused"]:
            if group["foreach"]:
                raise ValueError("invalid foreach=True with fused=True: choose one")
            if KERNELS[self.rule.base].fused is None:
                have = ", ".join(sorted(k for k, v in KERNELS.items() if v.fused is not None))
                raise ValueError(f"invalid fused=True for optimizer '{self.rule.name}': the fused "
                                 f"path exists for {have}")
        for p in group["params"]:
            if p.is_sparse:
                raise ValueError("invalid params: sparse parameters are not supported")
            self._init_state(p)

    def _init_state(self, p: torch.Tensor) -> None:
        state = self.state[p]
        if state:
            return
        state["step"] = 0
        dtype = state_dtype(p)
        for slot in self.rule.slots:
            # prev_iterate starts as w; it is set again to w_1 at t = 1.
            state[slot] = p.detach().to(dtype, copy=True) if slot == "prev_iterate" else \
                torch.zeros_like(p, dtype=dtype)

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        keep_wide_state(self, state_dict)

    def param_name(self, p: torch.Tensor) -> str:
        return param_name(self, p)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient."""
        loss = run_closure(closure)
        kernel = KERNELS[self.rule.base]
        work, narrow = [], []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            if not isinstance(group["lr"], torch.Tensor):
                _LR.check(group["lr"], self.rule.name)  # a Python float: no device sync
            for p in ps:
                if p.grad.is_sparse:
                    raise RuntimeError(f"optimizer '{self.rule.name}' does not take sparse gradients "
                                       "(hvd_lb.torch.DistributedOptimizer densifies them)")
            states = [self.state[p] for p in ps]
            for st in states:
                st["step"] += 1
            # What the kernels update: the parameter, its real view (complex), or a float32
            # copy written back below (16-bit).
            wide = [p.float() if p.dtype in NARROW else real_view(p) for p in ps]
            narrow.extend((p, w) for p, w in zip(ps, wide) if p.dtype in NARROW)
            work.append((group, wide, [p.grad.float() if p.dtype in NARROW else real_view(p.grad) for p in ps],
                         [_real_state(st) if p.is_complex() else st for p, st in zip(ps, states)]))
        shared = kernel.prepare(work) if kernel.prepare is not None and work else None
        for group, ps, gs, states in work:
            fn = (kernel.fused if group.get("fused") else
                  kernel.single if group["foreach"] is False else kernel.foreach)
            fn(group, ps, gs, states, shared)
        for p, w in narrow:
            p.copy_(w)
        return loss


def _doc(rule: rules.Rule) -> str:
    hp = ", ".join(f"{h.name}={h.default!r}" for h in rule.hypers)
    return (f"``{rule.name}``: {rule.doc}.\n\nHyperparameters (defaults): {hp}.\n"
            f"State slots: {', '.join(rule.slots) or 'none'} (+ step).")


def register(name: str, single: Callable, foreach: Callable, prepare: Optional[Callable] = None,
             fused: Optional[Callable] = None):
    """Add base rule ``name``'s kernels and create its classes (``X`` and ``VRX``).

    The rule must be in the table first (``rules.register``); see docs/CONTRIBUTING.md.
    ``fused`` is optional (``per_tensor`` makes it); without it ``fused=True`` is refused.
    """
    base, vr = rules.get_rule(name), rules.get_rule("vr-" + name)
    if base.gsnr:
        raise ValueError(f"invalid name {name!r}: register the base rule; its vr- twin follows")
    KERNELS[name] = Kernel(single, foreach, prepare, fused)
    cls = type(base.class_name, (LargeBatchOptimizer,),
               {"rule_name": base.name, "__doc__": _doc(base), "__module__": __name__})
    OPTIMIZERS[name] = cls
    OPTIMIZERS[vr.name] = vr_class(cls, vr)
    OPTIMIZERS[vr.name].__doc__, OPTIMIZERS[vr.name].__module__ = _doc(vr), __name__
    globals()[base.class_name], globals()[vr.class_name] = cls, OPTIMIZERS[vr.name]
    return cls


# ---------------------------------------------------------------------------------------
# The base rules, one register() call each: per-tensor (formulas as written; where the
# update is a per-tensor function ``one``, ``per_tensor`` also gives the fused kernel) and
# foreach (the same equations, in place), side by side.

def _decayed(group, p, g):
    """d = g + λw where the group decays."""
    return g + group["weight_decay"] * p if group["decay"] else g


def _decayed_foreach(group, ps, gs):
    """d = g + λw (a new list when it differs from g; never modify the result in place)."""
    if group["decay"] and group["weight_decay"] != 0.0:
        return torch._foreach_add(gs, ps, alpha=group["weight_decay"])
    return gs


def _wd(group) -> float:
    """λ where the group decays, else 0."""
    return group["weight_decay"] if group["decay"] else 0.0


# The ``one`` functions add λw even where λ = 0: a branch on a float would be one more
# compiled variant (torch.compile keeps eight per function).

def _sgd_one(p, g, t, lr, *, wd):
    p.sub_(lr * (g + wd * p))


def _foreach_sgd(group, ps, gs, states, _):
    torch._foreach_add_(ps, _decayed_foreach(group, ps, gs), alpha=-group["lr"])


_single_sgd, _fused_sgd = per_tensor(_sgd_one, (), lambda group: {"wd": _wd(group)})
register("sgd", _single_sgd, _foreach_sgd, fused=_fused_sgd)


def _momentum_one(p, g, buf, t, lr, *, mu, wd, nesterov):
    d = g + wd * p
    buf.mul_(mu).add_(d)
    p.sub_(lr * (d + mu * buf if nesterov else buf))


def _foreach_momentum(group, ps, gs, states, _):
    mu = group["momentum"]
    d = _decayed_foreach(group, ps, gs)
    bufs = [st["momentum_buffer"] for st in states]
    torch._foreach_mul_(bufs, mu)
    torch._foreach_add_(bufs, d)
    out = torch._foreach_add(d, bufs, alpha=mu) if group["nesterov"] else bufs
    torch._foreach_add_(ps, out, alpha=-group["lr"])


_single_momentum, _fused_momentum = per_tensor(
    _momentum_one, ("momentum_buffer",),
    lambda group: {"mu": group["momentum"], "wd": _wd(group), "nesterov": group["nesterov"]})
register("momentum", _single_momentum, _foreach_momentum, fused=_fused_momentum)


def _adam_one(p, g, m, v, t, lr, *, b1, b2, eps, wd, lamb, max_trust):
    """Adam, u = m̂/(√v̂ + ε) + λw, w ← w − lr·u (SPEC §3); LAMB scales u by ‖w‖/‖u‖ first."""
    u, m_new, v_new = formulas.adam_direction(T, g, m, v, b1, b2, eps, t)
    m.copy_(m_new)
    v.copy_(v_new)
    u = u + wd * p
    if lamb:
        u = formulas.lamb_trust(T, T.norm(p), T.norm(u), max_trust) * u
    p.sub_(lr * u)


def _adam_consts(group, lamb=False):
    b1, b2 = group["betas"]
    return {"b1": b1, "b2": b2, "eps": group["eps"], "wd": _wd(group), "lamb": lamb,
            "max_trust": group.get("max_trust")}


def _foreach_adam_u(group, ps, gs, states):
    """u = m̂/(√v̂ + ε) + λw (formulas.adam_direction, in place) in the parameters' scratch.

    With c_i = 1 − β_i^t: m̂/(√v̂ + ε) = (√c₂/c₁)·m/(√v + ε√c₂). No list is allocated.
    """
    b1, b2 = group["betas"]
    ms = [st["exp_avg"] for st in states]
    vs = [st["exp_avg_sq"] for st in states]
    c1 = [1.0 - b1 ** st["step"] for st in states]
    c2 = [1.0 - b2 ** st["step"] for st in states]
    torch._foreach_lerp_(ms, gs, 1.0 - b1)                    # m = β₁m + (1 − β₁)g
    torch._foreach_mul_(vs, b2)
    torch._foreach_addcmul_(vs, gs, gs, value=1.0 - b2)       # v = β₂v + (1 − β₂)g²
    u = scratch(ps)
    eps_hat = [group["eps"] * math.sqrt(c) for c in c2]
    if out_kernels(ps[0].device):
        # One pass each and nothing allocated: on CPU foreach has no out= but a copy.
        for ui, vi in zip(u, vs):
            torch.sqrt(vi, out=ui)
        torch._foreach_add_(u, eps_hat)
        for ui, mi in zip(u, ms):
            torch.div(mi, ui, out=ui)
    else:   # few launches on accelerators
        torch._foreach_copy_(u, vs)
        torch._foreach_sqrt_(u)
        torch._foreach_add_(u, eps_hat)
        torch._foreach_reciprocal_(u)
        torch._foreach_mul_(u, ms)
    torch._foreach_mul_(u, [math.sqrt(b) / a for a, b in zip(c1, c2)])
    wd = _wd(group)
    if wd != 0.0:
        torch._foreach_add_(u, ps, alpha=wd)
    return u


def _foreach_adam(group, ps, gs, states, _):
    torch._foreach_add_(ps, _foreach_adam_u(group, ps, gs, states), alpha=-group["lr"])


_single_adam, _fused_adam = per_tensor(_adam_one, ("exp_avg", "exp_avg_sq"), _adam_consts)
register("adam", _single_adam, _foreach_adam, fused=_fused_adam)


def _lars_one(p, g, buf, t, lr, *, mu, wd, adapt, trust_coefficient, eps, trust_clip, nesterov):
    d = g + wd * p
    if adapt:
        trust = formulas.lars_trust(T, T.norm(p), T.norm(g), trust_coefficient, eps, wd)
        upd = formulas.lars_scale(T, trust, lr, trust_clip) * d
    else:
        upd = lr * d
    buf.mul_(mu).add_(upd)
    p.sub_(upd + mu * buf if nesterov else buf)


def _foreach_lars(group, ps, gs, states, _):
    mu = group["momentum"]
    wd = _wd(group)
    d = torch._foreach_add(gs, ps, alpha=wd) if wd != 0.0 else gs
    if group["adapt"]:
        trust = formulas.lars_trust(T, _norms(ps), _norms(gs), group["trust_coefficient"], group["eps"], wd)
        upd = torch._foreach_mul(d, _scalars(formulas.lars_scale(T, trust, group["lr"], group["trust_clip"])))
    else:
        upd = torch._foreach_mul(d, group["lr"])
    bufs = [st["momentum_buffer"] for st in states]
    torch._foreach_mul_(bufs, mu)
    torch._foreach_add_(bufs, upd)
    out = torch._foreach_add(upd, bufs, alpha=mu) if group["nesterov"] else bufs
    torch._foreach_sub_(ps, out)


_single_lars, _fused_lars = per_tensor(
    _lars_one, ("momentum_buffer",),
    lambda group: {"mu": group["momentum"], "wd": _wd(group), "adapt": group["adapt"],
                   "trust_coefficient": group["trust_coefficient"], "eps": group["eps"],
                   "trust_clip": group["trust_clip"], "nesterov": group["nesterov"]})
register("lars", _single_lars, _foreach_lars, fused=_fused_lars)


def _foreach_lamb(group, ps, gs, states, _):
    u = _foreach_adam_u(group, ps, gs, states)
    if group["adapt"]:
        trust = formulas.lamb_trust(T, _norms(ps), _norms(u), group["max_trust"])
        torch._foreach_mul_(u, _scalars(trust))
    torch._foreach_add_(ps, u, alpha=-group["lr"])


_single_lamb, _fused_lamb = per_tensor(_adam_one, ("exp_avg", "exp_avg_sq"),
                                       lambda group: _adam_consts(group, lamb=group["adapt"]))
register("lamb", _single_lamb, _foreach_lamb, fused=_fused_lamb)


def _sngm_scale(work):
    """1/‖d‖_global over every tensor of the optimizer, d = g + λw (SNGM Alg. 1)."""
    norms = [_norms(_decayed_foreach(group, ps, gs)) for group, ps, gs, _ in work]
    return formulas.global_norm_scale(T, torch.linalg.vector_norm(torch.cat(norms)))


def _single_sngm(group, ps, gs, states, scale):
    mu = group["momentum"]
    for p, g, st in zip(ps, gs, states):
        buf = st["momentum_buffer"].mul_(mu).add_(_decayed(group, p, g) * scale)
        p.sub_(group["lr"] * buf)


def _foreach_sngm(group, ps, gs, states, scale):
    bufs = [st["momentum_buffer"] for st in states]
    torch._foreach_mul_(bufs, group["momentum"])
    torch._foreach_add_(bufs, torch._foreach_mul(_decayed_foreach(group, ps, gs), scale))
    torch._foreach_add_(ps, bufs, alpha=-group["lr"])


register("sngm", _single_sngm, _foreach_sngm, prepare=_sngm_scale)


def _single_tvlars(group, ps, gs, states, _):
    for p, g, st in zip(ps, gs, states):
        phi = formulas.tvlars_phi(st["step"], group["alpha"], group["decay_coefficient"],
                                  group["delay_steps"], group["min_ratio"])
        d = _decayed(group, p, g)
        if group["adapt"]:
            trust = formulas.tvlars_trust(T, T.norm(p), T.norm(d), phi, group["trust_coefficient"], group["eps"])
        else:
            trust = phi
        if st["step"] == 1:
            st["prev_iterate"].copy_(p)  # m_1 = w_1
        w_next, m = formulas.tvlars_iterate(p, group["lr"] * trust * d, st["prev_iterate"], group["momentum"])
        st["prev_iterate"].copy_(m)
        p.copy_(w_next)


def _foreach_tvlars(group, ps, gs, states, _):
    steps = [st["step"] for st in states]
    phi = torch.tensor([formulas.tvlars_phi(t, group["alpha"], group["decay_coefficient"],
                                            group["delay_steps"], group["min_ratio"]) for t in steps],
                       dtype=ps[0].dtype, device=ps[0].device)
    d = _decayed_foreach(group, ps, gs)
    if group["adapt"]:
        trust = formulas.tvlars_trust(T, _norms(ps), _norms(d), phi, group["trust_coefficient"], group["eps"])
    else:
        trust = phi
    upd = torch._foreach_mul(d, _scalars(group["lr"] * trust))
    prevs = [st["prev_iterate"] for st in states]
    first = [i for i, t in enumerate(steps) if t == 1]
    if first:
        torch._foreach_copy_([prevs[i] for i in first], [ps[i] for i in first])  # m_1 = w_1
    m = torch._foreach_sub(ps, upd)                          # m_{t+1} = w_t − u
    diff = torch._foreach_sub(m, prevs)
    torch._foreach_copy_(prevs, m)
    torch._foreach_add_(m, diff, alpha=group["momentum"])    # w_{t+1} = m_{t+1} + μ(m_{t+1} − m_t)
    torch._foreach_copy_(ps, m)


register("tvlars", _single_tvlars, _foreach_tvlars)


def create(name: str, model_or_params, lr: Optional[float] = None, exclude=(), include=(),
           foreach: Optional[bool] = None, **hparams) -> LargeBatchOptimizer:
    """Build optimizer ``name`` with biases and norm parameters kept out of decay and adaptation.

    ``model_or_params``: an ``nn.Module`` (trainable ``named_parameters``; names
    matched by ``grouping.is_excluded`` with ``exclude``/``include`` globs) or an
    iterable of tensors / param-group dicts (excluded by ``ndim ≤ 1``; a dict
    that sets ``adapt`` or ``decay`` itself is kept as given).  Excluded tensors
    get ``adapt=False, decay=False``.
    """
    rule = rules.get_rule(name)
    cls = OPTIMIZERS[rule.name]
    exclude, include = grouping.patterns("exclude", exclude), grouping.patterns("include", include)
    rules.check_bool("foreach", foreach, allow_none=True)
    names: Dict[torch.Tensor, str] = {}
    if isinstance(model_or_params, torch.nn.Module):
        named = [(n, p) for n, p in model_or_params.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("invalid model_or_params: the module has no trainable parameters")
        names = {p: n for n, p in named}
        groups = _split({"params": [p for _, p in named]}, names, exclude, include)
    else:
        if isinstance(model_or_params, torch.Tensor):
            raise ValueError("invalid model_or_params: pass an nn.Module or an iterable of tensors "
                             "or param-group dicts, not a single tensor")
        items = list(model_or_params)
        if not items:
            raise ValueError("invalid model_or_params: it is empty")
        if all(isinstance(x, dict) for x in items):
            groups = [g for item in items for g in _split(item, names, exclude, include)]
        elif all(isinstance(x, torch.Tensor) for x in items):
            groups = _split({"params": items}, names, exclude, include)
        else:
            raise ValueError("invalid model_or_params: mix of tensors and dicts; pass tensors or "
                             "param-group dicts")
    opt = cls(groups, lr=lr, foreach=foreach, **hparams)
    opt._param_names.update(names)
    return opt


def _split(group: Dict[str, Any], names, exclude, include) -> List[Dict[str, Any]]:
    if "adapt" in group or "decay" in group:
        return [group]
    params = group["params"]
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    rest = {k: v for k, v in group.items() if k != "params"}
    inc, exc = [], []
    for p in params:
        (exc if grouping.is_excluded(names.get(p, ""), p.ndim, exclude, include) else inc).append(p)
    out = []
    if inc:
        out.append({**rest, "params": inc, "adapt": True, "decay": True})
    if exc:
        out.append({**rest, "params": exc, "adapt": False, "decay": False})
    return out


__all__ = ["LargeBatchOptimizer", "OPTIMIZERS", "KERNELS", "Kernel", "register", "create"] + [
    r.class_name for r in rules.RULES.values()]
