"""``horovod.tensorflow.elastic`` for Keras 3: ``run``, ``TensorFlowKerasState``, ``TensorFlowState``.

Horovod's states call ``optimizer.variables()`` (a property in Keras 3: ``'list' object is not
callable``) and broadcast by variable name. These save, restore and sync the model's variables
and every optimizer variable — a ``DistributedOptimizer``'s accumulators, a ``GSNR``'s p_t
(``gsnr_avg``) and step count, the wrapped optimizer's slots — and broadcast them by position
(``hvd_lb.tf.broadcast_variables``), so a worker that joins with fresh variables gets rank 0's.
Other names of ``horovod.tensorflow.elastic`` (``ObjectState``, ``State``, …) pass through.
Importing this module gives Keras 3 optimizers Keras 2's ``lr`` alias, which Horovod's elastic
examples use in their reset callbacks.
"""
from __future__ import annotations

import re

import keras
import tensorflow as tf
from horovod.common.elastic import ObjectState, run_fn
from horovod.common.exceptions import HorovodInternalError
from horovod.tensorflow.functions import broadcast_object

from .. import rules
from ..passthrough import horovod_superset
from . import distributed
from .distributed import DistributedOptimizer, _hvd, _vr_target, broadcast_variables

# Horovod's run() only recognises its ungrouped ops; hvd_lb reduces with grouped ones named hvd_lb_*.
_COLLECTIVE = re.compile(r"Horovod(Grouped)?(Allreduce|Allgather|Broadcast|Reducescatter|Alltoall)|hvd_lb_")


def run(func):
    """Horovod's ``hvd.elastic.run``: call ``func(state, ...)`` again after each reset.

    Before each call the state is synced from rank 0; a collective that fails because a worker
    died (a TF error naming a Horovod or hvd_lb collective) restores the last commit, and a
    host change raised at ``state.commit()`` re-forms the job (Horovod restarts, the reset
    callbacks run). A joining worker's collectives before ``func`` must pair with the others'
    reset callbacks (as the one-step ``fit`` of Horovod's Keras example does), else they meet
    the others' sync and hang.
    """
    def wrapper(state, *args, **kwargs):
        try:
            return func(state, *args, **kwargs)
        except tf.errors.UnknownError as e:
            if _COLLECTIVE.search(e.message):
                raise HorovodInternalError(e) from e
            raise  # (Horovod's returns None here, hiding the error)

    return run_fn(wrapper, _reset)


def _reset():
    hvd = _hvd()
    hvd.shutdown()
    hvd.init()


def _restart_broadcast_names():
    # broadcast_variables names its collectives by a per-process call count; a worker that
    # joins starts at 0, so every rank restarts the count when it syncs (else names differ: hang).
    distributed.restart_broadcast_names()


def _check_samples(optimizer):
    """After a shrink, k = workers × micro_batches may drop below 2: refuse, as on torch."""
    if isinstance(optimizer, DistributedOptimizer) and _vr_target(optimizer.inner_optimizer) is not None:
        rules.check_samples(distributed._process_set(optimizer.process_set).size(), optimizer.micro_batches)


def _snapshot(variables):
    # tf.identity keeps the copy on the variable's device (GPU state stays on the GPU).
    return [tf.identity(v.value if isinstance(v, keras.Variable) else v) for v in variables]


def _load(variables, values):
    for v, x in zip(variables, values):
        v.assign(x)


class TensorFlowState(ObjectState):
    """A list of variables (Keras 3 or ``tf.Variable``) plus Python attributes (``kwargs``).

    ``sync`` broadcasts the variables from rank 0 by position (Horovod's TF2 version broadcasts
    once, at construction, so a worker that joins later never gets them). ``session`` is TF1's
    and must stay None.
    """

    def __init__(self, variables=None, session=None, **kwargs):
        if not variables:
            raise ValueError(f"invalid variables={variables!r}: pass the list of variables to track "
                             "(TF2 has no global variable collection)")
        if session is not None:
            raise ValueError(f"invalid session={session!r}: TF1 sessions are not supported; must be None")
        self.variables = list(variables)
        self._values = _snapshot(self.variables)
        super().__init__(bcast_object=broadcast_object, get_rank=lambda: _hvd().rank(), **kwargs)

    def save(self):
        self._values = _snapshot(self.variables)
        super().save()

    def restore(self):
        _load(self.variables, self._values)
        super().restore()

    def sync(self):
        _restart_broadcast_names()
        broadcast_variables(self.variables, root_rank=0)
        self._values = _snapshot(self.variables)
        super().sync()


class TensorFlowKerasState(ObjectState):
    """A Keras 3 model and its optimizer plus Python attributes (``kwargs``), Horovod's API.

    ``optimizer``: default ``model.optimizer``. An optimizer that is not built yet is built on
    ``model.trainable_variables`` here (as ``fit`` would), without a step: its state exists on
    every rank before the first sync, and a GSNR's step count starts at 0 (no local warm-up step
    is needed). ``backend``: Keras 2's, accepted and unused. After a reset that shrinks the job,
    a GSNR ``DistributedOptimizer`` with k = workers × micro_batches < 2 is refused on every rank.
    """

    def __init__(self, model, optimizer=None, backend=None, **kwargs):
        if not model.built:
            raise ValueError(f"invalid model={model.name!r}: it is not built; call model.build(input_shape) "
                             "or run it on one batch first")
        optimizer = optimizer or model.optimizer
        if optimizer is None:
            raise ValueError("invalid optimizer=None: pass the optimizer, or compile the model with one")
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        self.model, self.optimizer, self.backend = model, optimizer, backend
        self._save_model()
        super().__init__(bcast_object=broadcast_object, get_rank=lambda: _hvd().rank(), **kwargs)

    def _variables(self):
        return list(self.model.variables) + list(self.optimizer.variables)

    def _save_model(self):
        self._saved = _snapshot(self._variables())

    def save(self):
        self._save_model()
        super().save()

    def restore(self):
        _load(self._variables(), self._saved)
        super().restore()

    def sync(self):
        _restart_broadcast_names()
        if isinstance(self.optimizer, DistributedOptimizer):
            # Every rank, old and new, syncs after each reset: where the ranks are checked to have
            # built the same wrapper (a non-elastic job checks at its first step).
            self.optimizer._check_agreement(self.model.trainable_variables, elastic_sync=True)
        broadcast_variables(self._variables(), root_rank=0)
        self._save_model()
        super().sync()

    def reset(self):
        _check_samples(self.optimizer)


def _lr(opt):
    # The tf.Variable behind a Keras one: Keras 3's own tf.keras.backend.set_value reads
    # ``x.dtype.name``, which a Keras variable (dtype a string) lacks.
    lr = opt.learning_rate
    return lr.value if isinstance(lr, keras.Variable) else lr


def _keras2_lr_alias():
    """``optimizer.lr`` (Keras 2's alias of ``learning_rate``, gone in Keras 3): Horovod's elastic
    examples set the rate with it in their reset callbacks (``opt.lr.assign(x)``,
    ``tf.keras.backend.set_value(opt.lr, x)``). Added only where Keras has none."""
    base = keras.optimizers.Optimizer
    if not hasattr(base, "lr"):
        base.lr = property(_lr, lambda self, value: setattr(self, "learning_rate", value))


_keras2_lr_alias()

__getattr__, __dir__ = horovod_superset(globals(), "horovod.tensorflow.elastic", {})

__all__ = ["TensorFlowKerasState", "TensorFlowState", "run"]
