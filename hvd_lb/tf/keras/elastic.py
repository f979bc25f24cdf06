"""``horovod.tensorflow.keras.elastic`` for Keras 3: ``KerasState``, ``run`` and the elastic callbacks.

Horovod's callbacks are Keras 2 classes and its state calls ``optimizer.variables()``; these
are Keras 3 ones over ``hvd_lb.tf.elastic`` (variables broadcast by position, GSNR state kept).
"""
import keras

from ..elastic import TensorFlowKerasState, TensorFlowState, run  # noqa: F401
from ...passthrough import horovod_superset


class KerasState(TensorFlowKerasState):
    """Horovod's ``KerasState(model, optimizer=None, **kwargs)``: a Keras 3 model, its optimizer
    (default ``model.optimizer``) and Python attributes, synced from rank 0 at each reset."""

    def __init__(self, model, optimizer=None, **kwargs):
        super().__init__(model, optimizer=optimizer, **kwargs)


class CommitStateCallback(keras.callbacks.Callback):
    """``state.commit()`` every ``batches_per_commit`` batches and at each epoch's end; a commit is
    where a host change is noticed (and raised, so ``run`` re-forms the job)."""

    def __init__(self, state, batches_per_commit=1):
        super().__init__()
        if isinstance(batches_per_commit, bool) or not isinstance(batches_per_commit, int) or batches_per_commit < 1:
            raise ValueError(f"invalid batches_per_commit={batches_per_commit!r}: must be an integer >= 1")
        self.state, self.batches_per_commit = state, batches_per_commit
        self.batches_remaining = batches_per_commit

    def on_train_begin(self, logs=None):
        # Counted from each (re)start of fit, so every rank commits at the same batches.
        self.batches_remaining = self.batches_per_commit

    def on_train_batch_end(self, batch, logs=None):
        self.batches_remaining -= 1
        if self.batches_remaining == 0:
            self.state.commit()
            self.batches_remaining = self.batches_per_commit

    def on_epoch_end(self, epoch, logs=None):
        self.state.commit()


class UpdateBatchStateCallback(keras.callbacks.Callback):
    """``state.batch`` = the batch just trained in this epoch (0 again at the epoch's end).

    With ``steps_per_epoch``, the first epoch after a reset ends after the batches the
    interrupted epoch had left (Horovod shortens ``params['steps']``, which Keras 3 ignores: here
    ``fit`` stops at that batch and goes on with the next epoch).
    """

    def __init__(self, state):
        super().__init__()
        self.state = state
        self._skip = 0
        self._stopped = False

    def on_train_begin(self, logs=None):
        self._skip = self.state.batch if self.params.get("steps") else 0

    def on_train_batch_end(self, batch, logs=None):
        self.state.batch = self._skip + batch
        if self._skip and self._skip + batch + 1 >= self.params["steps"]:
            self.model.stop_training = self._stopped = True

    def on_epoch_end(self, epoch, logs=None):
        self.state.batch = 0
        self._skip = 0
        if self._stopped:
            self.model.stop_training = self._stopped = False


class UpdateEpochStateCallback(keras.callbacks.Callback):
    """``state.epoch`` = epochs completed over all resets (Keras counts from 0 at each ``fit``)."""

    def __init__(self, state):
        super().__init__()
        self.state = state
        self.initial_epoch = state.epoch

    def on_train_begin(self, logs=None):
        self.initial_epoch = self.state.epoch

    def on_epoch_end(self, epoch, logs=None):
        # +1: a reset after state.batch went back to 0 must not repeat this epoch.
        self.state.epoch = self.initial_epoch + epoch + 1


__getattr__, __dir__ = horovod_superset(globals(), "horovod.tensorflow.keras.elastic", {})

__all__ = ["KerasState", "CommitStateCallback", "UpdateBatchStateCallback", "UpdateEpochStateCallback", "run"]
