"""``horovod.tensorflow.keras.callbacks`` for Keras 3 (Horovod's are broken there, horovod#4290).

Horovod's signatures and behaviour; variables are broadcast by position (issue 12).
"""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from ._args import check_learning_rate
from .distributed import _hvd, broadcast_variables


class BroadcastGlobalVariablesCallback(keras.callbacks.Callback):
    """Broadcast the model's and optimizer's variables from ``root_rank``, by position.

    A model that is built when training starts is broadcast then, optimizer included
    (built here), so every rank takes the first step from the same weights. A model
    without an ``Input`` layer has no variables before its first batch: it is broadcast
    after that batch, as Horovod does (rank ``root_rank``'s weights and optimizer state win).
    ``local_variables``: variables left out (worker-local). ``device``: where it runs.
    Restoring on rank 0 only (``load_model`` there, a fresh model elsewhere) works:
    variables are matched by position in ``model.variables`` + ``optimizer.variables``.
    """

    def __init__(self, root_rank, device="", local_variables=None):
        super().__init__()
        if isinstance(root_rank, bool) or not isinstance(root_rank, int) or root_rank < 0:
            raise ValueError(f"invalid root_rank={root_rank!r}: must be an integer in [0, size)")
        if isinstance(local_variables, (tf.Variable, keras.Variable)):
            local_variables = [local_variables]
        self.root_rank, self.device = root_rank, device
        self._local = {id(v) for v in local_variables or []}
        self.broadcast_done = False

    def _broadcast(self):
        opt = self.model.optimizer
        if opt is not None and not opt.built:
            opt.build(self.model.trainable_variables)
        variables = [v for v in self.model.variables if id(v) not in self._local]
        with tf.device(self.device):
            broadcast_variables(variables + (list(opt.variables) if opt is not None else []), self.root_rank)
        self.broadcast_done = True

    def on_train_begin(self, logs=None):
        if not self.broadcast_done and self.model.built:
            self._broadcast()

    def on_train_batch_end(self, batch, logs=None):
        if not self.broadcast_done:
            self._broadcast()


class MetricAverageCallback(keras.callbacks.Callback):
    """Replace each epoch's logged metrics by their mean over workers (one all-reduce).

    Put it before callbacks that read the logs (ModelCheckpoint, EarlyStopping, ...).
    """

    def __init__(self, device=""):
        super().__init__()
        self.device = device

    def on_epoch_end(self, epoch, logs=None):
        hvd = _hvd()
        if logs is None or hvd.size() == 1:
            return
        # Sorted: the same order on every rank.
        keys = sorted(k for k, v in logs.items() if np.ndim(v) == 0 and np.isscalar(float(v)))
        if not keys:
            return
        with tf.device(self.device):
            values = tf.constant([float(logs[k]) for k in keys], tf.float64)
            mean = hvd.allreduce(values, op=hvd.Average, name=f"hvd_lb.metrics.{epoch}").numpy()
        for k, v in zip(keys, mean):
            logs[k] = float(v)


def _momentum_buffers(opt):
    """Momentum buffers that carry the learning rate (Keras SGD v = μv − η·g; LARS):
    momentum correction rescales them by η_new/η_old (Goyal et al. 2017, §2.1)."""
    while hasattr(opt, "inner_optimizer"):  # DistributedOptimizer, LossScaleOptimizer, GSNR
        opt = opt.inner_optimizer
    if not opt.built:
        return []
    if isinstance(opt, keras.optimizers.SGD):
        return list(opt.momentums) if opt.momentum else []
    rule = getattr(opt, "rule", None)
    return opt.slots()["momentum_buffer"] if rule is not None and rule.name == "lars" else []


class LearningRateScheduleCallback(keras.callbacks.Callback):
    """Horovod's: lr = ``initial_lr`` · multiplier(epoch) from ``start_epoch`` to ``end_epoch`` (exclusive).

    ``multiplier``: a constant c (lr = initial_lr · c^(epoch − start_epoch)) or a function
    of the epoch. ``staircase=True``: set at each epoch's first batch; else at every
    batch with epoch + batch/steps_per_epoch (``steps_per_epoch`` read from ``fit`` when
    not given). ``momentum_correction``: when the rate changes, momentum buffers that
    carry it (Keras SGD, hvd_lb LARS) are rescaled by η_new/η_old, as Horovod's one-step
    momentum change does. Needs a float learning rate, not a schedule.
    """

    def __init__(self, initial_lr, multiplier, start_epoch=0, end_epoch=None, staircase=True,
                 momentum_correction=True, steps_per_epoch=None):
        super().__init__()
        if initial_lr is None:
            raise ValueError("Parameter `initial_lr` is required")
        check_learning_rate(initial_lr, type(self).__name__)
        self.initial_lr = initial_lr
        self.multiplier = multiplier if callable(multiplier) else \
            (lambda epoch: multiplier ** (epoch - start_epoch))
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self.staircase, self.momentum_correction = staircase, momentum_correction
        self.steps_per_epoch = steps_per_epoch
        self.current_epoch = None

    def _lr(self):
        return float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def _adjust_learning_rate(self, epoch):
        old, new = self._lr(), self.initial_lr * self.multiplier(epoch)
        self.model.optimizer.learning_rate = new
        if self.momentum_correction and old > 0 and new != old:
            for b in _momentum_buffers(self.model.optimizer):
                b.assign(b * (new / old))

    def on_train_begin(self, logs=None):
        if not self.staircase and not self.steps_per_epoch:
            self.steps_per_epoch = self.params.get("steps")
            if not self.steps_per_epoch:
                raise ValueError(f"Could not autodetect the number of steps per epoch: pass steps_per_epoch "
                                 f"to {type(self).__name__}()")

    def on_epoch_begin(self, epoch, logs=None):
        self.current_epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if self.current_epoch < self.start_epoch or (
                self.end_epoch is not None and self.current_epoch >= self.end_epoch):
            return
        if self.staircase and batch == 0:
            self._adjust_learning_rate(self.current_epoch)
        elif not self.staircase:
            self._adjust_learning_rate(self.current_epoch + float(batch) / self.steps_per_epoch)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["lr"] = self._lr()


class LearningRateWarmupCallback(LearningRateScheduleCallback):
    """Horovod's gradual warm-up (Goyal et al. 2017): lr/size → lr over ``warmup_epochs``.

    lr'(epoch) = (lr/size)·(epoch·(size − 1)/warmup_epochs + 1), epoch = e + (batch + 1)/steps_per_epoch,
    set at every batch (Keras batch = one ``apply``; with micro-batches several per step).
    """

    def __init__(self, initial_lr, warmup_epochs=5, momentum_correction=True, steps_per_epoch=None,
                 verbose=0):
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, (int, float)) or \
                not 0 < warmup_epochs < float("inf"):
            raise ValueError(f"invalid warmup_epochs={warmup_epochs!r}: must be in (0, inf)")

        def multiplier(epoch):
            size = _hvd().size()
            epoch += 1.0 / self.steps_per_epoch
            return 1.0 / size * (epoch * (size - 1) / warmup_epochs + 1)

        super().__init__(initial_lr, multiplier, start_epoch=0, end_epoch=warmup_epochs, staircase=False,
                         momentum_correction=momentum_correction, steps_per_epoch=steps_per_epoch)
        self.verbose = verbose

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if epoch == self.end_epoch - 1 and self.verbose > 0 and _hvd().rank() == 0:
            print(f"\nEpoch {epoch + 1}: finished gradual learning rate warmup to {self._lr():g}.")


class BestModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """Horovod's: a ``ModelCheckpoint`` with ``save_best_only=True`` whose ``filepath`` is set
    later (``cb.filepath = "best.keras"``; Horovod's Spark estimator does this), or given here."""

    def __init__(self, monitor="val_loss", verbose=0, save_weights_only=False, mode="auto",
                 save_freq="epoch", *, filepath=None):
        # Keras 3 checks the extension at construction: a placeholder until filepath is set.
        super().__init__(filepath=filepath or ("best.weights.h5" if save_weights_only else "best.keras"),
                         monitor=monitor, verbose=verbose, save_best_only=True,
                         save_weights_only=save_weights_only, mode=mode, save_freq=save_freq)
        self.filepath = filepath

    def on_train_begin(self, logs=None):
        if self.filepath is None:
            raise ValueError("BestModelCheckpoint has no filepath: set cb.filepath (e.g. 'best.keras') "
                             "before fit")
        super().on_train_begin(logs)


__all__ = ["BroadcastGlobalVariablesCallback", "MetricAverageCallback", "LearningRateScheduleCallback",
           "LearningRateWarmupCallback", "BestModelCheckpoint"]
