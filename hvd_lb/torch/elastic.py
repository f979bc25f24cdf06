"""``horovod.torch.elastic`` for hvd_lb: ``TorchState`` syncs optimizers with
``hvd_lb.torch.broadcast_optimizer_state``.

Horovod's ``TorchState`` syncs with Horovod's ``broadcast_optimizer_state``, whose zero-gradient
step builds missing state by stepping: AdamW's decay moves the parameters of the ranks that
take it, and the GSNR transform's step count is 1 before the first real step. hvd_lb's builds
the same state without either, and checks first that the ranks built the same
DistributedOptimizer (what a non-elastic job checks when it is built). Everything else is
Horovod's.
"""
from horovod.torch.elastic import *  # noqa: F401,F403 - the rest of Horovod's module, unchanged
from horovod.torch.elastic import state as _state

from .distributed import broadcast_optimizer_state, check_agreement


class _OptimizerStateHandler(_state.OptimizerStateHandler):
    def sync(self):
        # Every rank, old and new, syncs after each reset: the point where a DistributedOptimizer
        # built under elastic Horovod checks that the ranks agree (see distributed._agree).
        agreement = getattr(self.value, "_agreement", None)
        if agreement is not None:
            check_agreement(*agreement)
        broadcast_optimizer_state(self.value, root_rank=0)


class TorchState(_state.TorchState):
    __doc__ = _state.TorchState.__doc__

    def __init__(self, model=None, optimizer=None, **kwargs):
        super().__init__(model=model, optimizer=optimizer, **kwargs)
        for handler in self._handlers.values():
            if type(handler) is _state.OptimizerStateHandler:
                handler.__class__ = _OptimizerStateHandler
