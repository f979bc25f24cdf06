"""Scaled float16 squares and the statistics interval (docs/SPEC.md §1, §2), backend-free.

``square_dtype="float16"``: each tensor's local share of s is multiplied by 2^e before it
is rounded to float16 and reduced beside ḡ; e is known identically on every rank because
it comes from the previous reduced s of that tensor (``next_exponent``). After the
reduction every rank classifies each tensor the same way (``needs_redo``, the reduced
values are identical), redoes the flagged ones in float32 and unscales the rest in float32
as s = max(s₁₆·2^−e, ḡ² + a) (s ≥ ḡ² holds exactly for true statistics; rounding and flushing
to zero are what break it; a = ``absolute_floor``, float16's smallest normal times ε_w). The GSNR maths then floors the variance at ``variance_floor``.

``gsnr_interval = N``: s is reduced on statistics steps only (``is_statistics_step``) and
reused, with each step's own ḡ, in between.

The backends do the tensor work; the rules (exponents, thresholds, floors, bytes) are here.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

# Largest finite float16 and the smallest normal one.
F16_MAX = 65504.0
F16_TINY = 2.0 ** -14
# The scale puts the peak of the *sum* on the wire (W workers' scaled shares, before Average's
# 1/W) at 2^13: 8× headroom below F16_MAX for s growing between two steps.
WIRE_PEAK_LOG2 = 13
# 2^e stays a normal float32 with room either side.
MIN_EXPONENT, MAX_EXPONENT = -120, 120


def variance_floor(workers: int) -> float:
    """ε_w for float16 squares (SPEC §2): 8 units of float16 rounding times √W, a power of two.

    s₁₆ is rounded once on each worker and once per addition of the reduction (W − 1 of them
    along a ring, error growing about as √W), so ε_w = 2^(−8 + ⌈log₂(W)/2⌉):
    2⁻⁸ for W = 1, 2⁻⁷ for W ≤ 4, 2⁻⁶ for W ≤ 16, 2⁻³ at W = 768.
    """
    w = max(int(workers), 1)
    return 2.0 ** (-8 + math.ceil(math.log2(w) / 2))


def absolute_floor(exponent: int, workers: int, divisor: float = 1.0) -> float:
    """a = ε_w·τ, τ = 2^−14·2^−e/divisor: float16's smallest normal in s's units (SPEC §1).

    Unscaled s = max(2^−e·q̄, ḡ² + a): elements that left float16's normal range (subnormal
    or flushed to 0, far below the tensor's peak) keep a variance of at least a, never the
    full confidence of r_raw = 1/ε_w that s = ḡ² would give them. ``divisor``: W where the
    reduction summed (DDP), 1 where it averaged (Horovod).
    """
    return variance_floor(workers) * F16_TINY * 2.0 ** -exponent / divisor


def next_exponent(max_s: float, workers: int, predivide: float = 1.0,
                  previous: Optional[int] = None) -> Optional[int]:
    """e for the next reduction of a tensor whose reduced s (mean over workers) peaked at ``max_s``.

    The wire carries Σ_w 2^e·s_w/f (f = gradient_predivide_factor), peaking at W·2^e·max_s/f:
    e = ⌊log₂(2^13·f/(W·max_s))⌋, clamped to ±120. A tensor with s ≡ 0 keeps ``previous``
    (0 if it had none: its next reduction is checked like any other).
    """
    if not math.isfinite(max_s) or max_s < 0:
        return previous
    if max_s == 0:
        return 0 if previous is None else previous
    y = peak_ratio(max_s, workers, predivide)
    if math.isinf(y):  # a peak below ~1e-305 (float64 s): the largest scale, as TF's bit shifts give
        return MAX_EXPONENT
    e = math.frexp(y)[1] - 1  # ⌊log₂ y⌋, exact in float64
    return max(MIN_EXPONENT, min(MAX_EXPONENT, e))


def peak_ratio(max_s, workers, predivide=1.0):
    """y = 2^13·f/(W·max_s) in float64, in this order on every backend: e = ⌊log₂ y⌋."""
    return (2.0 ** WIRE_PEAK_LOG2 * predivide) / (workers * max_s)


def needs_redo(max16, mean_nonzero, isfinite=math.isfinite):
    """Whether a tensor's reduced float16 s must be reduced again in float32.

    ``max16``: the largest reduced float16 value of the tensor (in the reduced units);
    ``mean_nonzero``: whether its ḡ has a non-zero element (only asked when max16 == 0).
    Overflow (inf/NaN), a peak below float16's normal range (precision lost), or s ≡ 0 under
    a non-zero ḡ (everything flushed to zero; s ≥ ḡ² says it cannot be 0). Python floats and
    bools (torch, DDP), or one element per tensor with ``isfinite=tf.math.is_finite`` (Keras).
    """
    overflow = isfinite(max16) == False  # noqa: E712 (elementwise on tensors, where `not` is not)
    return overflow | ((max16 > 0) & (max16 < F16_TINY)) | ((max16 == 0) & mean_nonzero)


def is_statistics_step(count: int, interval: int) -> bool:
    """Step ``count`` (0 for the first step of the wrapper or after a state load) reduces s."""
    return count % interval == 0


# Largest gsnr_interval: the step counters (Keras: an int64 variable) never overflow.
MAX_INTERVAL = 2 ** 31 - 1


def check_interval(interval) -> int:
    """``gsnr_interval``: an integer in [1, 2³¹ − 1] (1 = s every step, the default)."""
    if isinstance(interval, bool) or not isinstance(interval, int) or not 1 <= interval <= MAX_INTERVAL:
        raise ValueError(f"invalid gsnr_interval={interval!r}: must be an integer in [1, {MAX_INTERVAL}]")
    return interval


def bytes_ratio(square_dtype: Optional[str], interval: int = 1, grad_bytes: int = 4) -> float:
    """Bytes per step of a VR rule's reduction over plain Horovod's (ḡ alone), any W (ring
    all-reduce: both move 2(W − 1)/W of the tensor per worker): 1 + (bytes of s/bytes of ḡ)/N."""
    sq = {"float16": 2, "bfloat16": 2, "float64": 8}.get(square_dtype or "float32", 4)
    return 1.0 + sq / grad_bytes / interval


def bytes_table(workers: Sequence[int], options) -> List[List[str]]:
    """Rows ``[W, ratio per option]`` for README's table; ``options``: (square_dtype, interval) pairs.

    bfloat16 goes as an all-gather where it is fewer bytes (W ≤ 3), float32 above
    (``rules.square_wire_dtype``); everything else is a ring all-reduce.
    """
    rows = []
    for w in workers:
        row = [str(w)]
        for dtype, n in options:
            if dtype == "bfloat16":
                ring = 2.0 * (w - 1) / w * 4  # bytes per element of ḡ (float32) a worker receives
                sq = 2.0 * (w - 1) if w <= 3 else ring
                ratio = 1.0 + sq / ring / n
            else:
                ratio = bytes_ratio(dtype, n)
            row.append(f"{ratio:.3f}")
        rows.append(row)
    return rows


__all__ = ["F16_MAX", "F16_TINY", "MAX_INTERVAL", "WIRE_PEAK_LOG2", "variance_floor", "absolute_floor", "next_exponent", "needs_redo",
           "is_statistics_step", "check_interval", "bytes_ratio", "bytes_table"]
