"""The ops namespace ``B`` that lets ``hvd_lb.formulas`` run on torch tensors."""
from __future__ import annotations

import torch


def _is_tensor(x) -> bool:
    return isinstance(x, torch.Tensor)


class TorchOps:
    """``B`` for torch tensors; scalar arguments go through clamp so no tensor is built for them."""

    square = staticmethod(torch.square)
    sqrt = staticmethod(torch.sqrt)
    exp = staticmethod(torch.exp)
    mean = staticmethod(torch.mean)
    where = staticmethod(torch.where)
    ones_like = staticmethod(torch.ones_like)
    zeros_like = staticmethod(torch.zeros_like)
    logical_and = staticmethod(torch.logical_and)

    @staticmethod
    def maximum(x, y):
        return torch.maximum(x, y) if _is_tensor(y) else torch.clamp_min(x, y)

    @staticmethod
    def minimum(x, y):
        return torch.minimum(x, y) if _is_tensor(y) else torch.clamp_max(x, y)

    @staticmethod
    def clip(x, lo, hi):
        return torch.clamp(x, lo, hi)

    @staticmethod
    def norm(x):
        return torch.linalg.vector_norm(x)

    @staticmethod
    def cast_like(x, like):
        return x.to(like.dtype)


T = TorchOps
