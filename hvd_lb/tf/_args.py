"""Hyperparameter checks in Keras spelling (``beta_1``, ``epsilon``, ``learning_rate``).

The ranges are ``hvd_lb.rules``' (SPEC §4); only the names in the messages are Keras'.
"""
from __future__ import annotations

from dataclasses import replace
from numbers import Real

import keras
import tensorflow as tf

from .. import rules

_TORCH_NAME = {v: k for k, v in rules.KERAS_NAMES.items()}


def check_keras(rule: rules.Rule, hparams) -> None:
    """Raise ValueError naming the Keras argument for an out-of-range or mistyped value."""
    hypers = {h.name: h for h in rule.hypers}
    for key, value in hparams.items():
        if key in ("beta_1", "beta_2"):
            # Each β on its own, as a float: "0.9" is not silently converted.
            replace(hypers["betas"], name=key, kind="float").check(value, rule.name)
        elif _TORCH_NAME.get(key, key) in hypers:
            replace(hypers[_TORCH_NAME.get(key, key)], name=key).check(value, rule.name)


def check_learning_rate(value, where: str = ""):
    """A learning rate set after construction: a number, or a tensor whose value is known (eager),
    must be finite and ≥ 0. Schedules, callables and graph tensors are checked at the step."""
    if isinstance(value, (tf.Variable, keras.Variable)):
        # (a MirroredVariable under tf.distribute has no float())
        static = value.numpy() if tf.executing_eagerly() else None
    else:
        static = tf.get_static_value(value) if tf.is_tensor(value) else value
    if isinstance(static, Real) or getattr(static, "shape", None) == ():
        replace(rules.LR(0.0), name="learning_rate").check(float(static), where)
    return value


def learning_rate_checks(owner, learning_rate, where: str = ""):
    """The current learning rate of a step (a callable's or a schedule's value, issue 17): raise
    ValueError for a known bad value; when tracing, also for the value at the traced step (XLA
    drops assertions); for one known only when the graph runs (a schedule inside ``model.fit``),
    return an assertion to run first (InvalidArgumentError, same message). ``owner``: the
    optimizer holding the rate. Variables were checked when set."""
    if not tf.executing_eagerly():
        with tf.init_scope():
            check_learning_rate(owner._get_current_learning_rate(), where)
    if isinstance(learning_rate, (tf.Variable, keras.Variable)):
        return []
    check_learning_rate(learning_rate, where)
    if not tf.is_tensor(learning_rate) or tf.get_static_value(learning_rate) is not None:
        return []
    return [tf.debugging.Assert(
        tf.logical_and(learning_rate >= 0, tf.math.is_finite(learning_rate)),
        [f"invalid learning_rate for optimizer '{where}': must be in [0, inf), got", learning_rate])]


__all__ = ["check_keras", "check_learning_rate", "learning_rate_checks"]
