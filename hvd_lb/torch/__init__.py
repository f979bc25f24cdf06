"""PyTorch backend of hvd_lb: every rule of SPEC §4 as a torch optimizer, and the
Horovod ``DistributedOptimizer`` that all-reduces ḡ and s = mean(x²) in one cycle."""
from .optimizers import (OPTIMIZERS, LBOptimizer, create, SGD, Momentum, Adam, LARS, LAMB, SNGM,
                         TVLARS, VRSGD, VRMomentum, VRAdam, VRLARS, VRLAMB, VRSNGM, VRTVLARS)
from .lr_scheduler import WarmupDecayLR, scaled_lr, tvlars_delay_steps
from .distributed import DistributedOptimizer

__all__ = ["OPTIMIZERS", "LBOptimizer", "create", "SGD", "Momentum", "Adam", "LARS", "LAMB", "SNGM",
           "TVLARS", "VRSGD", "VRMomentum", "VRAdam", "VRLARS", "VRLAMB", "VRSNGM", "VRTVLARS",
           "WarmupDecayLR", "scaled_lr", "tvlars_delay_steps", "DistributedOptimizer"]
