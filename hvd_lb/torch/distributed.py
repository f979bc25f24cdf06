"""Horovod ``DistributedOptimizer`` for any torch optimizer, with s for GSNR (docs/SPEC.md §1).

Optimizers without the GSNR transform: Horovod's own wrapper, one all-reduce per gradient.

With the GSNR transform (``vr-*`` rules, ``GSNR(opt)``): k = W·M gradient samples x_{w,m} = M·g_{w,m}, where g_{w,m} is one
micro-batch's gradient (p.grad after that backward minus p.grad before).  Each
worker accumulates Σ_m g_m² during the micro-batches; at the last one, for each
tensor, the gradient and its local mean of squares M·Σ_m g_m² are all-reduced
(Average) in ONE grouped call, so ḡ and s = (1/k)Σx² leave in the same cycle.
With ``square_dtype="bfloat16"`` s travels as bf16 where that is fewer bytes
(``rules.square_wire_dtype``: W ≤ 3): Horovod 0.28 cannot all-reduce bf16
tensors, so it goes as an allgather of the bf16 bits (int16) enqueued together
with the gradient all-reduce, averaged locally in float32. With ``square_dtype="float16"``
s goes in the same group as float16, scaled per tensor by 2^e (``hvd_lb.squares16``);
with ``gsnr_interval=N`` it goes on every N-th step only and is reused in between.
"""
from __future__ import annotations

import json
import os
import warnings
import weakref
from contextlib import contextmanager

import torch

from .. import rules, squares16
from ._ops import real_view, run_closure
from ._squares import MicroBatchSquares, follow_rescale, norms, peaks, work_dtype
from .gsnr import GSNR, compiled_paths, unhooked_step

try:
    import horovod.torch as hvd
    from horovod.torch import optimizer as _hvd_optimizer
    _HVD_ERROR = None
except ImportError as e:  # pragma: no cover - horovod is a hard dependency at run time
    hvd = None
    _HVD_ERROR = e

_UNSET = object()


_NO_BACKWARD = ("optimizer.step() without loss.backward() since the last step: there are no new gradient "
                "samples, so the GSNR statistics would be stale (call backward() {M} time(s) per step)")


class _WireDtypes:
    """Horovod's compression, with the dtypes Horovod 0.28 cannot all-reduce sent as ones it can.

    bfloat16 goes as float32 and comes back as bf16 (``Tensor type torch.BFloat16Tensor is
    not supported``); a complex tensor goes as its real view (re, im as two elements, which
    is what the mean of complex numbers is). ``compress``/``decompress`` are where Horovod
    lets a wrapper change what travels.
    """

    def __init__(self, compression):
        self.compression = compression

    def compress(self, tensor):
        dtype = tensor.dtype
        if tensor.is_complex():
            tensor = torch.view_as_real(tensor)
        elif dtype == torch.bfloat16:
            tensor = tensor.float()
        tensor, ctx = self.compression.compress(tensor)
        return tensor, (dtype, ctx)

    def decompress(self, tensor, ctx):
        dtype, ctx = ctx
        tensor = self.compression.decompress(tensor, ctx)
        return torch.view_as_complex(tensor.contiguous()) if dtype.is_complex else tensor.to(dtype)


def _weak_hook(opt):
    """A gradient hook that holds ``opt`` weakly: a deleted optimizer leaves no live hook behind."""
    ref = weakref.ref(opt)

    def hook(p):
        opt = ref()
        if opt is not None:
            opt._hook(p)
    return hook


class _DistributedGSNR(GSNR):
    """The GSNR transform fed by Horovod: [ḡ, s] of each tensor in one grouped all-reduce.

    Takes over a ``GSNR`` (same wrapped optimizer, same settings). ``__module__`` is
    Horovod's so that ``hvd.broadcast_optimizer_state`` recognises a DistributedOptimizer
    and initialises state with the transform's local step (``super(cls, opt).step()``),
    never all-reducing.
    """

    def __init__(self, gsnr, named_parameters, compression, micro_batches, op, process_set,
                 square_dtype, predivide, skip_nonfinite, config, gsnr_interval=1):
        GSNR.__setstate__(self, GSNR.__getstate__(gsnr))
        self._config = config  # DistributedOptimizer's arguments, for copies (``__reduce__``)
        self._compression = _WireDtypes(compression)
        # Horovod's gradient_predivide_factor f: 1/f before the sum, f/size after (same mean).
        self._scale = (1.0 / predivide, predivide)
        self.micro_batches = micro_batches
        self.op = op
        self.process_set = process_set
        self.square_dtype = square_dtype
        self.skip_nonfinite, self.skipped_steps = skip_nonfinite, 0
        self.gsnr_interval = gsnr_interval
        self._stat_count = 0  # synchronize() calls since built or loaded: s on every N-th (SPEC §1)
        self._kept = {}       # p → s of the last statistics step (gsnr_interval > 1)
        self._exponents = {}  # p → e of float16 squares (2^e·s on the wire), None: float32 next
        self._local = {}      # p → this rank's float32 share of s, until the float16 one is checked
        self.redone = 0       # tensors whose float16 squares were reduced again in float32
        self._parameter_names = _names(self, named_parameters)
        self._param_names.update(self._parameter_names)
        self._delay = {p: micro_batches for p in self._parameter_names}
        self._squares = MicroBatchSquares()  # Σ_m g_m² per tensor over this step's micro-batches
        self._absent = set()  # parameters sent as zeros this step (no gradient on this rank)
        self._handles = {}   # p → (kind, handle(s), compression ctx)
        self._stats = {}     # p → s after synchronize()
        self._gnorm = {}     # p → ‖ḡ‖ after a user's synchronize(), to follow later rescaling
        self._in_step = False  # step() is synchronizing: no rescaling can follow, no norms
        self._requires_update = set()
        self._hooks = []
        self._synchronized = False
        self._should_synchronize = True
        self._warned_sparse = False
        self._backward_seen = False
        for group in self.param_groups:
            self._hook_group(group)

    def __del__(self):
        for h in getattr(self, "_hooks", ()):
            h.remove()

    def __reduce__(self):
        """deepcopy/pickle: the transform and the wrapped optimizer, wrapped anew (fresh hooks).

        What a step has accumulated before ``step()`` (micro-batch squares, pending
        all-reduces) is not copied: copy between steps.
        """
        gsnr = GSNR.__new__(GSNR)
        GSNR.__setstate__(gsnr, GSNR.__getstate__(self))
        return _rebuild, (gsnr, self._config, self.skipped_steps)

    def _hook_group(self, group):
        if not self.process_set.included():
            return
        # Unlike Horovod we hook even with one process: micro-batch squares are local work.
        for p in group["params"]:
            if p.requires_grad and p not in self._requires_update:
                self._requires_update.add(p)
                self._delay[p] = self.micro_batches
                self._hooks.append(p.register_post_accumulate_grad_hook(_weak_hook(self)))

    def add_param_group(self, param_group):
        """Horovod's rule: a group added after wrapping is reduced too (named by position)."""
        GSNR.add_param_group(self, param_group)
        group, i = self.param_groups[-1], len(self.param_groups) - 1
        for j, p in enumerate(group["params"]):
            self._parameter_names.setdefault(p, f"allreduce.noname.{i}.{j}")
            self._param_names.setdefault(p, self._parameter_names[p])
        self._hook_group(group)

    # --- per-backward work ----------------------------------------------------------

    def _work_dtype(self, p):
        return work_dtype(p.dtype, self.square_dtype)

    def _needs_stats(self, p) -> bool:
        """Whether p's s is reduced this step: a statistics step, or none kept for p yet."""
        return squares16.is_statistics_step(self._stat_count, self.gsnr_interval) or p not in self._kept

    def _densify(self, p):
        if p.grad.is_sparse:
            if not self._warned_sparse:
                warnings.warn("hvd_lb: sparse gradients are densified for VR optimizers (the "
                              "element-wise variance needs every element)", stacklevel=3)
                self._warned_sparse = True
            p.grad = p.grad.to_dense()

    def _hook(self, p):
        if not self._backward_seen:
            # k at the first backward of every step, before anything is sent: an elastic reset
            # can change the worker count (SPEC §2: refuse k < 2).
            rules.check_samples(self.process_set.size(), self.micro_batches)
            self._backward_seen = True
        if self._delay[p] <= 0:
            raise AssertionError(
                f"gradients were computed more than micro_batches={self.micro_batches} times "
                "before step(): pass a larger micro_batches to DistributedOptimizer")
        self._densify(p)
        if self._needs_stats(p):
            self._squares.add(p, real_view(p.grad.detach()), self._work_dtype(p),
                              keep_prev=self.micro_batches > 1 and self._delay[p] > 1)
        self._delay[p] -= 1
        if self._delay[p] == 0:
            self._enqueue(p)

    def _enqueue(self, p):
        # 1 where this rank has a gradient: the mean over ranks tells, in the same all-reduce,
        # whether any rank had one (none: the parameter is left alone, as torch does).
        present = (torch.ones if p.grad is not None else torch.zeros)(1, device=p.device)
        if p.grad is None:
            # Not used on this rank, maybe on others: its samples are zero here.
            p.grad = torch.zeros_like(p)
            self._absent.add(p)
        self._densify(p)
        name = self._parameter_names[p]
        grad, ctx = self._compression.compress(p.grad)
        pre, post = self._scale
        if not self._needs_stats(p):
            # gsnr_interval: ḡ alone; s of the last statistics step is reused (SPEC §1).
            h = hvd.grouped_allreduce_async_([grad, present], name=name, op=self.op, process_set=self.process_set,
                                             prescale_factor=pre, postscale_factor=post)
            self._handles[p] = ("grad", h, ctx)
            return
        # Local share of s, M·Σ_m g_m²; Average over workers gives (1/k)Σx².
        sq = self._squares.take(p, self.micro_batches)
        if sq is None:
            sq = torch.zeros_like(real_view(p), dtype=self._work_dtype(p))
        e = self._exponents.get(p) if self.square_dtype == "float16" else None
        if e is not None:
            # 2^e·s as float16 beside ḡ; the float32 share stays for a redo (squares16.needs_redo).
            self._local[p] = sq
            wire = torch.mul(sq, 2.0 ** e).to(torch.float16)
            h = hvd.grouped_allreduce_async_([grad, wire, present], name=name, op=self.op,
                                             process_set=self.process_set,
                                             prescale_factor=pre, postscale_factor=post)
            self._handles[p] = ("float16", h, ctx)
        elif self.square_dtype == "bfloat16":
            bits = sq.to(torch.bfloat16).view(torch.int16).reshape(1, -1)
            h_g = hvd.grouped_allreduce_async_([grad, present], name=name, op=self.op,
                                               process_set=self.process_set,
                                               prescale_factor=pre, postscale_factor=post)
            h_s = hvd.allgather_async(bits, name=name + ".sq", process_set=self.process_set)
            self._handles[p] = ("split", (h_g, h_s), ctx)
        else:
            h = hvd.grouped_allreduce_async_([grad, sq, present], name=name, op=self.op,
                                             process_set=self.process_set,
                                             prescale_factor=pre, postscale_factor=post)
            self._handles[p] = ("grouped", h, ctx)

    # --- Horovod's calling conventions ------------------------------------------------

    def synchronize(self):
        """Wait for ḡ and s of every tensor; afterwards p.grad holds ḡ (as with Horovod)."""
        # s of a step whose optimizer.step() never came (GradScaler's inf skip) is stale.
        self._stats.clear()
        self._gnorm.clear()
        if not self.process_set.included():
            self._synchronized = True
            return
        stale = not self._backward_seen
        if stale:
            if self.process_set.size() == 1:
                raise RuntimeError(_NO_BACKWARD.format(M=self.micro_batches))
            # Several ranks: the others may already wait in the all-reduces of this step. Take
            # part with zeros (presence 0, the old gradients dropped); if no rank had a backward,
            # every rank raises below, together.
            for p in self._requires_update:
                p.grad = None
        self._backward_seen = False
        passes = {self.micro_batches - self._delay[p] for p in self._requires_update - set(self._handles)}
        short = sorted(n for n in passes if 0 < n < self.micro_batches)
        if short:
            # k = W·M would count samples that were never taken (SPEC §2: never a silent k).
            raise RuntimeError(
                f"optimizer.step() after {short[0]} backward pass(es), expected micro_batches="
                f"{self.micro_batches}: the statistics would count {self.micro_batches} samples per worker. "
                "Run micro_batches backward passes per step (split a short last batch into "
                f"{self.micro_batches} chunks, or drop it)")
        alone = self.process_set.size() == 1
        for p in self._requires_update - set(self._handles):
            # One process: a parameter no backward reached keeps grad None and is not stepped,
            # as in torch. Several: zeros, so that every rank reduces and steps it alike.
            if not (alone and p.grad is None):
                self._enqueue(p)
        present, half = {}, {}
        for p, (kind, handle, ctx) in self._handles.items():
            if kind == "grouped":
                grad, sq, present[p] = hvd.synchronize(handle)
            elif kind == "grad":
                grad, present[p] = hvd.synchronize(handle)
                p.grad.set_(self._compression.decompress(grad, ctx))
                continue
            elif kind == "float16":
                grad, half[p], present[p] = hvd.synchronize(handle)
                p.grad.set_(self._compression.decompress(grad, ctx))
                continue
            else:
                grad, present[p] = hvd.synchronize(handle[0])
                bits = hvd.synchronize(handle[1])
                sq = bits.view(torch.bfloat16).reshape(-1, real_view(p).numel()).float().mean(0)
            p.grad.set_(self._compression.decompress(grad, ctx))
            self._stats[p] = self._as_stats(p, sq)
        if self.square_dtype == "float16":
            self._float16_stats(half)
        # Only a parameter this rank did not use can be unused everywhere: one host read for those.
        absent = [p for p in self._absent if p in present]
        means = torch.cat([present[p] for p in absent]).tolist() if absent else []
        for p, mean in zip(absent, means):
            if mean == 0:  # no rank had a gradient: grad None, not stepped (identical on every rank)
                p.grad = None
                self._stats.pop(p, None)
        self._absent.clear()
        nobody = stale and all(m == 0 for m in means)  # no rank had a backward: all raise below
        if stale and not nobody:
            warnings.warn("optimizer.step() without loss.backward() on this rank since the last step: "
                          "its gradient samples count as zeros (other ranks had gradients)")
        for p in self._delay:
            self._delay[p] = self.micro_batches
        self._stat_count += 1
        if not self._in_step:
            # A user's synchronize(): p.grad may be rescaled before step() (clipping,
            # GradScaler), and s must follow. One foreach pass in float32 (float64 only on
            # overflow): a float64 norm would copy every gradient to float64.
            synced = [p for p in self._handles if p.grad is not None and p in self._stats]
            self._gnorm.update(zip(synced, norms([p.grad for p in synced])))
        self._handles.clear()
        self._synchronized = True
        if nobody:
            self._synchronized = False
            raise RuntimeError(_NO_BACKWARD.format(M=self.micro_batches))

    def _float16_stats(self, half):
        """s from the reduced float16 squares ``half`` (p → 2^e·s₁₆), and every tensor's next e.

        Every rank holds the same reduced values, so every rank flags the same tensors
        (``squares16.needs_redo``) and reduces them again in float32 together, by name.
        The rest is unscaled in float32 as s = max(2^−e·s₁₆, ḡ² + a) (SPEC §1).
        """
        W, f = self.process_set.size(), 1.0 / self._scale[0]
        ps = list(half)
        top = peaks(list(half.values()))
        redo = [p for p, m in zip(ps, top)
                if squares16.needs_redo(m, m == 0 and bool(p.grad.count_nonzero()))]
        pre, post = self._scale
        handles = [hvd.allreduce_async_(self._local[p], name=self._parameter_names[p] + ".sq32", op=self.op,
                                        process_set=self.process_set, prescale_factor=pre, postscale_factor=post)
                   for p in redo]
        self.redone += len(redo)
        for p, h in zip(redo, handles):
            self._stats[p] = self._as_stats(p, hvd.synchronize(h))
        flagged = set(redo)
        for p, m in zip(ps, top):
            if p in flagged:
                continue
            e = self._exponents[p]
            s = self._local[p].copy_(half[p].view_as(self._local[p])).mul_(2.0 ** -e)
            g = real_view(p.grad).to(s.dtype)
            # s ≥ ḡ² (+ a: elements below float16's normal range keep a variance)
            torch.maximum(s, (g * g).add_(squares16.absolute_floor(e, W)), out=s)
            self._stats[p] = self._as_stats(p, s)
            self._exponents[p] = squares16.next_exponent(m * 2.0 ** -e, W, f, e)
        # First step (or a redo): e from the float32 s just reduced.
        fresh = [p for p in self._stats if p in flagged or p not in self._exponents or self._exponents[p] is None]
        if fresh:
            for p, m in zip(fresh, peaks([real_view(self._stats[p]) for p in fresh])):
                self._exponents[p] = squares16.next_exponent(m, W, f, self._exponents.get(p))
        self._local.clear()

    def _as_stats(self, p, sq):
        sq = sq.to(self._work_dtype(p)).view(real_view(p).shape)
        return torch.view_as_complex(sq) if p.is_complex() else sq

    @contextmanager
    def skip_synchronize(self):
        """``synchronize(); <clip grads>; with opt.skip_synchronize(): opt.step()``."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    # Eager under torch.compile(opt.step): Horovod's collectives are calls into C that Dynamo
    # cannot trace, and the bookkeeping keyed by parameter does not survive its graph breaks.
    @torch._dynamo.disable
    def step(self, closure=None):
        """Run ``closure`` (its backward feeds the all-reduce), synchronize (unless skipped), step.

        s follows any uniform rescaling of ḡ made after ``synchronize()``
        (GradScaler's unscale, norm clipping): every sample is rescaled alike,
        so s is multiplied by (‖g_now‖/‖ḡ‖)² per tensor.
        """
        # Horovod reduces again after a synchronize() (the mean of equal values); s of the first
        # reduction stands, so this wrapper does not.
        loss = _closure_and_synchronize(self, closure, again=False, in_step=True)
        sq, rescaled = {}, []
        reuse = self.gsnr_interval > 1
        for group in self.param_groups:
            for p in group["params"]:
                s = self._stats.pop(p, None)
                n0 = self._gnorm.pop(p, None)
                if s is None and reuse and p.grad is not None and p in self._kept:
                    sq[p] = self._kept[p]  # as the statistics step used it (SPEC §1)
                    continue
                if s is not None and p.grad is not None:
                    rescaled.append((s, p, n0))
                    sq[p] = s
        # Clipping or unscaling between a user's synchronize() and this step changed ‖p.grad‖
        # (GradScaler's in-place unscale leaves no version count to tell by). n0 is None where
        # this step synchronized itself: nothing ran in between, and no norm is taken.
        follow = [(s, p, n0) for s, p, n0 in rescaled if n0 is not None]
        follow_rescale([s for s, _, _ in follow], norms([p.grad for _, p, _ in follow]), [n0 for _, _, n0 in follow])
        if self.skip_nonfinite and _skip(self, list(sq.values())):
            return loss  # the kept s stays that of the last finite statistics step
        if reuse and rescaled and (self.skip_nonfinite or _finite(self, [s for s, _, _ in rescaled])):
            # Kept only from a statistics step whose ḡ and s are finite (else the previous kept s
            # stands), and as a copy: s is the squares buffer the next statistics step overwrites.
            for s, p, _ in rescaled:
                self._kept[p] = s.clone()
        # s is this wrapper's buffer (or a fresh tensor): the transform may overwrite it, unless
        # it is kept for the steps of a gsnr_interval.
        self._gsnr_sq, self._gsnr_sq_owned = sq, not reuse
        if self.square_dtype == "float16":
            self._gsnr_floor = squares16.variance_floor(self.process_set.size())
        self._gsnr_step()
        return loss

    def zero_grad(self, set_to_none: bool = True):
        _check_no_pending(self)
        if any(self._squares.count.values()):
            # g_m = p.grad − p.grad before: zeroing between micro-batches would invent a sample.
            raise RuntimeError(
                f"optimizer.zero_grad() between micro-batches: with micro_batches={self.micro_batches} "
                "gradients accumulate over the backward passes of one step; call zero_grad() once "
                "per step, after optimizer.step()")
        return GSNR.zero_grad(self, set_to_none)

    def _reset_statistics(self):
        """Forget kept s, float16 exponents and the interval counter: the next step reduces
        s in float32 on every rank, as the first step (after a state load or broadcast, ranks
        must agree on the collective layout)."""
        self._stats.clear()
        self._gnorm.clear()
        self._kept.clear()
        self._local.clear()
        self._exponents.clear()
        self._stat_count = 0

    def load_state_dict(self, state_dict):
        self._handles.clear()
        self._absent.clear()
        self._squares.clear()
        self._reset_statistics()
        self._synchronized = False
        self._should_synchronize = True
        self._backward_seen = False
        for p in self._delay:
            self._delay[p] = self.micro_batches
        GSNR.load_state_dict(self, state_dict)


# Horovod's broadcast_optimizer_state recognises its wrappers by module and then steps the
# base class only (never all-reducing); ours must be recognised the same way.
_DistributedGSNR.__module__ = _hvd_optimizer.DistributedOptimizer.__module__ if hvd is not None else __name__
_DistributedGSNR.__qualname__ = _DistributedGSNR.__name__ = "DistributedGSNR"


def _finite(opt, extra=()) -> bool:
    """Whether every ḡ and ``extra`` tensor is finite (identical on every rank: no communication)."""
    tensors = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None] + list(extra)
    return not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _skip(opt, extra=()) -> bool:
    """``skip_nonfinite``: True (and the step is skipped) when ḡ or s has a non-finite element.

    ḡ and s are already all-reduced, so every rank sees the same values and skips together
    without communicating. Costs one pass over them and one host sync, hence opt-in.
    """
    tensors = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None] + list(extra)
    if not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        return False
    opt.skipped_steps += 1
    if opt.skipped_steps % rules.SKIP_WARN_EVERY == 1:
        warnings.warn(f"hvd_lb: non-finite averaged gradient or squares: step skipped on every rank "
                      f"({opt.skipped_steps} skipped so far; optimizer state untouched)")
    return True


def _closure_and_synchronize(opt, closure, again: bool, in_step: bool = False):
    """The start of a wrapper's step: the closure (its backward feeds the all-reduce), then
    ``synchronize()`` unless skipped or, where not ``again``, already done. Returns the loss.

    ``in_step``: that synchronize is marked as the step's own (``_in_step``), not one the
    closure or the user made, after which ḡ may be rescaled before the step.
    """
    loss = run_closure(closure)
    if opt._should_synchronize:
        if opt._synchronized:
            warnings.warn("optimizer.step() called without optimizer.skip_synchronize() after "
                          "optimizer.synchronize(). This can cause training slowdown.")
        if again or not opt._synchronized:
            opt._in_step = in_step
            try:
                opt.synchronize()
            finally:
                opt._in_step = False
    opt._synchronized = False
    return loss


@torch._dynamo.disable  # eager under torch.compile(opt.step), as _DistributedGSNR.step
def _horovod_step(self, closure=None):
    """Horovod's step, with the closure run first (its backward feeds the all-reduce), torch's
    hooks run once (Horovod's calls the hooked step of its base class inside its own hooked
    step) and ``skip_nonfinite``."""
    loss = _closure_and_synchronize(self, closure, again=True)
    if self.skip_nonfinite and _skip(self):
        return loss
    unhooked_step(self, type(self).__mro__[1])()
    return loss


def _check_no_pending(opt) -> None:
    """Horovod's ``zero_grad`` check: no all-reduce may still be writing into a gradient."""
    if opt._handles:
        raise AssertionError("optimizer.zero_grad() was called after loss.backward() but before "
                             "optimizer.step() or optimizer.synchronize(): this is prohibited "
                             "as it can cause a race condition")


def _horovod_zero_grad(self, set_to_none: bool = True):
    """Horovod's ``zero_grad`` check, with torch's ``set_to_none`` (Horovod's takes no argument)."""
    _check_no_pending(self)
    return type(self).__mro__[1].zero_grad(self, set_to_none)


def _horovod_reduce(self):
    """deepcopy/pickle of Horovod's wrapper: the optimizer it was built from, wrapped anew."""
    base = type(self).__mro__[1]
    plain = base.__new__(base)
    base.__setstate__(plain, {"defaults": self.defaults, "state": self.state, "param_groups": self.param_groups,
                              "_param_names": getattr(self, "_param_names", {})})
    return _rebuild, (plain, self._config, self.skipped_steps)


def _rebuild(optimizer, config, skipped_steps):
    opt = DistributedOptimizer(optimizer, **config)
    opt.skipped_steps = skipped_steps
    return opt


def _names(opt, named_parameters):
    """Horovod's checks: (name, tensor) tuples, unique names, every parameter named."""
    if named_parameters is None:
        return {p: f"allreduce.noname.{i}.{j}" for i, g in enumerate(opt.param_groups)
                for j, p in enumerate(g["params"])}
    named_parameters = list(named_parameters)
    if any(not isinstance(x, tuple) or len(x) != 2 for x in named_parameters):
        raise ValueError("invalid named_parameters: must be (name, parameter) tuples, usually "
                         "model.named_parameters()")
    seen, dups = set(), set()
    for n, _ in named_parameters:
        (dups if n in seen else seen).add(n)
    if dups:
        raise ValueError(f"invalid named_parameters: names must be unique, duplicates: {sorted(dups)}")
    named = {p: n for n, p in named_parameters}
    missing = [p for g in opt.param_groups for p in g["params"] if p not in named]
    if missing:
        raise ValueError(f"invalid named_parameters: {len(missing)} optimizer parameter(s) are not named")
    return named


def DistributedOptimizer(optimizer, named_parameters=None, compression=_UNSET, backward_passes_per_step=None,
                         op=_UNSET, gradient_predivide_factor=1.0, num_groups=0, groups=None,
                         sparse_as_dense=False, process_set=_UNSET, *, micro_batches=None,
                         square_dtype=None, skip_nonfinite=False, gsnr_interval=1):
    """``horovod.torch.DistributedOptimizer`` with s for the GSNR transform (docs/SPEC.md §1).

    Takes Horovod's arguments with Horovod's defaults, and any torch optimizer:

    * ``optimizer``: any ``torch.optim.Optimizer``. Without the GSNR transform it is
      exactly Horovod's wrapper (one all-reduce per gradient). With it (``vr-*`` rules,
      ``hvd_lb.torch.GSNR(opt)``) each tensor's ḡ and s = (1/k)Σx² leave in one grouped
      all-reduce, and the step runs on ĝ.
    * ``named_parameters``: ``model.named_parameters()`` (names for the all-reduce and
      diagnostics; taken from ``hvd_lb.torch.create(name, model)`` when not given).
    * ``compression``: ``hvd.Compression.none`` (default) or ``.fp16``; applies to ḡ only.
    * ``backward_passes_per_step`` / ``micro_batches`` (the same thing, say one): M backward
      passes per ``step()``. Gradients are SUMMED over the M micro-batches, as in Horovod:
      scale each micro-batch's loss by 1/M for the mean. VR rules need k = size·M ≥ 2.
    * ``op``: ``hvd.Average`` (default), ``hvd.Sum`` or ``hvd.Adasum`` (not with GSNR:
      ḡ and s are means over samples).
    * ``gradient_predivide_factor``: f, gradients are divided by f before the sum and
      multiplied by f/size after (with GSNR: ḡ and s alike).
    * ``num_groups``, ``groups``: Horovod's fusion groups (without GSNR; with GSNR each
      tensor's [ḡ, s] pair is one group and these are ignored).
    * ``sparse_as_dense``: as Horovod (GSNR always densifies: the variance is per element).
    * ``process_set``: ``hvd.global_process_set`` (default); k counts its workers.
    * ``square_dtype`` (GSNR only): None or ``"float32"`` (float32; float64 for float64
      parameters), ``"float64"``, or ``"bfloat16"`` where that is fewer bytes
      (``rules.square_wire_dtype``), or ``"float16"``: scaled per tensor by a power of two
      every rank knows, reduced as float16 in the same group as ḡ (1.5× plain Horovod's bytes
      at any worker count; ``hvd_lb.squares16``, SPEC §1); torch dtypes are accepted too.
    * ``gsnr_interval`` (GSNR only): N ≥ 1, s is reduced on every N-th step and reused with
      each step's ḡ in between ((1 + 1/N)× the bytes of ḡ alone with float32 s; SPEC §1).
    * ``skip_nonfinite``: skip the step on every rank together when the averaged ḡ (or s)
      has a NaN/inf element, leaving the optimizer state untouched; counted in
      ``opt.skipped_steps``, one warning per 100 skips. Off by default: it costs one pass
      over the gradients and a host sync per step (no communication: ḡ and s are reduced).

    Returns, without GSNR, Horovod's wrapper: an optimizer of a subclass of
    ``type(optimizer)``; with GSNR, a ``DistributedGSNR`` (a ``GSNR``, holding the same
    wrapped optimizer as ``.optimizer``). Both have ``synchronize()`` and
    ``skip_synchronize()``; with GSNR also ``gsnr_diagnostics()`` and ``set_grad_sq``.
    """
    if hvd is None:
        raise ImportError(f"hvd_lb.torch.DistributedOptimizer needs horovod.torch: {_HVD_ERROR}")
    compression = hvd.Compression.none if compression is _UNSET else compression
    op = hvd.Average if op is _UNSET else op
    process_set = hvd.global_process_set if process_set is _UNSET else process_set
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"invalid optimizer={optimizer!r}: must be a torch.optim.Optimizer")
    if hasattr(optimizer, "_parameter_names") and hasattr(optimizer, "synchronize"):
        raise ValueError(f"invalid optimizer={type(optimizer).__name__}: it is already a DistributedOptimizer; "
                         "wrap the plain optimizer once")
    if not (callable(getattr(compression, "compress", None)) and callable(getattr(compression, "decompress", None))):
        raise ValueError(f"invalid compression={compression!r}: must be hvd.Compression.none, "
                         "hvd.Compression.fp16 or a Compressor class")
    micro_batches = _micro_batches(backward_passes_per_step, micro_batches)
    if isinstance(gradient_predivide_factor, bool) or not isinstance(gradient_predivide_factor, (int, float)) \
            or not 0 < gradient_predivide_factor < float("inf"):
        raise ValueError(f"invalid gradient_predivide_factor={gradient_predivide_factor!r}: must be in (0, inf)")
    square_dtype = rules.check_square_dtype(square_dtype)
    gsnr_interval = squares16.check_interval(gsnr_interval)
    if not isinstance(skip_nonfinite, bool):
        raise ValueError(f"invalid skip_nonfinite={skip_nonfinite!r}: must be True or False")
    names = None
    if named_parameters is not None:
        named_parameters = list(named_parameters)
    elif getattr(optimizer, "_param_names", None):
        names = dict(optimizer._param_names)
    config = dict(named_parameters=named_parameters, compression=compression, micro_batches=micro_batches,
                  op=op, gradient_predivide_factor=gradient_predivide_factor, num_groups=num_groups,
                  groups=groups, sparse_as_dense=sparse_as_dense, process_set=process_set,
                  square_dtype=square_dtype, skip_nonfinite=skip_nonfinite, gsnr_interval=gsnr_interval)

    if not isinstance(optimizer, GSNR):
        names_now = {p: n for n, p in named_parameters} if named_parameters is not None else names or {}
        settings = _agree(_settings(optimizer, names_now, config, square_dtype), process_set)
        # Exactly Horovod's wrapper: one all-reduce per gradient.
        wrapped = hvd.DistributedOptimizer(
            optimizer, named_parameters=named_parameters, compression=_WireDtypes(compression),
            backward_passes_per_step=micro_batches, op=op,
            gradient_predivide_factor=gradient_predivide_factor, num_groups=num_groups, groups=groups,
            sparse_as_dense=sparse_as_dense, process_set=process_set)
        if named_parameters is not None:
            wrapped._param_names = {p: n for n, p in named_parameters}
        elif names:
            wrapped._param_names = names
        wrapped.skip_nonfinite, wrapped.skipped_steps = skip_nonfinite, 0
        wrapped._agreement = (settings, process_set)
        # Horovod rebuilds the optimizer from its param groups alone: keep the constructor's
        # values for groups added later, and the state it had (a loaded checkpoint, a copy).
        wrapped.defaults = optimizer.defaults
        wrapped.state.update(optimizer.state)
        wrapped._config = config
        # Horovod builds a new class per call: its step (hooked once by torch), zero_grad and
        # copies become ours.
        cls = type(wrapped)
        cls.step = torch.optim.Optimizer.profile_hook_step(_horovod_step)
        cls.step.hooked = True
        cls.zero_grad = _horovod_zero_grad
        cls.__reduce__ = _horovod_reduce
        return wrapped

    rules.check_gsnr_op(op, type(optimizer).__name__)
    if num_groups or groups is not None:
        raise ValueError(f"invalid {'num_groups=' + repr(num_groups) if num_groups else 'groups=' + repr(groups)} "
                         "with the GSNR transform: each tensor's [ḡ, s] pair is its own group; leave "
                         "num_groups=0 and groups=None (Horovod's tensor fusion still batches them)")
    if process_set.included():
        rules.check_samples(process_set.size(), micro_batches)
        square_dtype = rules.square_wire_dtype(square_dtype, process_set.size())
    if named_parameters is None and names:
        named_parameters = [(n, p) for p, n in names.items()]
    settings = _agree(_settings(optimizer, {p: n for n, p in named_parameters or ()}, config, square_dtype),
                      process_set)
    wrapped = _DistributedGSNR(optimizer, named_parameters, compression, micro_batches, op, process_set,
                            square_dtype, float(gradient_predivide_factor), skip_nonfinite, config, gsnr_interval)
    wrapped._agreement = (settings, process_set)
    return wrapped


def broadcast_optimizer_state(optimizer, root_rank, model=None):
    """``hvd.broadcast_optimizer_state``, without moving any parameter.

    Horovod builds missing state with one step on zero gradients, taken on every rank whose
    state is empty. Weight decay (``AdamW``, SGD's ``weight_decay``) then moves the parameters
    of those ranks after ``hvd.broadcast_parameters``: a rank-0-only resume ends with ranks
    apart. Here every parameter and gradient is put back after that step, and state that the
    root did not have either (a fresh start) is removed again, so the first real step builds
    it as a run without the broadcast does. Same arguments as Horovod's.
    """
    if hvd is None:
        raise ImportError(f"hvd_lb.torch.broadcast_optimizer_state needs horovod.torch: {_HVD_ERROR}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    kept = [(p, p.detach().clone(), p.grad) for p in params]
    had = {p for p in params if optimizer.state.get(p)}
    root_had_state = hvd.broadcast_object(bool(had), root_rank, name="hvd_lb.optimizer_state_exists")
    hvd.broadcast_optimizer_state(optimizer, root_rank, model=model)
    with torch.no_grad():
        for p, w, g in kept:
            p.copy_(w)
            p.grad = g
    if not root_had_state:
        for p in params:
            if p not in had:
                optimizer.state.pop(p, None)
    # Kept s, float16 exponents and the gsnr_interval counter are per rank: a new or restored
    # rank would otherwise send another collective layout (SPEC §1). Every rank starts over.
    reset = getattr(optimizer, "_reset_statistics", None)
    if reset is not None:
        reset()


def _settings(optimizer, names, config, square_dtype) -> dict:
    """What every rank must agree on: hvd_lb's settings and the tensors it reduces, in order."""
    gsnr, groups = isinstance(optimizer, GSNR), optimizer.param_groups
    out = rules.agreement_settings(
        gsnr, optimizer.optimizer if gsnr else optimizer, config["micro_batches"], square_dtype,
        config["skip_nonfinite"], config["op"], config["gradient_predivide_factor"], config["gsnr_interval"],
        compiled_paths(optimizer) if gsnr else None,
        **{"tensors (name, shape, dtype, requires_grad)": [
            [names.get(p, f"param_groups.{i}.{j}"), list(p.shape), str(p.dtype).replace("torch.", ""), p.requires_grad]
            for i, g in enumerate(groups) for j, p in enumerate(g["params"])]})
    if gsnr:
        out["GSNR gamma, momentum, exclude per group"] = [
            [g["gamma"], g["gsnr_momentum"], list(g["gsnr_exclude"])] for g in groups]
    return out


def _allgather_json(obj, name, process_set) -> list:
    """``obj`` (JSON) of every rank of ``process_set``, in rank order (Horovod 0.28's
    ``allgather_object`` takes no process set)."""
    data = torch.tensor(list(json.dumps(obj, sort_keys=True).encode()), dtype=torch.uint8)
    sizes = hvd.allgather(torch.tensor([data.numel()]), name=name + ".n", process_set=process_set).tolist()
    padded = torch.zeros(1, max(sizes), dtype=torch.uint8)
    padded[0, :data.numel()] = data
    rows = hvd.allgather(padded, name=name, process_set=process_set)
    return [json.loads(bytes(rows[i, :n].tolist()).decode()) for i, n in enumerate(sizes)]


def _agree(settings: dict, process_set) -> dict:
    """``check_agreement`` now, or under elastic Horovod at every sync of
    ``hvd_lb.torch.elastic.TorchState`` (a worker added later builds its wrapper alone: a
    collective there would wait for ranks that never join it)."""
    if os.environ.get("HOROVOD_ELASTIC") != "1":
        check_agreement(settings, process_set)
    return settings


def check_agreement(settings: dict, process_set) -> None:
    """Raise the same ``ValueError`` on every rank when ranks differ in ``settings``.

    One small all-gather when the wrapper is built, before any gradient is reduced: ranks that
    disagree about what hvd_lb reduces would otherwise enqueue different collectives and hang.
    """
    if not process_set.included() or process_set.size() < 2:
        return
    every = _allgather_json(settings, "hvd_lb.agreement", process_set)
    error = rules.disagreement(every, process_set.ranks or list(range(len(every))), "DistributedOptimizer")
    if error:
        raise ValueError(error)


def _micro_batches(backward_passes_per_step, micro_batches) -> int:
    """Horovod's ``backward_passes_per_step`` and hvd_lb's ``micro_batches`` are one argument."""
    if backward_passes_per_step is not None and micro_batches is not None \
            and backward_passes_per_step != micro_batches:
        raise ValueError(f"invalid micro_batches={micro_batches!r} with backward_passes_per_step="
                         f"{backward_passes_per_step!r}: they are the same argument, pass one")
    value = micro_batches if micro_batches is not None else backward_passes_per_step
    return rules.check_micro_batches(1 if value is None else value)


__all__ = ["DistributedOptimizer", "broadcast_optimizer_state"]
