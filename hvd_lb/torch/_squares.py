"""Local pieces of s = (1/k)Σx² (docs/SPEC.md §1) shared by the Horovod and DDP paths.

* ``MicroBatchSquares``: Σ_m g_m² per tensor over a worker's M micro-batches, where
  g_m = p.grad after the m-th backward minus p.grad before it.
* ``norms`` and ``follow_rescale``: s after a uniform rescaling of ḡ (GradScaler's unscale,
  norm clipping).
"""
from __future__ import annotations

import torch

from ._ops import real_view


def work_dtype(dtype: torch.dtype, square_dtype=None) -> torch.dtype:
    """float32, or float64 for float64 (complex128) parameters or ``square_dtype="float64"`` (SPEC §1).

    Squares of a complex tensor are those of its real view (re², im²).
    """
    wide = dtype in (torch.float64, torch.complex128) or square_dtype == "float64"
    return torch.float64 if wide else torch.float32


class MicroBatchSquares:
    """Σ_m g_m² per parameter, in the working dtype; buffers are reused across steps."""

    def __init__(self):
        self.acc = {}    # p → Σ_m g_m² so far
        self.count = {}  # p → micro-batches accumulated in acc this step
        self.prev = {}   # p → p.grad after the previous micro-batch (a buffer of self.held)
        self.held = {}   # p → buffer kept across steps for prev, so no micro-batch allocates

    def add(self, p, grad: torch.Tensor, dtype: torch.dtype, keep_prev: bool) -> int:
        """Add (grad − p.grad before)²; ``keep_prev`` when another micro-batch follows.

        ``grad`` is p.grad after this backward (zero_grad() before the first).
        Returns the number of micro-batches accumulated so far.
        """
        wide = grad.to(dtype)
        prev = self.prev.pop(p, None)
        # g_m = grad − prev goes into prev's buffer, which then holds this grad for the next one.
        g_m = wide if prev is None else torch.sub(wide, prev, out=prev)
        acc = self._buffer(self.acc, p, wide)
        n = self.count.get(p, 0)
        if n == 0:
            torch.mul(g_m, g_m, out=acc)
        else:
            acc.addcmul_(g_m, g_m)
        self.count[p] = n + 1
        if keep_prev:
            # p.grad is accumulated in place by the next backward: keep a copy.
            self.prev[p] = self._buffer(self.held, p, wide).copy_(wide)
        return n + 1

    @staticmethod
    def _buffer(store, p, like):
        b = store.get(p)
        if b is None or b.shape != like.shape or b.dtype != like.dtype:
            b = store[p] = torch.empty_like(like)
        return b

    def take(self, p, micro_batches: int):
        """This worker's share of s, (1/M)Σ_m (M·g_m)² = M·Σ_m g_m² (None if no backward reached p).

        The returned tensor is the reused buffer: consume it before the next ``add``.
        """
        self.prev.pop(p, None)
        if not self.count.pop(p, 0):
            return None
        acc = self.acc[p]
        return acc.mul_(micro_batches) if micro_batches > 1 else acc

    def clear(self) -> None:
        self.count.clear()
        self.prev.clear()


def peaks(tensors) -> list:
    """max of each tensor as host floats, in one read (0 for an empty tensor, on its device)."""
    if not tensors:
        return []
    return torch.stack([t.max().float() if t.numel() else t.new_zeros((), dtype=torch.float32)
                        for t in tensors]).tolist()


def norms(tensors):
    """‖t‖ per tensor as float64 0-dim tensors: one pass in float32 or wider, float64 only on overflow.

    A float64 norm of a float32 tensor costs a float64 copy of it; the float32 norm is
    exact enough for a ratio and overflows only where ‖t‖ > 3.4e38 (a scaled gradient).
    """
    if not tensors:
        return []
    tensors = [real_view(t) for t in tensors]
    out = [n.double() for n in torch._foreach_norm(
        [t if t.dtype in (torch.float32, torch.float64) else t.float() for t in tensors], 2)]
    if not bool(torch.isfinite(torch.stack(out)).all()):
        out = [n if torch.isfinite(n) else torch.linalg.vector_norm(t, dtype=torch.float64)
               for n, t in zip(out, tensors)]
    return out


def follow_rescale(ss, norm1, norm0) -> None:
    """s ← s · (norm1/norm0)² per tensor, in place: norm0 = ‖ḡ‖ when s was reduced, norm1 =
    ‖p.grad‖ at the step (``norms``' 0-d tensors).

    Every sample is rescaled alike by GradScaler's unscale or norm clipping, so s follows ḡ
    with the square of the factor (1 where ḡ was zero). Most steps rescale nothing: one host
    read of the factors (``norms`` already makes one) skips the pass over s where it is 1.
    """
    if not ss:
        return
    n1, n0 = torch.stack(list(norm1)), torch.stack(list(norm0))
    ratio = torch.where(n0 > 0, n1 / torch.where(n0 > 0, n0, 1.0), 1.0)
    factor = ratio * ratio
    for s, f, one in zip(ss, factor.unbind(), (factor == 1).tolist()):
        if not one:
            s.mul_(f.to(s.dtype))


__all__ = ["MicroBatchSquares", "follow_rescale", "norms", "peaks", "work_dtype"]
