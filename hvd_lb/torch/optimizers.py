"""Every rule of SPEC §4 as a ``torch.optim.Optimizer``.

One base class drives all fourteen: the rule table (``hvd_lb.rules``) gives
hyperparameters, defaults, ranges and state slots; the maths is
``hvd_lb.formulas`` on torch tensors.  Each rule has two implementations:

* per-tensor (``foreach=False``): readable, every formula called as written;
* multi-tensor (``foreach=True``, the default): the element-wise parts as
  in-place ``torch._foreach_*`` kernels, the per-tensor scalars (trust ratios,
  φ_t, global norm) through the same ``formulas`` functions on stacked norms.

Both are tested equal to the float64 NumPy reference and to each other.

State slot names are exactly ``rules.Rule.slots`` plus ``step`` (t of SPEC,
1 on the first ``step()``).  State is allocated when parameters are added, so
``hvd.broadcast_optimizer_state`` and "load on rank 0, broadcast" resume work
without a dummy step; TVLARS sets m_1 = w_1 at t = 1, whatever the buffer held.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

import torch

from .. import formulas, grouping, rules
from ._ops import T

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_GROUP_FLAGS = ("adapt", "decay", "foreach")


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


class LBOptimizer(torch.optim.Optimizer):
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
        self._grad_sq: Optional[Dict[torch.Tensor, Optional[torch.Tensor]]] = None
        self._grad_sq_owned = False  # True: step() may overwrite the s tensors (wrapper's buffers)
        self._diag: List[Any] = []
        self._param_names: Dict[torch.Tensor, str] = {}
        super().__init__(params, defaults)

    # --- groups and state -----------------------------------------------------------

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

    def _params(self) -> List[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def param_name(self, p: torch.Tensor) -> str:
        if p in self._param_names:
            return self._param_names[p]
        for i, g in enumerate(self.param_groups):
            for j, q in enumerate(g["params"]):
                if q is p:
                    return f"param_groups.{i}.{j}"
        raise KeyError("parameter not in this optimizer")

    # --- gradient statistics --------------------------------------------------------

    def set_grad_sq(self, sq: Iterable[Optional[torch.Tensor]]) -> None:
        """Give s = (1/k)Σx² (SPEC §1), one tensor per parameter in param-group order.

        Consumed by the next ``step()``; VR rules need it, the others ignore it.
        """
        sq = list(sq)
        params = self._params()
        if len(sq) != len(params):
            raise ValueError(f"invalid sq: got {len(sq)} tensors, the optimizer has {len(params)} parameters")
        out = {}
        for i, (p, s) in enumerate(zip(params, sq)):
            if s is not None:
                if not isinstance(s, torch.Tensor) or s.shape != p.shape:
                    raise ValueError(f"invalid sq[{i}]: must be a tensor of shape {tuple(p.shape)}")
                out[p] = s
        self._grad_sq = out
        self._grad_sq_owned = False

    def gsnr_diagnostics(self) -> Dict[str, Dict[str, float]]:
        """Last step's per-tensor mean GSNR mean(r_raw) and fraction of r̃ clipped up to γ.

        Computed during ``step()`` from the statistics already reduced: no communication.
        """
        out = {}
        for params, mus, clipped in self._diag:
            for p, mu, c in zip(params, mus.tolist(), clipped.tolist()):
                out[self.param_name(p)] = {"mean_gsnr": float(mu), "clipped_fraction": float(c)}
        return out

    # --- the step -------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sq, self._grad_sq = self._grad_sq, None
        owned, self._grad_sq_owned = self._grad_sq_owned, False
        self._diag = []
        work = []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            for p in ps:
                if p.grad.is_sparse:
                    raise RuntimeError(f"optimizer '{self.rule.name}' does not take sparse gradients "
                                       "(hvd_lb.torch.DistributedOptimizer densifies them)")
            gs = [p.grad for p in ps]
            states = [self.state[p] for p in ps]
            for st in states:
                st["step"] += 1
            if self.rule.gsnr:
                ss = self._stats_for(ps, sq)
                gs = self._gsnr(group, ps, gs, ss, states, owned)
            work.append((group, ps, gs, states))
        scale = self._sngm_scale(work) if self.rule.base == "sngm" else None
        for group, ps, gs, states in work:
            foreach = group["foreach"] is not False
            fn = _FOREACH[self.rule.base] if foreach else _SINGLE[self.rule.base]
            fn(group, ps, gs, states, scale)
        return loss

    def _stats_for(self, ps, sq):
        if sq is None or any(p not in sq for p in ps):
            raise RuntimeError(
                f"optimizer '{self.rule.name}' needs gradient statistics (the mean of squared "
                "gradient samples, SPEC §1) and got none for this step: wrap it in "
                "hvd_lb.torch.DistributedOptimizer(opt, micro_batches=...), which all-reduces them, "
                "or call opt.set_grad_sq([...]) before opt.step()")
        return [sq[p] for p in ps]

    def _gsnr(self, group, ps, gs, ss, states, owned=False):
        """ĝ = p̂ ⊙ ḡ (VRGD §4), in float32 or wider; records the diagnostics."""
        wide = [g.float() if g.dtype in _LOW_PRECISION else g for g in gs]
        owned = owned and all(s.dtype == g.dtype for s, g in zip(ss, wide))
        ss = [s.to(g.dtype) for s, g in zip(ss, wide)]
        avgs = [st["gsnr_avg"] for st in states]
        steps = [st["step"] for st in states]
        if group["foreach"] is not False:
            out, mus, clipped = _foreach_gsnr(group, wide, ss, avgs, steps, owned)
        else:
            out, mus, clipped = [], [], []
            for g, s, avg, t in zip(wide, ss, avgs, steps):
                r, mu, c = formulas.gsnr_ratio(T, g, s, group["gamma"])
                g_hat, p_t = formulas.gsnr_scale(T, g, r, avg.to(g.dtype), group["gsnr_momentum"], t)
                avg.copy_(p_t)
                out.append(g_hat)
                mus.append(mu)
                clipped.append(c)
            mus, clipped = torch.stack(mus), torch.stack(clipped)
        self._diag.append((ps, mus.detach(), clipped.detach()))
        return [o.to(g.dtype) for o, g in zip(out, gs)]

    def _sngm_scale(self, work):
        """1/‖d‖_global over every tensor of the optimizer, d = g + λw (SNGM Alg. 1)."""
        norms = []
        for group, ps, gs, _ in work:
            norms.append(_norms(_decayed_foreach(group, ps, gs)))
        if not norms:
            return None
        total = torch.linalg.vector_norm(torch.cat(norms))
        return formulas.global_norm_scale(T, total)


# ---------------------------------------------------------------------------------------
# Per-tensor implementation: formulas as written, one tensor at a time.

def _decayed(group, p, g):
    """d = g + λw where the group decays."""
    return g + group["weight_decay"] * p if group["decay"] else g


def _single_sgd(group, ps, gs, states, _):
    for p, g in zip(ps, gs):
        p.sub_(group["lr"] * _decayed(group, p, g))


def _single_momentum(group, ps, gs, states, _):
    mu = group["momentum"]
    for p, g, st in zip(ps, gs, states):
        d = _decayed(group, p, g)
        buf = st["momentum_buffer"].mul_(mu).add_(d)
        p.sub_(group["lr"] * (d + mu * buf if group["nesterov"] else buf))


def _single_adam_u(group, p, g, st):
    b1, b2 = group["betas"]
    direction, m, v = formulas.adam_direction(T, g, st["exp_avg"], st["exp_avg_sq"], b1, b2,
                                              group["eps"], st["step"])
    st["exp_avg"].copy_(m)
    st["exp_avg_sq"].copy_(v)
    return _decayed(group, p, direction)


def _single_adam(group, ps, gs, states, _):
    for p, g, st in zip(ps, gs, states):
        p.sub_(group["lr"] * _single_adam_u(group, p, g, st))


def _single_lamb(group, ps, gs, states, _):
    for p, g, st in zip(ps, gs, states):
        u = _single_adam_u(group, p, g, st)
        if group["adapt"]:
            u = formulas.lamb_trust(T, T.norm(p), T.norm(u), group["max_trust"]) * u
        p.sub_(group["lr"] * u)


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


def _single_sngm(group, ps, gs, states, scale):
    mu = group["momentum"]
    for p, g, st in zip(ps, gs, states):
        buf = st["momentum_buffer"].mul_(mu).add_(_decayed(group, p, g) * scale)
        p.sub_(group["lr"] * buf)


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


_SINGLE = {"sgd": _single_sgd, "momentum": _single_momentum, "adam": _single_adam, "lamb": _single_lamb,
           "lars": _single_lars, "sngm": _single_sngm, "tvlars": _single_tvlars}


# ---------------------------------------------------------------------------------------
# Multi-tensor implementation: same equations, in-place foreach kernels.

def _decayed_foreach(group, ps, gs):
    """d = g + λw (a new list when it differs from g; never modify the result in place)."""
    if group["decay"] and group["weight_decay"] != 0.0:
        return torch._foreach_add(gs, ps, alpha=group["weight_decay"])
    return gs


def _foreach_gsnr(group, gs, ss, avgs, steps, owned=False):
    """formulas.gsnr_ratio + gsnr_scale on a list, allocating one list (two unless ``owned``).

    Per-tensor means are sums/n of non-negative lists.  ``owned``: ``ss`` may be
    overwritten (the DistributedOptimizer's reduced buffers).
    """
    gamma, b3 = group["gamma"], group["gsnr_momentum"]
    n = torch.tensor([g.numel() for g in gs], dtype=gs[0].dtype, device=gs[0].device)
    r = torch._foreach_mul(gs, gs)                            # ḡ², becomes r_raw, r̃, r, ĝ in place
    if owned:
        torch._foreach_sub_(ss, r)
        var = ss
    else:
        var = torch._foreach_sub(ss, r)
    torch._foreach_clamp_min_(var, 0.0)                       # var = max(s − ḡ², 0)
    delta = formulas.DELTA_REL * (_norms1(var) / n) + formulas.DELTA_ABS
    torch._foreach_add_(var, _scalars(delta))
    torch._foreach_div_(r, var)                               # r_raw
    mu = _norms1(r) / n
    zero = mu == 0
    torch._foreach_div_(r, _scalars(torch.where(zero, torch.ones_like(mu), mu)))
    torch._foreach_add_(r, _scalars(zero.to(mu.dtype)))     # r̃ = 1 where μ_r = 0 (r_raw ≡ 0 there)
    below = var                                               # free now: reuse as scratch
    torch._foreach_copy_(below, r)
    torch._foreach_sub_(below, gamma)
    torch._foreach_clamp_max_(below, 0.0)
    torch._foreach_sign_(below)                               # −1 exactly where r̃ < γ
    clipped = _norms1(below) / n
    torch._foreach_clamp_min_(r, gamma)
    torch._foreach_clamp_max_(r, 1.0)                         # r = clip(r̃, γ, 1)
    work_avgs = [a.to(g.dtype) for a, g in zip(avgs, gs)]
    if b3 == 0.0:
        torch._foreach_copy_(work_avgs, r)                    # p_t = r
    else:
        torch._foreach_mul_(work_avgs, b3)
        torch._foreach_add_(work_avgs, r, alpha=1.0 - b3)     # p_t = β₃p + (1−β₃)r
        torch._foreach_copy_(r, work_avgs)
        torch._foreach_div_(r, [1.0 - b3 ** t for t in steps])
    for a, w in zip(avgs, work_avgs):
        if a is not w:
            a.copy_(w)
    torch._foreach_mul_(r, gs)                                # ĝ = p_t/(1−β₃^t)·ḡ
    return r, mu, clipped


def _norms1(tensors):
    """Σ|x| per tensor of a non-negative (or sign-valued) list; plain sums beat ‖·‖₁ kernels on CPU."""
    return torch.stack([t.sum() for t in tensors]).abs()


def _foreach_sgd(group, ps, gs, states, _):
    torch._foreach_add_(ps, _decayed_foreach(group, ps, gs), alpha=-group["lr"])


def _foreach_momentum(group, ps, gs, states, _):
    mu = group["momentum"]
    d = _decayed_foreach(group, ps, gs)
    bufs = [st["momentum_buffer"] for st in states]
    torch._foreach_mul_(bufs, mu)
    torch._foreach_add_(bufs, d)
    out = torch._foreach_add(d, bufs, alpha=mu) if group["nesterov"] else bufs
    torch._foreach_add_(ps, out, alpha=-group["lr"])


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


def _foreach_adam(group, ps, gs, states, _):
    torch._foreach_add_(ps, _foreach_adam_u(group, ps, gs, states), alpha=-group["lr"])


def _foreach_lamb(group, ps, gs, states, _):
    u = _foreach_adam_u(group, ps, gs, states)
    if group["adapt"]:
        trust = formulas.lamb_trust(T, _norms(ps), _norms(u), group["max_trust"])
        torch._foreach_mul_(u, _scalars(trust))
    torch._foreach_add_(ps, u, alpha=-group["lr"])


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


def _foreach_sngm(group, ps, gs, states, scale):
    bufs = [st["momentum_buffer"] for st in states]
    torch._foreach_mul_(bufs, group["momentum"])
    torch._foreach_add_(bufs, torch._foreach_mul(_decayed_foreach(group, ps, gs), scale))
    torch._foreach_add_(ps, bufs, alpha=-group["lr"])


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


_FOREACH = {"sgd": _foreach_sgd, "momentum": _foreach_momentum, "adam": _foreach_adam,
            "lamb": _foreach_lamb, "lars": _foreach_lars, "sngm": _foreach_sngm, "tvlars": _foreach_tvlars}


# ---------------------------------------------------------------------------------------
# One class per name of SPEC §4.

def _make_class(cls_name: str, name: str):
    rule = rules.RULES[name]
    hp = ", ".join(f"{h.name}={h.default!r}" for h in rule.hypers)
    doc = (f"``{name}``: {rule.doc}.\n\nHyperparameters (defaults): {hp}.\n"
           f"State slots: {', '.join(rule.slots) or 'none'} (+ step).")
    return type(cls_name, (LBOptimizer,), {"rule_name": name, "__doc__": doc, "__module__": __name__})


_CLASS_NAMES = {
    "sgd": "SGD", "momentum": "Momentum", "adam": "Adam", "lars": "LARS", "lamb": "LAMB",
    "sngm": "SNGM", "tvlars": "TVLARS",
}
OPTIMIZERS: Dict[str, type] = {}
for _base, _cls in _CLASS_NAMES.items():
    OPTIMIZERS[_base] = _make_class(_cls, _base)
    OPTIMIZERS["vr-" + _base] = _make_class("VR" + _cls, "vr-" + _base)
assert set(OPTIMIZERS) == set(rules.NAMES)

SGD, Momentum, Adam, LARS, LAMB, SNGM, TVLARS = (OPTIMIZERS[n] for n in _CLASS_NAMES)
VRSGD, VRMomentum, VRAdam, VRLARS, VRLAMB, VRSNGM, VRTVLARS = (OPTIMIZERS["vr-" + n] for n in _CLASS_NAMES)


def create(name: str, model_or_params, lr: Optional[float] = None, exclude=(), include=(),
           foreach: Optional[bool] = None, **hparams) -> LBOptimizer:
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


__all__ = ["LBOptimizer", "OPTIMIZERS", "create", "SGD", "Momentum", "Adam", "LARS", "LAMB", "SNGM",
           "TVLARS", "VRSGD", "VRMomentum", "VRAdam", "VRLARS", "VRLAMB", "VRSNGM", "VRTVLARS"]
