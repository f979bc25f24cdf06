"""Keras 3: float16 squares and the statistics interval (docs/SPEC.md §1) for ``DistributedOptimizer``.

The rules are ``hvd_lb.squares16``'s; this module holds their TF state (optimizer variables,
so they live in graphs and checkpoints alike) and tensor work. Unlike torch, which redoes
only the flagged tensors, a traced step redoes every tensor of the step in float32 when
any is flagged (one collective either way; a redo is rare), and the first step, whose
exponents are unknown, is such a redo.
"""
from __future__ import annotations

import tensorflow as tf

from .. import squares16


def record(half, exponents):
    """Test hook (eager steps only): the reduced float16 squares and their exponents, as tensors."""


def build(opt, var_list, stat_dtypes):
    """The state of ``opt`` (a DistributedOptimizer) for float16 squares and/or gsnr_interval."""
    n = len(var_list)
    opt._s16_count = opt.add_variable((), dtype="int64", name="gsnr_statistics_count")
    if opt.square_dtype == "float16":
        opt._s16_exp = opt.add_variable((n,), dtype="float32", name="square_exponents")
        opt._s16_known = opt.add_variable((), dtype="bool", name="square_exponents_known", initializer="zeros")
    if opt.gsnr_interval > 1:
        opt._s16_kept = [opt.add_variable(tuple(v.shape), dtype=d, name=f"gsnr_kept_sq_{i}")
                         for i, (v, d) in enumerate(zip(var_list, stat_dtypes))]
        # Whether the kept s holds a finite statistics step yet: until then every step is one.
        opt._s16_have = opt.add_variable((), dtype="bool", name="gsnr_kept_known", initializer="zeros")


def _pow2(e):
    """2^e exactly (float32 bits), e an integer-valued float32 tensor in [−126, 127]."""
    return tf.bitcast(tf.bitwise.left_shift(tf.cast(e, tf.int32) + 127, 23), tf.float32)


def _floor_log2(y):
    """⌊log₂ y⌋ of positive finite float64 y, exact (its exponent bits), as float32."""
    return tf.cast(tf.bitwise.right_shift(tf.bitcast(y, tf.int64), 52) - 1023, tf.float32)


def _next_exponents(peaks, previous, known, workers, predivide):
    """``squares16.next_exponent`` for a vector of peaks (float64)."""
    ok = tf.math.is_finite(peaks) & (peaks > 0)
    y = squares16.peak_ratio(tf.where(ok, peaks, tf.ones_like(peaks)), float(workers), predivide)
    e = tf.clip_by_value(_floor_log2(y), squares16.MIN_EXPONENT, squares16.MAX_EXPONENT)
    keep = tf.where(known, previous, tf.zeros_like(previous))
    return tf.where(ok, e, keep)


def statistics(opt, n, grads, sq, reduce):
    """(ḡ, s) for ``DistributedOptimizer._step``: ``reduce(grads, squares, square_dtype)`` is its
    ``reduce_statistics`` call; the first ``n`` entries are the variables' (the rest is passed on)."""
    if opt.gsnr_interval == 1:
        mean, s = _reduced(opt, n, grads, sq, reduce)
        opt._s16_count.assign_add(1)
        return mean, s

    def stats():
        mean, s = _reduced(opt, n, grads, sq, reduce)
        # Kept only when this step's ḡ and s are finite (identical on every rank); else the
        # previous kept s stands for the reuse steps (a skipped step must not poison them).
        checks = [tf.reduce_all(tf.math.is_finite(t)) for t in list(mean[:n]) + list(s[:n]) if t is not None]
        ok = tf.reduce_all(checks) if checks else tf.constant(True)
        for k, x in zip(opt._s16_kept, s[:n]):
            k.assign(tf.where(ok, tf.cast(x, k.dtype), tf.convert_to_tensor(k)))
        opt._s16_have.assign(tf.logical_or(tf.convert_to_tensor(opt._s16_have), ok))
        return mean, list(s[:n]) + list(sq[n:])  # (the tail, zeros, as given: one structure)

    def reuse():
        # ḡ alone; s of the last statistics step, as it was reduced (SPEC §1).
        mean, _ = reduce(grads, None, None)
        return mean, [tf.convert_to_tensor(k) for k in opt._s16_kept] + list(sq[n:])

    first = (opt._s16_count % opt.gsnr_interval == 0) | ~tf.convert_to_tensor(opt._s16_have)
    out = tf.cond(first, stats, reuse) if not tf.executing_eagerly() else (stats() if bool(first) else reuse())
    opt._s16_count.assign_add(1)
    return out


def _loss_scale(opt):
    """The scale of a LossScaleOptimizer inside ``opt`` (the one ``distributed._sample`` divides
    the squares by), else None."""
    import keras
    inner = opt.inner_optimizer
    if isinstance(inner, keras.optimizers.LossScaleOptimizer):
        return inner.dynamic_scale if inner.built else inner.initial_scale
    return None


def _reduced(opt, n, grads, sq, reduce):
    if opt.square_dtype != "float16":
        return reduce(grads, sq, opt.square_dtype)
    workers = reduce.workers
    predivide = opt.gradient_predivide_factor
    exps, known = tf.convert_to_tensor(opt._s16_exp), tf.convert_to_tensor(opt._s16_known)
    scale = tf.unstack(_pow2(exps), num=n) if n else []
    wire = [tf.cast(s * tf.cast(c, s.dtype), tf.float16) for s, c in zip(sq[:n], scale)] + \
           [tf.cast(s, tf.float16) for s in sq[n:]]
    mean, half = reduce(grads, wire, "float16")
    half = [tf.cast(h, tf.float32) for h in half[:n]]
    peaks = tf.stack([tf.reduce_max(h) if h.shape.num_elements() else tf.constant(0.0) for h in half])
    nonzero = tf.stack([tf.reduce_any(tf.not_equal(g, 0)) for g in mean[:n]])
    redo = squares16.needs_redo(peaks, nonzero, tf.math.is_finite) | ~known
    if tf.executing_eagerly() and bool(known):  # (the first step is all redone)
        record(half, exps)  # tensors: nothing is copied to the host unless a test hooks in
    unscaled = []
    tiny = squares16.variance_floor(workers) * squares16.F16_TINY  # absolute_floor, times 2^−e below
    loss_scale = _loss_scale(opt)
    for h, g, s, c in zip(half, mean[:n], sq[:n], scale):
        g, c = tf.cast(g, s.dtype), tf.cast(c, s.dtype)
        if loss_scale is not None:
            g = g / tf.cast(loss_scale, s.dtype)  # ḡ unscaled as the squares are (distributed._sample)
        unscaled.append(tf.maximum(tf.cast(h, s.dtype) / c, g * g + tiny / c))  # s ≥ ḡ² + a

    def again():
        full, _ = reduce(list(sq[:n]), None, None, False)  # squares as float32, uncompressed
        rows = tf.unstack(redo, num=n)
        return [tf.where(r, tf.cast(f, u.dtype), u) for r, f, u in zip(rows, full, unscaled)]

    s = tf.cond(tf.reduce_any(redo), again, lambda: unscaled) if n else []
    maxima = tf.stack([tf.cast(tf.reduce_max(x), tf.float64) if x.shape.num_elements() else tf.constant(0.0, tf.float64)
                       for x in s]) if n else tf.zeros([0], tf.float64)
    # A redone tensor's peak from its float32 s; the others' from the float16 peak (pre-ḡ² floor).
    peak = tf.where(redo, maxima, tf.cast(peaks, tf.float64) / tf.cast(tf.stack(scale), tf.float64))
    opt._s16_exp.assign(_next_exponents(peak, exps, known, workers, predivide))
    opt._s16_known.assign(True)
    return mean, list(s) + list(sq[n:])


def floor(opt, workers):
    """ε_w for the GSNR step (None unless float16 squares)."""
    return squares16.variance_floor(workers) if opt.square_dtype == "float16" else None
