"""TensorFlow / Keras 3 backend of hvd_lb, and a drop-in for ``horovod.tensorflow``.

``import hvd_lb.tf as hvd`` gives everything ``horovod.tensorflow`` gives (``init``,
``rank``, the collectives, ``Compression``, ``Average``/``Sum``, process sets, ``join``,
…), with ``DistributedGradientTape``, ``DistributedOptimizer`` (Keras 3),
``broadcast_variables`` (Keras 3 variables, matched by position) and ``elastic`` (Keras 3
states) replaced, plus hvd_lb's own: every rule of docs/SPEC.md §4 as a Keras optimizer
and the GSNR transform (``GSNR``).
``import hvd_lb.tf.keras as hvd`` does the same for ``horovod.tensorflow.keras``.
``horovod.tensorflow`` is imported on first distributed use, so the optimizers
(and loading a saved model that uses ``DistributedOptimizer``) work without it.
Without Horovod, ``hvd_lb.tf.distribute`` runs the same rules on TensorFlow's own engine
(``tf.distribute`` MirroredStrategy / MultiWorkerMirroredStrategy).
"""
import importlib

from .gsnr import GSNR
from .optimizers import (OPTIMIZERS, UPDATES, LargeBatchOptimizer, Step, create, register, SGD,
                         Momentum, Adam, LARS, LAMB, SNGM, TVLARS, VRSGD, VRMomentum, VRAdam, VRLARS,
                         VRLAMB, VRSNGM, VRTVLARS)
from .schedules import WarmupDecay
from .distributed import (DistributedOptimizer, DistributedGradientTape, PartialDistributedGradientTape,
                          broadcast_variables, reduce_statistics)
from ..passthrough import horovod_superset
from .callbacks import (BroadcastGlobalVariablesCallback, MetricAverageCallback,
                        LearningRateScheduleCallback, LearningRateWarmupCallback, BestModelCheckpoint)

_OWN = ["GSNR", "OPTIMIZERS", "UPDATES", "LargeBatchOptimizer", "Step", "create", "register", "WarmupDecay",
        "DistributedOptimizer", "DistributedGradientTape", "PartialDistributedGradientTape",
        "broadcast_variables", "reduce_statistics", "BroadcastGlobalVariablesCallback",
        "MetricAverageCallback", "LearningRateScheduleCallback", "LearningRateWarmupCallback",
        "BestModelCheckpoint"]


# "keras" and "elastic" are our drop-ins for Horovod's modules of that name.
__getattr__, __dir__ = horovod_superset(globals(), "horovod.tensorflow", OPTIMIZERS,
                                        {"keras": lambda: importlib.import_module(".keras", __name__),
                                         "elastic": lambda: importlib.import_module(".elastic", __name__)})

__all__ = _OWN + [cls.__name__ for cls in OPTIMIZERS.values()]
