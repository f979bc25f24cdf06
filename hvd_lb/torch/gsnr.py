"""The GSNR transform (VRGD §4, docs/SPEC.md §2) in front of any ``torch.optim.Optimizer``.

``GSNR(opt)`` is an optimizer whose ``step()`` replaces each gradient ḡ by

    ĝ = p̂ ⊙ ḡ,   p_t = β₃p_{t−1} + (1 − β₃)r,   p̂ = p_t/(1 − β₃^t),
    r = clip(r_raw/mean(r_raw), γ, 1),   r_raw = ḡ²/(max(s − ḡ², ε_w·s) + δ),

runs ``opt``'s own step on ĝ and puts ḡ back into ``p.grad``.  s = (1/k)Σx² comes
from ``hvd_lb.torch.DistributedOptimizer``, ``hvd_lb.torch.ddp.register`` or
``set_grad_sq``.  Every ``vr-X`` optimizer is this transform in front of ``X``.

Composition, not a rebuilt subclass of ``type(opt)``: the transform holds ``opt``
and shares its ``param_groups``, ``state``, ``defaults`` and hook registries, so a
hook runs once per step, ``add_param_group`` gets ``opt``'s constructor values, and
``copy.deepcopy``/pickle keep both.  γ, β₃ and the excluded indices live in the
param groups (``gamma``, ``gsnr_momentum``, ``gsnr_exclude``, ``gsnr_fused``), p_t and
the transform's step count in the state (``gsnr_avg``, ``gsnr_step``), so
``opt.state_dict()`` carries everything; for optimizers that build state lazily
(``torch.optim``) they are added after the wrapped rule's first step, because those
rules initialise a parameter's state only while it is empty.
"""
from __future__ import annotations

import warnings
from fnmatch import fnmatchcase
from typing import Dict, List, Optional

import torch

from .. import formulas, grouping, rules
from ._ops import (KernelLimit, T, compile_kernel, compiler_present, flat, graph_scalar, keep_wide_state, mul_into, real_view,
                   run_closure, scratch, specialized_floats, state_dtype)

_KEYS = ("gamma", "gsnr_momentum", "gsnr_exclude", "gsnr_fused")


def param_name(opt, p) -> str:
    """``opt``'s name for ``p``: from ``named_parameters`` when known, else ``param_groups.i.j``."""
    names = getattr(opt, "_param_names", None) or {}
    if p in names:
        return names[p]
    for i, g in enumerate(opt.param_groups):
        for j, q in enumerate(g["params"]):
            if q is p:
                return f"param_groups.{i}.{j}"
    raise KeyError("parameter not in this optimizer")


def _shared(name: str, doc: str):
    """An attribute that is the wrapped optimizer's own (read and assigned through)."""
    return property(lambda self: getattr(self.optimizer, name),
                    lambda self, value: setattr(self.optimizer, name, value), doc=doc)


def unhooked_step(opt: torch.optim.Optimizer, cls: Optional[type] = None):
    """The ``step`` of ``cls`` (default ``type(opt)``) without torch's hook wrapper, bound to ``opt``.

    A wrapper runs the hooks once around its own step; calling the wrapped optimizer's
    ``step()`` would run every registered and global hook a second time.
    """
    cls = type(opt) if cls is None else cls
    fn = cls.step
    if getattr(fn, "hooked", False):
        fn = getattr(fn, "__wrapped__", fn)
    return fn.__get__(opt, cls)


def _gsnr_slot(p: torch.Tensor) -> torch.Tensor:
    """p_0 = 0, in the state dtype (float32 for bf16/fp16 parameters)."""
    return torch.zeros_like(p, dtype=state_dtype(p))


class GSNR(torch.optim.Optimizer):
    """Put the GSNR transform (VRGD §4, docs/SPEC.md §2) in front of any torch optimizer.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (``AdamW``, timm's ``Lamb``, hvd_lb's own)
            except ``LBFGS`` (its closure re-evaluates gradients that have no statistics).
            Its param groups, state and hooks are shared, not copied.
        gamma: γ ∈ (0, 1], the floor of r. γ = 1 gives exactly ``optimizer``.
        momentum: β₃ ∈ [0, 1), GSNR momentum (VR-Adam and VR-LAMB use 0.9).
        exclude: fnmatch patterns of parameter names that get ḡ unscaled (default: none,
            GSNR applies to every tensor); names come from ``named_parameters`` or from
            ``hvd_lb.torch.create(name, model)``.
        named_parameters: ``model.named_parameters()``, for ``exclude`` and diagnostics.
        fused: compute r and ĝ per tensor in one ``torch.compile``d kernel (``True``), with
            the foreach/per-tensor paths chosen by the group's ``foreach`` flag (``False``), or
            ``None`` (default): compiled on CPU where Inductor's C++ compiler is present
            (``_ops.compiler_present``), the group's ``foreach`` is None and the step is not
            itself being compiled (Dynamo then fuses the foreach path), else foreach; CUDA
            stays on foreach unless ``True`` (the kernel's equality tests ran on CPU only).
            The kernel makes three passes over ḡ and s against ~20 of foreach: 2.8–3.4×
            faster on CPU (``bench/gsnr_fused.py``); one graph per dtype for every tensor size
            (0-d and 1-element included) and layout (``channels_last``); the first step
            compiles it (~3 s with Inductor's disk cache warm, ~12 s cold). Where auto cannot
            compile (a broken compiler, the recompile or hyperparameter limits of ``_ops``),
            it warns once and runs foreach (for a refused γ, β₃: that set only); ``True``
            raises instead. Named ``vr-*`` classes take ``gsnr_fused`` (default: their
            ``fused`` where given, else auto).

    Use it in place of ``optimizer``, inside ``hvd_lb.torch.DistributedOptimizer`` (which
    gives it s), with ``state_dict``/``load_state_dict``, LR schedulers, hooks and
    ``gsnr_diagnostics()``. ``optimizer`` is the ``.optimizer`` attribute.
    """

    param_groups = _shared("param_groups", "the wrapped optimizer's param groups (with γ, β₃)")
    state = _shared("state", "the wrapped optimizer's state (with p_t, the transform's t)")
    defaults = _shared("defaults", "the wrapped optimizer's defaults (with γ, β₃)")
    _param_names = _shared("_param_names", "parameter → name, for exclude and diagnostics")
    _optimizer_step_pre_hooks = _shared("_optimizer_step_pre_hooks", "the wrapped optimizer's")
    _optimizer_step_post_hooks = _shared("_optimizer_step_post_hooks", "the wrapped optimizer's")
    _optimizer_state_dict_pre_hooks = _shared("_optimizer_state_dict_pre_hooks", "the wrapped optimizer's")
    _optimizer_state_dict_post_hooks = _shared("_optimizer_state_dict_post_hooks", "the wrapped optimizer's")
    _optimizer_load_state_dict_pre_hooks = _shared("_optimizer_load_state_dict_pre_hooks", "the wrapped optimizer's")
    _optimizer_load_state_dict_post_hooks = _shared("_optimizer_load_state_dict_post_hooks", "the wrapped optimizer's")

    def __init__(self, optimizer: torch.optim.Optimizer, gamma: float = 0.1, momentum: float = 0.0,
                 exclude=(), named_parameters=None, fused: Optional[bool] = None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"invalid optimizer={optimizer!r}: must be a torch.optim.Optimizer")
        if isinstance(optimizer, GSNR):
            raise ValueError(f"invalid optimizer={type(optimizer).__name__}: it already has the GSNR transform")
        if hasattr(optimizer, "synchronize") and hasattr(optimizer, "_parameter_names"):
            raise ValueError("invalid optimizer: it is already a DistributedOptimizer; apply GSNR first: "
                             "DistributedOptimizer(GSNR(opt), ...)")
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError("invalid optimizer=LBFGS: its closure re-evaluates gradients inside step(), "
                             "which have no gradient statistics; use a first-order optimizer")
        gamma, momentum = rules.check_gsnr(gamma, momentum)
        rules.check_bool("fused", fused, allow_none=True)
        exclude = grouping.patterns("exclude", exclude)
        clash = sorted(set(_KEYS) & set(optimizer.defaults))
        if clash and clash != sorted(_KEYS):  # all four: it was wrapped before (a reload)
            raise ValueError(f"invalid optimizer={type(optimizer).__name__}: its param groups already use "
                             f"{', '.join(clash)}, which the GSNR transform keeps there")
        self.optimizer = optimizer
        if not isinstance(getattr(optimizer, "_param_names", None), dict):
            optimizer._param_names = {}
        if named_parameters is not None:
            self._param_names.update({p: n for n, p in named_parameters})
        self._exclude = exclude
        self.defaults.update(gamma=gamma, gsnr_momentum=momentum, gsnr_exclude=(), gsnr_fused=fused)
        for group in self.param_groups:
            for key in _KEYS:
                # A group's own γ/β₃ (vr- classes take them per group) stays; a re-wrap sets anew.
                if clash or key not in group:
                    group[key] = self.defaults[key]
            self._setup_group(group)
        self._gsnr_sq = None       # s for the next step (set_grad_sq)
        self._gsnr_sq_owned = False  # True: the step may overwrite the s tensors (a wrapper's buffers)
        self._gsnr_source = None   # callable giving s when none was set (ddp.register)
        self._gsnr_diag = ()
        self._gsnr_floor = None    # ε_w of float16 squares (squares16.variance_floor), set with s
        self._patch_step_function()

    def _setup_group(self, group) -> None:
        """Check γ, β₃ (SPEC §2 ranges), resolve ``exclude`` to indices, add p_0 = 0 and t = 0.

        p_0 and t go beside state the wrapped rule built eagerly (hvd_lb's rules); lazily
        built state (torch.optim) gets them after the first step instead, so every rank
        holds the same keys for ``hvd.broadcast_optimizer_state``.
        """
        group["gamma"], group["gsnr_momentum"] = rules.check_gsnr(group["gamma"], group["gsnr_momentum"])
        group["gsnr_fused"] = rules.check_bool("gsnr_fused", group["gsnr_fused"], allow_none=True)
        if self._exclude and not group["gsnr_exclude"]:
            names = self._param_names
            if any(p not in names for p in group["params"]):
                raise ValueError("invalid exclude: parameter names are unknown; pass "
                                 "named_parameters=model.named_parameters()")
            group["gsnr_exclude"] = tuple(j for j, p in enumerate(group["params"])
                                          if any(fnmatchcase(names[p], pat) for pat in self._exclude))
        group["gsnr_exclude"] = tuple(group["gsnr_exclude"])
        skip = set(group["gsnr_exclude"])
        for j, p in enumerate(group["params"]):
            st = self.state.get(p)
            if st and j not in skip:
                st.setdefault(rules.GSNR_SLOT, _gsnr_slot(p))
                st.setdefault("gsnr_step", 0)

    # --- torch.optim.Optimizer, delegated ------------------------------------------------

    def add_param_group(self, param_group) -> None:
        """The wrapped optimizer's ``add_param_group`` (its defaults), then γ, β₃ as the transform's."""
        self.optimizer.add_param_group(param_group)
        self._setup_group(self.param_groups[-1])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def state_dict(self):
        """The wrapped optimizer's state dict: its state plus p_t and t, groups with γ, β₃."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        """Load into the wrapped optimizer; state dicts of older hvd_lb versions load too.

        Post hooks run last, as torch runs them, but on the transform's finished state (p_t in
        float32, the keys older versions lacked filled in).
        """
        hooks = self.optimizer._optimizer_load_state_dict_post_hooks
        saved = dict(hooks)
        hooks.clear()
        try:
            self.optimizer.load_state_dict(state_dict)
        finally:
            hooks.update(saved)
        keep_wide_state(self, state_dict, keys=(rules.GSNR_SLOT,))  # p_t stays float32
        for st in self.state.values():
            # Before the transform kept its own count, p_t's count was the rule's ``step``.
            if isinstance(st, dict) and rules.GSNR_SLOT in st and "gsnr_step" not in st and "step" in st:
                st["gsnr_step"] = int(st["step"])
        for group in self.param_groups:
            for key in _KEYS:  # saved before the key existed
                group.setdefault(key, self.defaults[key])
            self._setup_group(group)
        for hook in saved.values():
            hook(self.optimizer)

    def __getstate__(self):
        # torch.optim's own pickling drops the wrapped optimizer's parameter names.
        return {"optimizer": self.optimizer, "_exclude": self._exclude, "_names": dict(self._param_names)}

    def __setstate__(self, state) -> None:
        names = state.pop("_names", {})
        self.__dict__.update(state)
        self.__dict__.setdefault("_exclude", ())
        if not isinstance(getattr(self.optimizer, "_param_names", None), dict):
            self.optimizer._param_names = names
        self._gsnr_sq, self._gsnr_sq_owned, self._gsnr_source, self._gsnr_diag = None, False, None, ()
        self._gsnr_floor = None
        self._patch_step_function()

    def __repr__(self) -> str:
        g = self.defaults
        return f"GSNR(gamma={g['gamma']}, momentum={g['gsnr_momentum']}, optimizer={self.optimizer!r})"

    # --- the transform ----------------------------------------------------------------------

    def param_name(self, p: torch.Tensor) -> str:
        return param_name(self, p)

    def set_grad_sq(self, sq) -> None:
        """Give s = (1/k)Σx² (SPEC §1), one tensor (or None) per parameter in param-group order.

        Consumed by the next ``step()``.
        """
        sq = list(sq)
        params = [p for g in self.param_groups for p in g["params"]]
        if len(sq) != len(params):
            raise ValueError(f"invalid sq: got {len(sq)} tensors, the optimizer has {len(params)} parameters")
        out = {}
        for i, (p, s) in enumerate(zip(params, sq)):
            if s is not None:
                if not isinstance(s, torch.Tensor) or s.shape != p.shape:
                    raise ValueError(f"invalid sq[{i}]: must be a tensor of shape {tuple(p.shape)}")
                out[p] = s
        self._gsnr_sq = out
        self._gsnr_sq_owned = False

    def gsnr_diagnostics(self) -> Dict[str, Dict[str, float]]:
        """Last step's per-tensor mean GSNR mean(r_raw) and fraction of r̃ clipped up to γ.

        Computed during ``step()`` from the statistics already reduced: no communication.
        """
        out = {}
        for params, mus, clipped in self._gsnr_diag:
            for p, mu, c in zip(params, mus.tolist(), clipped.tolist()):
                out[param_name(self, p)] = {"mean_gsnr": float(mu), "clipped_fraction": float(c)}
        return out

    def step(self, closure=None):
        """Run ``closure`` (if given), ĝ into ``p.grad``, the wrapped rule's step, ḡ back."""
        loss = run_closure(closure)
        self._gsnr_step()
        return loss

    @torch.no_grad()
    def _gsnr_step(self) -> None:
        sq, self._gsnr_sq = self._gsnr_sq, None
        owned, self._gsnr_sq_owned = self._gsnr_sq_owned, False
        if sq is None and self._gsnr_source is not None:
            sq, owned = self._gsnr_source(self)
        floor, self._gsnr_floor = self._gsnr_floor, None
        diag, swapped, new_state = [], [], []
        for group in self.param_groups:
            skip = set(group["gsnr_exclude"])
            ps = [p for j, p in enumerate(group["params"]) if p.grad is not None and j not in skip]
            if not ps:
                continue
            ss = self._stats_for(ps, sq)
            g_hats, avgs, steps, mus, clipped = _gsnr(group, ps, ss, [self.state[p] for p in ps], owned, floor)
            diag.append((ps, mus.detach(), clipped.detach()))
            for p, g_hat, avg, t in zip(ps, g_hats, avgs, steps):
                swapped.append((p, p.grad))
                p.grad = g_hat
                new_state.append((p, avg, t))
        try:
            unhooked_step(self.optimizer)()
        finally:
            for p, g in swapped:
                p.grad = g
        for p, avg, t in new_state:
            st = self.state[p]
            if rules.GSNR_SLOT in st and st[rules.GSNR_SLOT] is not avg:
                st[rules.GSNR_SLOT].copy_(avg)
            else:
                # The dtype of eagerly built slots, whatever the working dtype: resumes stay exact.
                st[rules.GSNR_SLOT] = avg.to(state_dtype(p))
            st["gsnr_step"] = t
        self._gsnr_diag = tuple(diag)

    def _stats_for(self, ps, sq):
        if sq is not None and all(p in sq for p in ps):
            return [sq[p] for p in ps]
        if all(not p.grad.any() for p in ps):
            # ĝ = r ⊙ 0 = 0 for any r: no statistics needed. Horovod's broadcast_optimizer_state
            # initialises lazily-built state with one step on zero gradients.
            return [torch.zeros_like(p.grad) for p in ps]
        raise RuntimeError(
            f"{type(self).__name__} needs gradient statistics (s, the mean of squared gradient "
            "samples, docs/SPEC.md §1) and got none for this step: wrap it in "
            "hvd_lb.torch.DistributedOptimizer(opt, micro_batches=...), which all-reduces them "
            "(horovod.torch.DistributedOptimizer does not), or call opt.set_grad_sq([...]) before "
            "opt.step()")


GSNRTransform = GSNR  # the name before the transform was a class of its own


def _gsnr(group, ps, ss, states, owned, floor=None):
    """ĝ per tensor in float32 or wider. Returns (ĝ list, p_t list, t list, μ_r, clipped).

    ``floor``: ε_w where s came as float16 (at least the working dtype's own).

    A complex tensor is its real and imaginary parts as separate elements (torch.optim's rule,
    ``view_as_real``): s then holds E[(Re x)²] + i·E[(Im x)²].
    """
    gs = [real_view(p.grad) for p in ps]
    ss = [real_view(s) for s in ss]
    keys = [real_view(p) for p in ps]  # scratch buffers are per parameter, shaped like its real view
    # Working dtype: float32 or wider, and at least s's (square_dtype="float64" keeps squares of
    # |x| > 1.8e19 finite; the maths then runs in float64 too).
    wide = [g.to(torch.promote_types(torch.promote_types(g.dtype, torch.float32), s.dtype))
            for g, s in zip(gs, ss)]
    fused = _use_fused(group, ps[0].device)
    in_place = not fused and group.get("foreach") is not False
    # The foreach path writes ĝ over s: the caller's buffer where ``owned`` (the
    # DistributedOptimizer's), a working-dtype copy, or else a copy made here.
    ss = [s.to(g.dtype) if s.dtype != g.dtype else s if owned or not in_place else s.clone()
          for s, g in zip(ss, wide)]
    steps = [st.get("gsnr_step", 0) + 1 for st in states]  # lazily built: absent before step 1
    avgs = [real_view(st[rules.GSNR_SLOT]).to(g.dtype) if rules.GSNR_SLOT in st else torch.zeros_like(g)
            for st, g in zip(states, wide)]
    eps_w = [max(formulas.variance_floor(g.dtype == torch.float64), floor or 0.0) for g in wide]
    if fused:
        out, mus, clipped = _gsnr_fused(group, wide, ss, avgs, keys, steps, eps_w)
    elif in_place:
        out, avgs, mus, clipped = _gsnr_foreach(wide, ss, avgs, steps, eps_w, group["gamma"],
                                                group["gsnr_momentum"], scratch(keys, [g.dtype for g in wide]))
    else:
        res = [_gsnr_one(g, s, avg, t, group["gamma"], group["gsnr_momentum"], e)
               for g, s, avg, t, e in zip(wide, ss, avgs, steps, eps_w)]
        out, avgs = [r[0] for r in res], [r[1] for r in res]
        mus, clipped = torch.stack([r[2] for r in res]), torch.stack([r[3] for r in res])
    out = [_as_complex_like(o.to(g.dtype), p) for o, g, p in zip(out, gs, ps)]
    avgs = [_as_complex_like(a, p) for a, p in zip(avgs, ps)]
    return out, avgs, steps, mus, clipped


_AUTO_OFF: Dict = {}  # device type, or a refused (γ, β₃) → why auto (gsnr_fused=None) gave up


def _use_fused(group, device) -> bool:
    """``gsnr_fused`` resolved: None (auto) compiles where a compiler is present, the group
    leaves ``foreach`` to us, and no outer ``torch.compile`` is tracing this step."""
    choice = group["gsnr_fused"]
    if choice is not None:
        return choice
    return (group.get("foreach") is None and not torch.compiler.is_compiling()
            and device.type not in _AUTO_OFF and (group["gamma"], group["gsnr_momentum"]) not in _AUTO_OFF
            and compiler_present(device.type))


def compiled_paths(opt: GSNR) -> List[bool]:
    """Per param group, whether this rank's GSNR maths will run compiled (``_use_fused``)."""
    return [_use_fused(g, g["params"][0].device if g["params"] else torch.device("cpu")) for g in opt.param_groups]


def _gsnr_fused(group, wide, ss, avgs, keys, steps, eps_w):
    """The compiled path of ``_gsnr``: (ĝ list, μ_r, clipped). Nothing allocated per step: p_t
    goes into the state's buffer (its working-dtype copy where the state is narrower), ĝ into
    a buffer kept per parameter. Under auto a failure to compile warns once and the remaining
    tensors run the per-tensor formulas (the done ones are final: nothing is applied twice)."""
    gamma, b3 = group["gamma"], group["gsnr_momentum"]
    out = scratch(keys, [g.dtype for g in wide], tag="gsnr")
    todo, res, cache = list(zip(wide, ss, avgs, out, steps, eps_w)), [], {}
    try:
        fn = compile_kernel(_gsnr_into, (gamma, b3))
        with specialized_floats():
            for g, s, avg, o, t, e in todo:
                res.append(fn(*flat(g, s, avg, o), graph_scalar(t, g.device, cache), gamma, b3, e))
    except Exception as err:  # compiler and Dynamo errors have no common base class
        if group["gsnr_fused"] is not None:
            raise
        _give_up(wide[0].device.type, (gamma, b3), err)
        for g, s, avg, o, t, e in todo[len(res):]:
            g_hat, p_t, mu, c = _gsnr_one(g, s, avg, t, gamma, b3, e)
            avg.copy_(p_t)
            o.copy_(g_hat)
            res.append((mu, c))
    return out, torch.stack([r[0] for r in res]), torch.stack([r[1] for r in res])


def _give_up(device: str, key, err: Exception) -> None:
    """Auto could not compile: warn once, then foreach. A refused hyperparameter set
    (``KernelLimit``, ``key`` = (γ, β₃)) is given up alone; any other failure on ``device``
    for the rest of the process."""
    why = f"{type(err).__name__}: {err}".splitlines()[0]
    first = not _AUTO_OFF
    if isinstance(err, KernelLimit):
        _AUTO_OFF[key] = why
        what = f"γ, β₃ = {key}"
    else:
        _AUTO_OFF[device] = why
        what = f"{device} for the rest of this process"
    if first:
        warnings.warn(f"gsnr_fused=None (auto): the GSNR kernel was not compiled ({why}); the foreach path "
                      f"runs instead for {what}. Pass gsnr_fused=False to choose it, True to see the error",
                      RuntimeWarning, stacklevel=5)


def _as_complex_like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return torch.view_as_complex(t) if p.is_complex() else t


def _gsnr_one(g, s, avg, t, gamma, b3, eps_w):
    """One tensor, formulas as written: (ĝ, p_t, μ_r, clipped fraction). ``t`` may be a 0-d tensor."""
    r, mu, clipped = formulas.gsnr_ratio(T, g, s, gamma, eps_w)
    g_hat, p_t = formulas.gsnr_scale(T, g, r, avg, b3, t)
    return g_hat, p_t, mu, clipped


def _gsnr_into(g, s, avg, out, t, gamma, b3, eps_w):
    """``_gsnr_one`` writing ĝ into ``out`` and p_t into ``avg``; returns (μ_r, clipped fraction).

    The compiled kernel (``gsnr_fused`` True, or auto; ``compile_kernel``): one graph per dtype
    for every size and step (t a 0-d tensor, γ, β₃, ε_w constants); it writes into buffers it
    is given, so a step allocates nothing (on CPU a fresh buffer per tensor per step costs page
    faults comparable to the maths). Inductor makes three loops of it: mean(var), mean(r_raw),
    then p_t, ĝ and the clipped count together, which it fuses only because the count comes
    after the writes (before them it was a fourth loop re-reading ḡ and s: 32 → 25 ms on 9.4M
    float32 elements, one core); ~20 passes on the foreach path (``bench/gsnr_fused.py``).
    ĝ does not go over s: compiled under ``no_grad``, torch 2.13's Inductor read s after
    overwriting it (tests/test_torch_fused.py).
    """
    r_tilde, mu = formulas.gsnr_relative(T, g, s, eps_w)
    g_hat, p_t = formulas.gsnr_scale(T, g, T.clip(r_tilde, gamma, 1.0), avg, b3, t)
    avg.copy_(p_t)
    out.copy_(g_hat)
    return mu, formulas.clipped_fraction(T, r_tilde, gamma)


def _sums(tensors):
    """Σx per tensor of a non-negative (or sign-valued) list; plain sums beat ‖·‖₁ kernels on CPU."""
    return torch.stack([t.sum() for t in tensors]).abs()


def _scalars(vec: torch.Tensor) -> List[torch.Tensor]:
    # 0-dim tensors broadcast in _foreach_mul_ without a host sync.
    return list(vec.unbind())


def _gsnr_foreach(gs, ss, avgs, steps, eps_w, gamma, b3, r):
    """formulas.gsnr_ratio + gsnr_scale as in-place foreach kernels over a list.

    ``ss`` is overwritten and ends holding ĝ; ``r`` is scratch of the same shapes, so no
    list is allocated. Per-tensor means are sums/n of non-negative lists; the per-tensor
    scalars go through formulas' own expressions. Returns (ĝ = ss, p_t, μ_r, clipped).
    """
    n = torch.tensor([g.numel() for g in gs], dtype=gs[0].dtype, device=gs[0].device)
    var = ss
    mul_into(r, ss, eps_w)                                    # ε_w·s
    torch._foreach_addcmul_(var, gs, gs, value=-1.0)          # s − ḡ²
    torch._foreach_maximum_(var, r)                           # var = max(s − ḡ², ε_w·s)
    mul_into(r, gs, gs)                                       # ḡ²
    delta = formulas.DELTA_REL * (_sums(var) / n) + formulas.DELTA_ABS
    torch._foreach_add_(var, _scalars(delta))
    torch._foreach_div_(r, var)                               # r_raw
    mu = _sums(r) / n
    zero = mu == 0
    torch._foreach_div_(r, _scalars(torch.where(zero, torch.ones_like(mu), mu)))
    torch._foreach_add_(r, _scalars(zero.to(mu.dtype)))      # r̃ = 1 where μ_r = 0 (r_raw ≡ 0 there)
    clipped = torch.stack([(t < gamma).sum() for t in r]).to(mu.dtype) / n
    torch._foreach_clamp_min_(r, gamma)
    torch._foreach_clamp_max_(r, 1.0)                         # r = clip(r̃, γ, 1)
    if b3 == 0.0:
        torch._foreach_copy_(avgs, r)                         # p_t = r
        mul_into(ss, gs, r)                                   # ĝ = r·ḡ
    else:
        torch._foreach_lerp_(avgs, r, 1.0 - b3)               # p_t = β₃p + (1−β₃)r
        mul_into(ss, gs, avgs)
        torch._foreach_div_(ss, [1.0 - b3 ** t for t in steps])  # ĝ = p_t/(1−β₃^t)·ḡ
    return ss, avgs, mu, clipped


def vr_class(base: type, rule: rules.Rule) -> type:
    """The class of ``vr-X``: ``GSNR`` in front of ``X`` (``base``), built from one argument list.

    γ and β₃ are keyword arguments (``gamma``, ``gsnr_momentum``; defaults from the rule
    table, also accepted per param group); ``gsnr_fused`` follows ``fused`` unless given
    (neither given: auto, see ``GSNR``).
    Every other argument goes to ``base``.
    """
    defaults = rule.defaults

    def __init__(self, params, lr=None, *, gamma=defaults["gamma"],
                 gsnr_momentum=defaults["gsnr_momentum"], gsnr_fused=None, **hparams):
        rules.check_bool("gsnr_fused", gsnr_fused, allow_none=True)
        if gsnr_fused is None:
            gsnr_fused = hparams.get("fused")  # None: auto
        try:
            inner = base(params, lr, **hparams)
        except ValueError as e:  # name the optimizer the user asked for
            raise ValueError(str(e).replace(f"optimizer '{rule.base}'", f"optimizer '{rule.name}'")) from None
        GSNR.__init__(self, inner, gamma=gamma, momentum=gsnr_momentum, fused=gsnr_fused)

    def __repr__(self):
        return f"{rule.class_name}({self.optimizer!r})"

    return type(rule.class_name, (GSNR,), {
        "__init__": __init__, "__repr__": __repr__, "rule_name": rule.name,
        "rule": property(lambda self: rules.get_rule(self.rule_name), doc="the rule table's entry")})


__all__ = ["GSNR", "GSNRTransform", "compiled_paths", "param_name", "unhooked_step", "vr_class"]
