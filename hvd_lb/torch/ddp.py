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

Optimizers without the GSNR transform need no hook: DDP's own all-reduce already
gives ḡ, and ``register`` only checks the arguments.
"""
# No ``from __future__ import annotations``: DDP checks the hook's return annotation object.
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .. import rules
from ._squares import MicroBatchSquares, follow_rescale, norms, work_dtype
from .gsnr import GSNR


class DDPStatistics:
    """What ``register`` installed: k = world_size·micro_batches, and s until the next step."""

    def __init__(self, model, optimizer, micro_batches: int, group):
        self.optimizer = optimizer
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

    def _accumulate(self, p):
        if p.grad.is_sparse:
            raise ValueError("hvd_lb.torch.ddp: sparse gradients are not supported with GSNR (the "
                             "element-wise variance needs every element); use a dense embedding")
        before = self._squares.count.get(p, 0)
        if before >= self.micro_batches:
            raise RuntimeError(
                f"more than micro_batches={self.micro_batches} backward passes before DDP synchronised: "
                "run micro_batches − 1 micro-batches inside model.no_sync() and the last one outside")
        if self.micro_batches == 1:
            # Only counted (a no_sync() pass would be a second sample): s comes from the bucket.
            self._squares.count[p] = 1
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
        """Store s and ‖ḡ‖ per parameter of the bucket."""
        pairs = _offsets(bucket)
        views = [gbar[off:off + p.numel()] for p, off in pairs]
        for (p, off), nrm in zip(pairs, norms(views)):
            self._stats[p] = sq[off:off + p.numel()].view_as(p)
            self._norms[p] = nrm

    def _take(self, optimizer):
        """s for the optimizer's step, one tensor (or None) per parameter, and ``owned=True``.

        The tensors are views of this step's reduced buckets: the transform may overwrite them.
        """
        if not self._stats:
            return None, False
        params = [p for group in optimizer.param_groups for p in group["params"]]
        sq = [self._stats.pop(p, None) if p.grad is not None else None for p in params]
        have = [(s, p) for s, p in zip(sq, params) if s is not None]
        for (s, p), n1 in zip(have, norms([p.grad for _, p in have])):
            follow_rescale(s, n1, self._norms[p])
        self._stats.clear()
        self._norms.clear()
        return {p: s for p, s in zip(params, sq) if s is not None}, True


def _offsets(bucket):
    """(parameter, offset of its gradient in ``bucket.buffer()``) for every parameter of the bucket."""
    base = bucket.buffer().storage_offset()
    return [(p, g.storage_offset() - base) for p, g in zip(bucket.parameters(), bucket.gradients())]


def _comm_hook(state: "DDPStatistics", bucket) -> torch.futures.Future[torch.Tensor]:
    """All-reduce [g, M·Σ_m g_m²] of one bucket; the future's value is ḡ (SPEC §1)."""
    buf = bucket.buffer()
    n, W = buf.numel(), state.world_size
    dtype = work_dtype(buf.dtype)
    if buf.dtype == dtype:
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
        grad = buf.div_(W)
        f_g = dist.all_reduce(grad, group=state.group, async_op=True).get_future()
        f_s = dist.all_reduce(sq, group=state.group, async_op=True).get_future()
        fut = torch.futures.collect_all([f_g, f_s])

        def done(f):
            gbar = f.value()[0].value()[0]
            s = f.value()[1].value()[0]
            state._keep(bucket, gbar.to(dtype), s)
            return gbar
    return fut.then(done)


def register(model: DistributedDataParallel, optimizer: torch.optim.Optimizer, micro_batches: int = 1,
             process_group: Optional[object] = None) -> DDPStatistics:
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
    state = DDPStatistics(model, optimizer, micro_batches, group)
    model._hvd_lb_ddp = state
    return state


__all__ = ["register", "DDPStatistics"]
