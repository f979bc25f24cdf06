"""hvd_lb without Horovod: s for the GSNR transform from a ``DistributedDataParallel`` hook.

Usage (``torchrun --nproc_per_node N train.py``)::

    import hvd_lb.torch as lb
    dist.init_process_group("gloo")            # or "nccl"
    model = DDP(model)
    opt = lb.create("vr-lamb", model.module, lr=...)     # or lb.GSNR(torch.optim.AdamW(...))
    lb.ddp.register(model, opt, micro_batches=M)
    for batch in loader:
        for i, micro in enumerate(batch.chunk(M)):
            with model.no_sync() if i < M - 1 else contextlib.nullcontext():
                (loss_fn(model(micro)) / M).backward()    # micro-batches are summed
        opt.step()
        opt.zero_grad()
    dist.destroy_process_group()    # else Gloo can abort at exit (pytorch/pytorch#190489)

docs/SPEC.md §1 with W = world size and k = W·M samples x_{w,m} = M·g_{w,m}:

* during the M − 1 ``no_sync()`` micro-batches each worker accumulates Σ_m g_m²
  locally (g_m = p.grad after the backward minus p.grad before it);
* the communication hook sends each bucket's gradients and the local shares
  M·Σ_m g_m² in ONE all-reduce (two launched together when the gradients are
  float16/bfloat16 and s float32), returns ḡ = (1/k)Σx to DDP and keeps
  s = (1/k)Σx² per parameter (bucket rebuilds change nothing: s is keyed by
  parameter);
* the optimizer's step takes s from here (after a closure's backward, if any), rescaled
  by (‖p.grad‖/‖ḡ‖)² so that GradScaler's unscale and gradient clipping apply to s too.

``square_dtype="float16"``: s goes as float16 scaled per parameter by 2^e (a second all-reduce
launched with the gradients'), checked and unscaled at the step (``hvd_lb.squares16``, SPEC §1).
``gsnr_interval=N``: s on every N-th step, reused in between (the other steps reduce ḡ alone).

Optimizers without the GSNR transform need no hook: DDP's own all-reduce already
gives ḡ, and ``register`` only checks the arguments.
"""
# No ``from __future__ import annotations``: DDP checks the hook's return annotation object.
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .. import rules, squares16
from ._squares import MicroBatchSquares, follow_rescale, norms, peaks, work_dtype
from .gsnr import GSNR, compiled_paths


class DDPStatistics:
    """What ``register`` installed: k = world_size·micro_batches, and s until the next step."""

    def __init__(self, model, optimizer, micro_batches: int, group, square_dtype=None, gsnr_interval=1):
        self.optimizer = optimizer
        self.square_dtype = square_dtype
        self.gsnr_interval = gsnr_interval
        self._count = 0        # steps since registered: s on every gsnr_interval-th
        self._kept = {}        # p → s of the last statistics step (gsnr_interval > 1)
        self._exponents = {}   # p → e of float16 squares (None/absent: float32 next)
        self._pending16 = {}   # p → (reduced 2^e·Σ_w s_w as float16, this rank's float32 share, e)
        self.redone = 0        # tensors whose float16 squares were reduced again in float32
        self.micro_batches = micro_batches
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.k = self.world_size * micro_batches
        self.gsnr = isinstance(optimizer, GSNR)
        self._squares = MicroBatchSquares()
        self._stats = {}  # p → s (a view into the bucket's reduced tensor)
        self._norms = {}  # p → ‖ḡ‖, to follow later rescaling
        if not self.gsnr:
            return
        for p in model.module.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._accumulate)
        model.register_comm_hook(self, _comm_hook)
        optimizer._gsnr_source = self._take

    def statistics_step(self) -> bool:
        """s is reduced this step (every bucket alike: all ranks count the same steps)."""
        return squares16.is_statistics_step(self._count, self.gsnr_interval) or not self._kept

    def _accumulate(self, p):
        if p.grad.is_sparse:
            raise ValueError("hvd_lb.torch.ddp: sparse gradients are not supported with GSNR (the "
                             "element-wise variance needs every element); use a dense embedding")
        before = self._squares.count.get(p, 0)
        if before >= self.micro_batches:
            raise RuntimeError(
                f"more than micro_batches={self.micro_batches} backward passes before DDP synchronised: "
                "run micro_batches − 1 micro-batches inside model.no_sync() and the last one outside")
        if self.micro_batches == 1 or not self.statistics_step():
            # Only counted (a no_sync() pass would be a second sample): s comes from the bucket.
            self._squares.count[p] = before + 1
        else:
            self._squares.add(p, p.grad.detach(), work_dtype(p.dtype), keep_prev=before + 1 < self.micro_batches)

    def _local_squares(self, bucket, out, scale):
        """Write this worker's share of s times ``scale`` into ``out``, laid out like ``bucket.buffer()``."""
        pairs = _offsets(bucket)
        if self.micro_batches == 1:
            for p, _ in pairs:
                self._squares.count.pop(p, None)
            buf = bucket.buffer()
            if buf.dtype == out.dtype:
                torch.mul(buf, buf, out=out)
            else:
                out.copy_(buf)
                out.mul_(out)
            out.mul_(scale)
            return
        if sum(p.numel() for p, _ in pairs) != out.numel():
            out.zero_()  # gaps between the gradients in the bucket
        for p, off in pairs:
            n = self._squares.count.get(p, 0)
            if n not in (0, self.micro_batches):
                raise RuntimeError(
                    f"DDP synchronised after {n} backward pass(es), expected micro_batches="
                    f"{self.micro_batches}: run the first {self.micro_batches - 1} micro-batch(es) of "
                    "each step inside model.no_sync()")
            local = self._squares.take(p, 1)  # Σ_m g_m²; times M below, in the same pass
            view = out[off:off + p.numel()]
            if local is None:  # p unused on this worker (find_unused_parameters)
                view.zero_()
            else:
                torch.mul(local.reshape(-1), self.micro_batches * scale, out=view)

    def _keep(self, bucket, gbar, sq):
        """Store s (unless None: float16 squares, pending) and ‖ḡ‖ per parameter of the bucket."""
        pairs = _offsets(bucket)
        views = [gbar[off:off + p.numel()] for p, off in pairs]
        for (p, off), nrm in zip(pairs, norms(views)):
            if sq is not None:
                self._stats[p] = sq[off:off + p.numel()].view_as(p)
            self._norms[p] = nrm

    def _skip_squares(self, bucket):
        """A step of a gsnr_interval that reduces ḡ alone: drop the micro-batch counts."""
        for p, _ in _offsets(bucket):
            self._squares.count.pop(p, None)
            self._squares.prev.pop(p, None)

    def _float16_ready(self, bucket) -> bool:
        return self.square_dtype == "float16" and all(
            self._exponents.get(p) is not None for p, _ in _offsets(bucket))

    def _float16_wire(self, bucket, local):
        """2^e·(this worker's share of s) per parameter, as float16, laid out like the bucket."""
        wire = torch.zeros(local.numel(), dtype=torch.float16, device=local.device)
        for p, off in _offsets(bucket):
            n = p.numel()
            wire[off:off + n] = local[off:off + n] * 2.0 ** self._exponents[p]
        return wire

    def _hold16(self, bucket, half, local, gbar):
        """Hold the reduced float16 squares, the local float32 share (for a redo) and ḡ as it came
        off the wire (a copy: p.grad may be unscaled or clipped before the step; the floor
        s ≥ ḡ² + a is in the units of the reduced squares)."""
        for p, off in _offsets(bucket):
            n = p.numel()
            self._pending16[p] = (half[off:off + n], local[off:off + n], self._exponents[p],
                                  gbar[off:off + n].to(local.dtype, copy=True))

    def _finish16(self):
        """s of the float16 buckets: check (identically on every rank), redo in float32, unscale.

        One host read for the peaks; the flagged tensors go again in one float32 all-reduce,
        in parameter order (the same on every rank); the rest is s = max(2^−e·Σ/W, ḡ² + a).
        """
        W = self.world_size
        ps = [p for g in self.optimizer.param_groups for p in g["params"] if p in self._pending16]
        top = peaks([self._pending16[p][0] for p in ps])
        redo = [p for p, m in zip(ps, top)
                if squares16.needs_redo(m, m == 0 and p.grad is not None
                                        and bool(self._pending16[p][3].count_nonzero()))]
        if redo:
            flat = torch.cat([self._pending16[p][1] for p in redo]).div_(W)
            dist.all_reduce(flat, group=self.group)
            self.redone += len(redo)
            for p, s in zip(redo, flat.split([p.numel() for p in redo])):
                self._stats[p] = s.view_as(p)
        flagged = set(redo)
        for p, m in zip(ps, top):
            half, local, e, gbar = self._pending16[p]
            if p not in flagged:
                s = local.copy_(half).mul_(2.0 ** -e / W).view_as(p)
                if p.grad is not None:
                    g = gbar.view_as(p)  # ḡ off the wire, before any unscale or clipping
                    torch.maximum(s, (g * g).add_(squares16.absolute_floor(e, W, W)), out=s)
                self._stats[p] = s
                self._exponents[p] = squares16.next_exponent(m * 2.0 ** -e / W, W, 1.0, e)
        self._pending16.clear()
        fresh = [p for p in self._stats if p in flagged or self._exponents.get(p) is None]
        if fresh:
            for p, m in zip(fresh, peaks([self._stats[p] for p in fresh])):
                self._exponents[p] = squares16.next_exponent(m, W, 1.0, self._exponents.get(p))

    def _take(self, optimizer):
        """s for the optimizer's step, one tensor (or None) per parameter, and ``owned=True``.

        The tensors are views of this step's reduced buckets: the transform may overwrite them.
        """
        stats_step = self.statistics_step()
        self._count += 1
        if self.square_dtype == "float16":
            if self._pending16 or self._stats:
                self._finish16()
            optimizer._gsnr_floor = squares16.variance_floor(self.world_size)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if not stats_step and self._kept:
            # gsnr_interval: s of the last statistics step, as that step used it (SPEC §1).
            self._norms.clear()
            return {p: self._kept[p] for p in params if p.grad is not None and p in self._kept}, False
        if not self._stats:
            return None, False
        sq = [self._stats.pop(p, None) if p.grad is not None else None for p in params]
        have = [(s, p) for s, p in zip(sq, params) if s is not None]
        follow_rescale([s for s, _ in have], norms([p.grad for _, p in have]), [self._norms[p] for _, p in have])
        self._stats.clear()
        self._norms.clear()
        out = {p: s for p, s in zip(params, sq) if s is not None}
        if self.gsnr_interval > 1:
            self._kept = out
            return out, False
        return out, True


def _offsets(bucket):
    """(parameter, offset of its gradient in ``bucket.buffer()``) for every parameter of the bucket."""
    base = bucket.buffer().storage_offset()
    return [(p, g.storage_offset() - base) for p, g in zip(bucket.parameters(), bucket.gradients())]


def _comm_hook(state: "DDPStatistics", bucket) -> torch.futures.Future[torch.Tensor]:
    """All-reduce [g, M·Σ_m g_m²] of one bucket; the future's value is ḡ (SPEC §1)."""
    buf = bucket.buffer()
    n, W = buf.numel(), state.world_size
    dtype = work_dtype(buf.dtype)
    if not state.statistics_step():
        # gsnr_interval: ḡ alone this step, as DDP's own hook.
        state._skip_squares(bucket)
        fut = dist.all_reduce(buf.div_(W), group=state.group, async_op=True).get_future()

        def done(f):
            return f.value()[0]
    elif state._float16_ready(bucket):
        # Float16 squares (SPEC §1): Σ_w 2^e·s_w all-reduced beside ḡ, checked at the step.
        local = torch.empty(n, dtype=dtype, device=buf.device)
        state._local_squares(bucket, local, 1.0)
        return _beside(state, bucket, state._float16_wire(bucket, local), dtype,
                       lambda half, gbar: state._hold16(bucket, half, local, gbar))
    elif buf.dtype == dtype:
        # 1/W folded into the local copies: the all-reduced sum is already the mean.
        flat = buf.new_empty(2 * n)
        torch.div(buf, W, out=flat[:n])
        state._local_squares(bucket, flat[n:], 1.0 / W)
        fut = dist.all_reduce(flat, group=state.group, async_op=True).get_future()

        def done(f):
            red = f.value()[0]
            gbar, s = red[:n], red[n:]
            state._keep(bucket, gbar, s)
            return gbar
    else:
        # Low-precision gradients, float32 s: two all-reduces launched together.
        sq = torch.empty(n, dtype=dtype, device=buf.device)
        state._local_squares(bucket, sq, 1.0 / W)
        return _beside(state, bucket, sq, dtype, None)
    return fut.then(done)


def _beside(state, bucket, squares, dtype, hold):
    """All-reduce ḡ and ``squares`` as two all-reduces launched together; the future gives ḡ.

    ``hold``: None keeps the reduced squares as s (they are the mean: 1/W folded in); else it
    takes them (float16 squares, checked and unscaled at the step).
    """
    grad = bucket.buffer().div_(state.world_size)
    f_g = dist.all_reduce(grad, group=state.group, async_op=True).get_future()
    f_s = dist.all_reduce(squares, group=state.group, async_op=True).get_future()

    def done(f):
        gbar, s = f.value()[0].value()[0], f.value()[1].value()[0]
        if hold is not None:
            hold(s, gbar)
        state._keep(bucket, gbar.to(dtype), s if hold is None else None)
        return gbar
    return torch.futures.collect_all([f_g, f_s]).then(done)


def register(model: DistributedDataParallel, optimizer: torch.optim.Optimizer, micro_batches: int = 1,
             process_group: Optional[object] = None, square_dtype: Optional[str] = None,
             gsnr_interval: int = 1) -> DDPStatistics:
    """Make ``optimizer`` get ḡ and s = (1/k)Σx² from ``model``'s DDP all-reduce (docs/SPEC.md §1).

    Args:
        model: a ``torch.nn.parallel.DistributedDataParallel``, before its first backward.
        optimizer: any torch optimizer over ``model``'s parameters. With the GSNR transform
            (``vr-*`` rules, ``hvd_lb.torch.GSNR(opt)``) a communication hook is installed
            and the optimizer's step takes s from it (after a closure's backward, if any);
            without it DDP's own all-reduce is already the rule's ḡ.
        micro_batches: M backward passes per step, the first M − 1 inside ``model.no_sync()``.
            Gradients are SUMMED over them (as Horovod's ``backward_passes_per_step``): scale
            each micro-batch's loss by 1/M for the mean. GSNR needs k = world size·M ≥ 2.
        process_group: the group DDP reduces over (default: the model's).
        square_dtype: None/"float32" (float32 s; float64 for float64 parameters) or "float16"
            (scaled per parameter, reduced as float16: 1.5× DDP's bytes; SPEC §1).
        gsnr_interval: N ≥ 1, s reduced on every N-th step and reused in between (SPEC §1).

    Returns the ``DDPStatistics`` (``k``, ``world_size``, ``micro_batches``).
    """
    if not isinstance(model, DistributedDataParallel):
        raise ValueError(f"invalid model={type(model).__name__}: must be a "
                         "torch.nn.parallel.DistributedDataParallel (model = DDP(model) first)")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"invalid optimizer={optimizer!r}: must be a torch.optim.Optimizer")
    if hasattr(optimizer, "synchronize") and hasattr(optimizer, "_parameter_names"):
        raise ValueError(f"invalid optimizer={type(optimizer).__name__}: it is a Horovod "
                         "DistributedOptimizer; under DDP pass the plain optimizer")
    micro_batches = rules.check_micro_batches(micro_batches)
    square_dtype = rules.check_square_dtype(square_dtype)
    if square_dtype not in (None, "float32", "float16"):
        raise ValueError(f"invalid square_dtype={square_dtype!r} for hvd_lb.torch.ddp: must be None, "
                         "'float32' or 'float16'")
    gsnr_interval = squares16.check_interval(gsnr_interval)
    if getattr(model, "_hvd_lb_ddp", None) is not None:
        raise ValueError("invalid model: hvd_lb.torch.ddp.register was already called for it "
                         "(DDP takes one communication hook)")
    group = process_group if process_group is not None else model.process_group
    if group is None:
        raise ValueError("invalid process_group=None: the model has no process group; "
                         "call torch.distributed.init_process_group first")
    reduced = {p for p in model.module.parameters() if p.requires_grad}
    foreign = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad and p not in reduced]
    if foreign:
        raise ValueError(f"invalid optimizer: {len(foreign)} of its parameter(s) are not trainable "
                         "parameters of model, so DDP does not reduce them")
    if isinstance(optimizer, GSNR):
        workers = dist.get_world_size(group)
        if workers * micro_batches < 2:
            raise ValueError(
                f"{type(optimizer).__name__} (GSNR) needs k = world size × micro_batches ≥ 2 gradient "
                f"samples to estimate the variance, got k = {workers} × {micro_batches} = "
                f"{workers * micro_batches}: launch 2 or more processes (torchrun --nproc_per_node 2) "
                "or pass micro_batches=2 or more (the first ones inside model.no_sync())")
        rules.check_samples(workers, micro_batches)
        # Ranks that disagree would reduce different buckets (float16 beside ḡ or not, s or
        # not on a step) and hang: one small all-gather now, the same error on every rank.
        # The Horovod wrapper's settings (skip_nonfinite, op and predivide: DDP has none of them).
        mine = rules.agreement_settings(True, optimizer.optimizer, micro_batches, square_dtype, False, None, 1.0,
                                        gsnr_interval, compiled_paths(optimizer))
        every = [None] * workers
        dist.all_gather_object(every, mine, group=group)
        ranks = dist.get_process_group_ranks(group) if hasattr(dist, "get_process_group_ranks") \
            else list(range(workers))
        error = rules.disagreement(every, ranks, "hvd_lb.torch.ddp.register")
        if error:
            raise ValueError(error)
    state = DDPStatistics(model, optimizer, micro_batches, group, square_dtype, gsnr_interval)
    model._hvd_lb_ddp = state
    return state


__all__ = ["register", "DDPStatistics"]
