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
from .distributed import DistributedOptimizer, broadcast_optimizer_state
from . import ddp

try:
    from . import elastic
except ImportError:  # without Horovod: hvd_lb.torch.ddp and the optimizers still work
    pass
from ..passthrough import horovod_superset

_OWN = ["OPTIMIZERS", "KERNELS", "LargeBatchOptimizer", "create", "register", "GSNR", "GSNRTransform",
        "WarmupDecayLR", "scaled_lr", "tvlars_delay_steps", "DistributedOptimizer",
        "broadcast_optimizer_state", "ddp"]


__getattr__, __dir__ = horovod_superset(globals(), "horovod.torch", OPTIMIZERS)

__all__ = _OWN + [cls.__name__ for cls in OPTIMIZERS.values()]
