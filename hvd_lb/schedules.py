"""Large-batch recipe helpers as pure functions (SPEC §5).

LR scaling (Goyal et al. 2017 linear rule; Krizhevsky 2014 / Hoffer et al.
2017 square-root rule) and linear warm-up followed by cosine or polynomial
decay to a floor. The PyTorch ``LRScheduler`` and Keras
``LearningRateSchedule`` wrappers call these, so both give equal values.
"""
from __future__ import annotations

import math

SCALING_RULES = ("linear", "sqrt")
DECAYS = ("cosine", "polynomial", "constant")


def _check(name, value, low, high=math.inf, low_open=False, integer=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not (
        isinstance(value, float) and math.isnan(value))
    if ok and integer:
        ok = float(value).is_integer()
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        lo = "(" if low_open else "["
        kind = "an integer in " if integer else ""
        raise ValueError(f"invalid {name}={value!r}: must be {kind}{lo}{low:g}, {high:g}]"
                         .replace("inf]", "inf)"))
    return value


def scaled_lr(base_lr: float, batch: int, base_batch: int, rule: str = "linear") -> float:
    """lr = base_lr·(batch/base_batch) for ``linear``, base_lr·√(batch/base_batch) for ``sqrt``."""
    _check("base_lr", base_lr, 0.0)
    _check("batch", batch, 0, low_open=True, integer=True)
    _check("base_batch", base_batch, 0, low_open=True, integer=True)
    if rule not in SCALING_RULES:
        raise ValueError(f"invalid rule={rule!r}: must be one of {', '.join(SCALING_RULES)}")
    ratio = batch / base_batch
    return base_lr * (ratio if rule == "linear" else math.sqrt(ratio))


def check_schedule(base_lr, warmup_steps, total_steps, final_lr=0.0, decay="cosine", power=1.0):
    _check("base_lr", base_lr, 0.0)
    _check("warmup_steps", warmup_steps, 0, integer=True)
    _check("total_steps", total_steps, 0, low_open=True, integer=True)
    if warmup_steps > total_steps:
        raise ValueError(f"invalid warmup_steps={warmup_steps!r}: must be in [0, total_steps={total_steps}]")
    _check("final_lr", final_lr, 0.0, base_lr)
    if decay not in DECAYS:
        raise ValueError(f"invalid decay={decay!r}: must be one of {', '.join(DECAYS)}")
    _check("power", power, 0.0, low_open=True)


def warmup_decay(step: int, base_lr: float, warmup_steps: int, total_steps: int,
                 final_lr: float = 0.0, decay: str = "cosine", power: float = 1.0) -> float:
    """LR at zero-based ``step``: linear warm-up, then decay to ``final_lr``.

    Warm-up: base_lr·(step+1)/warmup_steps for step < warmup_steps.
    Then with p = (step − warmup)/(total − warmup) clipped to [0, 1]:
    cosine: final + (base − final)·½(1 + cos πp); polynomial: final + (base − final)(1 − p)^power;
    constant: base.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = total_steps - warmup_steps
    p = 1.0 if span <= 0 else min(max((step - warmup_steps) / span, 0.0), 1.0)
    if decay == "cosine":
        return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
    if decay == "polynomial":
        return final_lr + (base_lr - final_lr) * (1.0 - p) ** power
    return base_lr


def tvlars_delay_steps(epochs: float, steps_per_epoch: int) -> int:
    """TVLARS delay d_e given in epochs (the paper uses 10) → steps."""
    _check("epochs", epochs, 0.0)
    _check("steps_per_epoch", steps_per_epoch, 0, low_open=True, integer=True)
    return int(round(epochs * steps_per_epoch))
