"""Keras ``LearningRateSchedule`` wrappers of ``hvd_lb.schedules`` (SPEC §5)."""
from __future__ import annotations

import keras
import tensorflow as tf

from .. import schedules as S


@keras.saving.register_keras_serializable(package="hvd_lb")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up then cosine/polynomial/constant decay to ``final_lr``.

    lr(step) = base·(step+1)/warmup for step < warmup, then with
    p = clip((step − warmup)/(total − warmup), 0, 1): cosine final + (base − final)·½(1 + cos πp),
    polynomial final + (base − final)(1 − p)^power (Goyal et al. 2017 warm-up).
    ``step`` is Keras' zero-based ``iterations``, as ``hvd_lb.schedules.warmup_decay``.
    """

    def __init__(self, base_lr, warmup_steps, total_steps, final_lr=0.0, decay="cosine", power=1.0):
        S.check_schedule(base_lr, warmup_steps, total_steps, final_lr, decay, power)
        self.base_lr, self.final_lr, self.power = float(base_lr), float(final_lr), float(power)
        self.warmup_steps, self.total_steps, self.decay = int(warmup_steps), int(total_steps), decay

    def __call__(self, step):
        # Same branches as schedules.warmup_decay, in float64.
        step = tf.cast(step, tf.float64)
        base, final, warm = self.base_lr, self.final_lr, float(self.warmup_steps)
        span = self.total_steps - self.warmup_steps
        if span <= 0:
            p = tf.ones_like(step)
        else:
            p = tf.clip_by_value((step - warm) / span, 0.0, 1.0)
        if self.decay == "cosine":
            decayed = final + (base - final) * 0.5 * (1.0 + tf.cos(tf.constant(3.141592653589793, tf.float64) * p))
        elif self.decay == "polynomial":
            decayed = final + (base - final) * tf.pow(1.0 - p, self.power)
        else:
            decayed = tf.constant(base, tf.float64) + 0.0 * step
        if self.warmup_steps > 0:
            decayed = tf.where(step < warm, base * (step + 1.0) / warm, decayed)
        # float64, like the torch scheduler's Python float; the update casts per variable.
        return decayed

    def get_config(self):
        return {"base_lr": self.base_lr, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "final_lr": self.final_lr,
                "decay": self.decay, "power": self.power}


__all__ = ["WarmupDecay"]
