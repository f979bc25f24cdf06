"""PyTorch backend of hvd_lb, and a drop-in for ``horovod.torch``.

``import hvd_lb.torch as hvd`` gives everything ``horovod.torch`` gives (``init``,
``rank``, ``broadcast_parameters``, ``broadcast_optimizer_state``, the collectives,
``Compression``, ``Average``/``Sum``/``Adasum``, process sets, ``join``, ``elastic``, …),
with ``DistributedOptimizer`` a superset of Horovod's, plus hvd_lb's own: every rule of
docs/SPEC.md §4 as a torch optimizer (``create``, ``SGD`` … ``VRTVLARS``) and the GSNR
transform in front of any optimizer (``GSNR``); ``ddp.register`` gives it the same statistics
under torchrun/``DistributedDataParallel``, without Horovod.
"""
from .optimizers import OPTIMIZERS, KERNELS, LargeBatchOptimizer, create, register
from .gsnr import GSNR, GSNRTransform
from .lr_scheduler import WarmupDecayLR, scaled_lr, tvlars_delay_steps
from .distributed import DistributedOptimizer
from . import ddp

_OWN = ["OPTIMIZERS", "KERNELS", "LargeBatchOptimizer", "create", "register", "GSNR", "GSNRTransform",
        "WarmupDecayLR", "scaled_lr", "tvlars_delay_steps", "DistributedOptimizer", "ddp"]


def _horovod():
    try:
        import horovod.torch as hvd
    except ImportError:
        return None
    return hvd


def __getattr__(name):
    # Classes of every registered rule (SGD, VRLAMB, ..., and rules registered later).
    for cls in OPTIMIZERS.values():
        if cls.__name__ == name:
            return cls
    hvd = _horovod()
    if hvd is not None and not name.startswith("__") and hasattr(hvd, name):
        return getattr(hvd, name)
    raise AttributeError(f"module 'hvd_lb.torch' has no attribute {name!r}"
                         + ("" if hvd is not None else " (horovod.torch is not installed)"))


def __dir__():
    hvd = _horovod()
    theirs = [n for n in dir(hvd) if not n.startswith("_")] if hvd is not None else []
    return sorted(set(globals()) | set(theirs) | {c.__name__ for c in OPTIMIZERS.values()})


__all__ = _OWN + [cls.__name__ for cls in OPTIMIZERS.values()]
