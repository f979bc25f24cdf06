"""Hyperparameter checks in Keras spelling (``beta_1``, ``epsilon``, ``learning_rate``).

The ranges are ``hvd_lb.rules``' (SPEC §4); only the names in the messages are Keras'.
"""
from __future__ import annotations

from dataclasses import replace
from numbers import Real

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
    """A learning rate set after construction: a Python/NumPy number must be finite and ≥ 0.

    Schedules, callables, variables and tensors pass (checking those would need a device sync).
    """
    if isinstance(value, Real):
        replace(rules.LR(0.0), name="learning_rate").check(value, where)
    return value


__all__ = ["check_keras", "check_learning_rate"]
