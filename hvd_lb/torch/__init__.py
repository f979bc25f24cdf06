"""PyTorch backend of hvd_lb: every rule of docs/SPEC.md §4 as a torch optimizer, the GSNR
transform in front of any optimizer, and the Horovod ``DistributedOptimizer`` that all-reduces
ḡ and s = mean(x²) in one cycle."""
from . import optimizers as _optimizers
from .optimizers import OPTIMIZERS, KERNELS, LargeBatchOptimizer, create, register
from .gsnr import GSNR, GSNRTransform
from .lr_scheduler import WarmupDecayLR, scaled_lr, tvlars_delay_steps
from .distributed import DistributedOptimizer


def __getattr__(name):
    # Classes of every registered rule (SGD, VRLAMB, ..., and rules registered later).
    for cls in OPTIMIZERS.values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module 'hvd_lb.torch' has no attribute {name!r}")


__all__ = ["OPTIMIZERS", "KERNELS", "LargeBatchOptimizer", "create", "register", "GSNR", "GSNRTransform",
           "WarmupDecayLR", "scaled_lr", "tvlars_delay_steps", "DistributedOptimizer"] + [
    cls.__name__ for cls in OPTIMIZERS.values()]
del _optimizers
