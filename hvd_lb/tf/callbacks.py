"""Keras 3 callbacks that ``horovod.tensorflow.keras`` no longer provides on Keras 3."""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from .distributed import _hvd, broadcast_variables


class BroadcastGlobalVariablesCallback(keras.callbacks.Callback):
    """Broadcast model and optimizer variables from ``root_rank`` when training starts.

    Keras 3 builds the optimizer before ``on_train_begin``, so its state (e.g.
    after a restore on rank 0 only) goes out in the same broadcast.
    """

    def __init__(self, root_rank=0):
        super().__init__()
        if isinstance(root_rank, bool) or not isinstance(root_rank, int) or root_rank < 0:
            raise ValueError(f"invalid root_rank={root_rank!r}: must be an integer in [0, size)")
        self.root_rank = root_rank
        self.broadcast_done = False

    def on_train_begin(self, logs=None):
        if self.broadcast_done:
            return
        opt = self.model.optimizer
        if opt is not None and not opt.built:
            opt.build(self.model.trainable_variables)
        variables = list(self.model.variables) + (list(opt.variables) if opt is not None else [])
        broadcast_variables(variables, self.root_rank)
        self.broadcast_done = True


class MetricAverageCallback(keras.callbacks.Callback):
    """Replace each epoch's logged metrics by their mean over workers (one all-reduce).

    Put it before callbacks that read the logs (ModelCheckpoint, EarlyStopping, ...).
    """

    def on_epoch_end(self, epoch, logs=None):
        hvd = _hvd()
        if logs is None or hvd.size() == 1:
            return
        keys = sorted(k for k, v in logs.items() if np.ndim(v) == 0 and np.isscalar(float(v)))
        if not keys:
            return
        values = tf.constant([float(logs[k]) for k in keys], tf.float64)
        mean = hvd.allreduce(values, op=hvd.Average, name=f"hvd_lb.metrics.{epoch}").numpy()
        for k, v in zip(keys, mean):
            logs[k] = float(v)


class LearningRateWarmupCallback(keras.callbacks.Callback):
    """Linear LR warm-up over the first ``warmup_steps`` optimizer steps (Goyal et al. 2017).

    lr(t) = start_lr + (target_lr − start_lr)·min(t/warmup_steps, 1), t = ``optimizer.iterations``
    (real steps, also with micro-batches); ``start_lr`` defaults to target_lr/size, as Horovod's.
    Needs a float learning rate (use ``WarmupDecay`` with a schedule instead).
    """

    def __init__(self, target_lr, warmup_steps, start_lr=None, verbose=0):
        super().__init__()
        for arg, v in (("target_lr", target_lr), ("start_lr", start_lr)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
                raise ValueError(f"invalid {arg}={v!r}: must be a float in [0, inf)")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"invalid warmup_steps={warmup_steps!r}: must be an integer in [1, inf)")
        self.target_lr = float(target_lr)
        self.start_lr = start_lr
        self.warmup_steps = warmup_steps
        self.verbose = verbose

    def lr_at(self, step: int) -> float:
        start = self.target_lr / _hvd().size() if self.start_lr is None else float(self.start_lr)
        return start + (self.target_lr - start) * min(step / self.warmup_steps, 1.0)

    def on_train_batch_begin(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step > self.warmup_steps:
            return
        lr = self.lr_at(step)
        self.model.optimizer.learning_rate = lr
        if self.verbose and step == self.warmup_steps:
            print(f"\nLearningRateWarmupCallback: warm-up done, lr = {lr:g}")


__all__ = ["BroadcastGlobalVariablesCallback", "MetricAverageCallback", "LearningRateWarmupCallback"]
