"""TensorFlow / Keras 3 backend of hvd_lb, and a drop-in for ``horovod.tensorflow``.

``import hvd_lb.tf as hvd`` gives everything ``horovod.tensorflow`` gives (``init``,
``rank``, the collectives, ``Compression``, ``Average``/``Sum``, process sets, ``join``,
``elastic``, …), with ``DistributedGradientTape``, ``DistributedOptimizer`` (Keras 3) and
``broadcast_variables`` (Keras 3 variables, matched by position) replaced, plus hvd_lb's own:
every rule of docs/SPEC.md §4 as a Keras optimizer and the GSNR transform (``GSNR``).
``import hvd_lb.tf.keras as hvd`` does the same for ``horovod.tensorflow.keras``.
``horovod.tensorflow`` is imported on first distributed use, so the optimizers
(and loading a saved model that uses ``DistributedOptimizer``) work without it.
"""
import importlib

from .gsnr import GSNR
from .optimizers import (OPTIMIZERS, UPDATES, LargeBatchOptimizer, Step, create, register, SGD,
                         Momentum, Adam, LARS, LAMB, SNGM, TVLARS, VRSGD, VRMomentum, VRAdam, VRLARS,
                         VRLAMB, VRSNGM, VRTVLARS)
from .schedules import WarmupDecay
from .distributed import (DistributedOptimizer, DistributedGradientTape, PartialDistributedGradientTape,
                          broadcast_variables, reduce_statistics)
from .callbacks import (BroadcastGlobalVariablesCallback, MetricAverageCallback,
                        LearningRateScheduleCallback, LearningRateWarmupCallback, BestModelCheckpoint)

_OWN = ["GSNR", "OPTIMIZERS", "UPDATES", "LargeBatchOptimizer", "Step", "create", "register", "WarmupDecay",
        "DistributedOptimizer", "DistributedGradientTape", "PartialDistributedGradientTape",
        "broadcast_variables", "reduce_statistics", "BroadcastGlobalVariablesCallback",
        "MetricAverageCallback", "LearningRateScheduleCallback", "LearningRateWarmupCallback",
        "BestModelCheckpoint"]


def _horovod():
    try:
        import horovod.tensorflow as hvd
    except ImportError:
        return None
    return hvd


def __getattr__(name):
    if name == "keras":  # our drop-in, not horovod.tensorflow.keras
        return importlib.import_module(".keras", __name__)
    for cls in OPTIMIZERS.values():  # classes of rules registered later
        if cls.__name__ == name:
            return cls
    hvd = _horovod()
    if hvd is not None and not name.startswith("__") and hasattr(hvd, name):
        return getattr(hvd, name)
    raise AttributeError(f"module 'hvd_lb.tf' has no attribute {name!r}"
                         + ("" if hvd is not None else " (horovod.tensorflow is not installed)"))


def __dir__():
    hvd = _horovod()
    theirs = [n for n in dir(hvd) if not n.startswith("_")] if hvd is not None else []
    return sorted(set(globals()) | set(theirs) | {c.__name__ for c in OPTIMIZERS.values()})


__all__ = _OWN + [cls.__name__ for cls in OPTIMIZERS.values()]
