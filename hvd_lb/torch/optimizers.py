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

from typing import Any, Callable, Dict, List, NamedTuple, Optional

import torch

from .. import formulas, grouping, rules
from ._ops import T
from .gsnr import param_name, transform_class


def _check_bool(name, value, allow_none=False):
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        allowed = "True, False or None" if allow_none else "True or False"
        raise ValueError(f"invalid {name}={value!r}: must be {allowed}")
    return value


def _norms(tensors: List[torch.Tensor]) -> torch.Tensor:
    return torch.stack(torch._foreach_norm(tensors))


def _scalars(vec: torch.Tensor) -> List[torch.Tensor]:
    # 0-dim tensors broadcast in _foreach_mul_ without a host sync.
    return list(vec.unbind())


class Kernel(NamedTuple):
    """One base rule on torch: ``fn(group, ps, gs, states, shared)`` per group, two ways.

    ``prepare(work)`` (optional) computes what every group shares (SNGM's global
    norm) from ``[(group, ps, gs, states), ...]`` before the per-group calls.
    """

    single: Callable
    foreach: Callable
    prepare: Optional[Callable] = None


KERNELS: Dict[str, Kernel] = {}
_LR = rules.LR(0.0)  # the range an lr set after construction is checked against at step time
OPTIMIZERS: Dict[str, type] = {}


class LargeBatchOptimizer(torch.optim.Optimizer):
    """Base of every hvd_lb torch optimizer; subclasses only set ``rule_name``.

    ``params`` may be tensors or param-group dicts; every group carries all
    hyperparameters of the rule plus ``adapt`` (trust ratio on/off), ``decay``
    (weight decay on/off) and ``foreach`` (None = multi-tensor path).
    """

    rule_name: str = ""

    def __init__(self, params, lr: Optional[float] = None, *, adapt: bool = True, decay: bool = True,
                 foreach: Optional[bool] = None, **hparams):
        self.rule = rules.get_rule(self.rule_name)
        if lr is not None:
            hparams["lr"] = lr
        defaults = rules.validate(self.rule.name, hparams)
        defaults["adapt"] = _check_bool("adapt", adapt)
        defaults["decay"] = _check_bool("decay", decay)
        defaults["foreach"] = _check_bool("foreach", foreach, allow_none=True)
        self._param_names: Dict[torch.Tensor, str] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group; its hyperparameters are checked against the rule table."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        hp = {h.name: group[h.name] for h in self.rule.hypers}
        group.update(rules.validate(self.rule.name, hp))
        for flag in ("adapt", "decay"):
            group[flag] = _check_bool(flag, group[flag])
        group["foreach"] = _check_bool("foreach", group["foreach"], allow_none=True)
        for p in group["params"]:
            if p.is_sparse:
                raise ValueError("invalid params: sparse parameters are not supported")
            self._init_state(p)

    def _init_state(self, p: torch.Tensor) -> None:
        state = self.state[p]
        if state:
            return
        state["step"] = 0
        for slot in self.rule.slots:
            # prev_iterate starts as w; it is set again to w_1 at t = 1.
            state[slot] = p.detach().clone() if slot == "prev_iterate" else torch.zeros_like(p)

    def param_name(self, p: torch.Tensor) -> str:
        return param_name(self, p)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        kernel = KERNELS[self.rule.base]
        work = []
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
            work.append((group, ps, [p.grad for p in ps], states))
        shared = kernel.prepare(work) if kernel.prepare is not None and work else None
        for group, ps, gs, states in work:
            fn = kernel.single if group["foreach"] is False else kernel.foreach
            fn(group, ps, gs, states, shared)
        return loss


def _doc(rule: rules.Rule) -> str:
    hp = ", ".join(f"{h.name}={h.default!r}" for h in rule.hypers)
    return (f"``{rule.name}``: {rule.doc}.\n\nHyperparameters (defaults): {hp}.\n"
            f"State slots: {', '.join(rule.slots) or 'none'} (+ step).")


def register(name: str, single: Callable, foreach: Callable, prepare: Optional[Callable] = None):
    """Add base rule ``name``'s kernels and create its classes (``X`` and ``VRX``).

    The rule must be in the table first (``rules.register``); see docs/CONTRIBUTING.md.
    """
    base, vr = rules.get_rule(name), rules.get_rule("vr-" + name)
    if base.gsnr:
        raise ValueError(f"invalid name {name!r}: register the base rule; its vr- twin follows")
    KERNELS[name] = Kernel(single, foreach, prepare)
    cls = type(base.class_name, (LargeBatchOptimizer,),
               {"rule_name": base.name, "__doc__": _doc(base), "__module__": __name__})
    OPTIMIZERS[name] = cls
    OPTIMIZERS[vr.name] = transform_class(cls, vr.class_name, rule_name=vr.name, __doc__=_doc(vr),
                                          __module__=__name__)
    globals()[base.class_name], globals()[vr.class_name] = cls, OPTIMIZERS[vr.name]
    return cls


# ---------------------------------------------------------------------------------------
# The base rules: per-tensor (formulas as written) and foreach (same equations, in place),
# side by side, one register() call each.

def _decayed(group, p, g):
    """d = g + λw where the group decays."""
    return g + group["weight_decay"] * p if group["decay"] else g


def _decayed_foreach(group, ps, gs):
    """d = g + λw (a new list when it differs from g; never modify the result in place)."""
    if group["decay"] and group["weight_decay"] != 0.0:
        return torch._foreach_add(gs, ps, alpha=group["weight_decay"])
    return gs


def _single_sgd(group, ps, gs, states, _):
    for p, g in zip(ps, gs):
        p.sub_(group["lr"] * _decayed(group, p, g))


def _foreach_sgd(group, ps, gs, states, _):
    torch._foreach_add_(ps, _decayed_foreach(group, ps, gs), alpha=-group["lr"])


register("sgd", _single_sgd, _foreach_sgd)


def _single_momentum(group, ps, gs, states, _):
    mu = group["momentum"]
    for p, g, st in zip(ps, gs, states):
        d = _decayed(group, p, g)
        buf = st["momentum_buffer"].mul_(mu).add_(d)
        p.sub_(group["lr"] * (d + mu * buf if group["nesterov"] else buf))


def _foreach_momentum(group, ps, gs, states, _):
    mu = group["momentum"]
    d = _decayed_foreach(group, ps, gs)
    bufs = [st["momentum_buffer"] for st in states]
    torch._foreach_mul_(bufs, mu)
    torch._foreach_add_(bufs, d)
    out = torch._foreach_add(d, bufs, alpha=mu) if group["nesterov"] else bufs
    torch._foreach_add_(ps, out, alpha=-group["lr"])


register("momentum", _single_momentum, _foreach_momentum)


def _single_adam_u(group, p, g, st):
    b1, b2 = group["betas"]
    direction, m, v = formulas.adam_direction(T, g, st["exp_avg"], st["exp_avg_sq"], b1, b2,
                                              group["eps"], st["step"])
    st["exp_avg"].copy_(m)
    st["exp_avg_sq"].copy_(v)
    return _decayed(group, p, direction)


def _foreach_adam_u(group, ps, gs, states):
    """u = m̂/(√v̂ + ε) + λw as a new list (formulas.adam_direction, in place)."""
    b1, b2 = group["betas"]
    ms = [st["exp_avg"] for st in states]
    vs = [st["exp_avg_sq"] for st in states]
    steps = [st["step"] for st in states]
    torch._foreach_mul_(ms, b1)
    torch._foreach_add_(ms, gs, alpha=1.0 - b1)
    torch._foreach_mul_(vs, b2)
    torch._foreach_addcmul_(vs, gs, gs, value=1.0 - b2)
    u = torch._foreach_div(vs, [1.0 - b2 ** t for t in steps])  # the one new list: v̂ → u
    torch._foreach_sqrt_(u)
    torch._foreach_add_(u, group["eps"])
    torch._foreach_mul_(u, [1.0 - b1 ** t for t in steps])
    torch._foreach_reciprocal_(u)
    torch._foreach_mul_(u, ms)                                # m̂/(√v̂ + ε)
    if group["decay"] and group["weight_decay"] != 0.0:
        torch._foreach_add_(u, ps, alpha=group["weight_decay"])
    return u


def _single_adam(group, ps, gs, states, _):
    for p, g, st in zip(ps, gs, states):
        p.sub_(group["lr"] * _single_adam_u(group, p, g, st))


def _foreach_adam(group, ps, gs, states, _):
    torch._foreach_add_(ps, _foreach_adam_u(group, ps, gs, states), alpha=-group["lr"])


register("adam", _single_adam, _foreach_adam)


def _single_lars(group, ps, gs, states, _):
    mu = group["momentum"]
    wd = group["weight_decay"] if group["decay"] else 0.0
    for p, g, st in zip(ps, gs, states):
        d = g + wd * p
        if group["adapt"]:
            trust = formulas.lars_trust(T, T.norm(p), T.norm(g), group["trust_coefficient"], group["eps"], wd)
            upd = formulas.lars_scale(T, trust, group["lr"], group["trust_clip"]) * d
        else:
            upd = group["lr"] * d
        buf = st["momentum_buffer"].mul_(mu).add_(upd)
        p.sub_(upd + mu * buf if group["nesterov"] else buf)


def _foreach_lars(group, ps, gs, states, _):
    mu = group["momentum"]
    wd = group["weight_decay"] if group["decay"] else 0.0
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


register("lars", _single_lars, _foreach_lars)


def _single_lamb(group, ps, gs, states, _):
    for p, g, st in zip(ps, gs, states):
        u = _single_adam_u(group, p, g, st)
        if group["adapt"]:
            u = formulas.lamb_trust(T, T.norm(p), T.norm(u), group["max_trust"]) * u
        p.sub_(group["lr"] * u)


def _foreach_lamb(group, ps, gs, states, _):
    u = _foreach_adam_u(group, ps, gs, states)
    if group["adapt"]:
        trust = formulas.lamb_trust(T, _norms(ps), _norms(u), group["max_trust"])
        torch._foreach_mul_(u, _scalars(trust))
    torch._foreach_add_(ps, u, alpha=-group["lr"])


register("lamb", _single_lamb, _foreach_lamb)


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
    _check_bool("foreach", foreach, allow_none=True)
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
