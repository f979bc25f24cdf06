"""TensorFlow / Keras 3 backend of hvd_lb: optimizers, schedules and Horovod glue.

``horovod.tensorflow`` is imported on first distributed use, so the optimizers
(and loading a saved model that uses ``DistributedOptimizer``) work without it.
"""
from .gsnr import GSNR
from .optimizers import (OPTIMIZERS, UPDATES, LargeBatchOptimizer, Step, create, register, SGD,
                         Momentum, Adam, LARS, LAMB, SNGM, TVLARS, VRSGD, VRMomentum, VRAdam, VRLARS,
                         VRLAMB, VRSNGM, VRTVLARS)
from .schedules import WarmupDecay
from .distributed import (DistributedOptimizer, DistributedGradientTape, broadcast_variables,
                          reduce_statistics)
from .callbacks import (BroadcastGlobalVariablesCallback, MetricAverageCallback,
                        LearningRateWarmupCallback)

__all__ = ["GSNR", "OPTIMIZERS", "UPDATES", "LargeBatchOptimizer", "Step", "create", "register", "SGD",
           "Momentum", "Adam", "LARS", "LAMB", "SNGM", "TVLARS", "VRSGD", "VRMomentum", "VRAdam", "VRLARS",
           "VRLAMB", "VRSNGM", "VRTVLARS",
           "WarmupDecay", "DistributedOptimizer", "DistributedGradientTape", "broadcast_variables",
           "reduce_statistics", "BroadcastGlobalVariablesCallback", "MetricAverageCallback",
           "LearningRateWarmupCallback"]
