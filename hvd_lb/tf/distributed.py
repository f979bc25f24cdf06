"""Horovod on Keras 3: gradient statistics, a distributed optimizer and gradient tape.

docs/SPEC.md §1: with W workers and M micro-batches the k = W·M samples are
x_{w,m} = M·g_{w,m}; the step uses ḡ = (1/k)Σx and, for an optimizer that is
(or wraps) ``hvd_lb.tf.GSNR``, s = (1/k)Σx². Both go out in one Horovod cycle
(one ``hvd.grouped_allreduce``, plus one all-gather for bfloat16 s, SPEC §7);
other optimizers reduce each gradient exactly once, like plain Horovod.
Horovod's own Keras layer is broken on Keras 3 (horovod#4290), so this
module talks to ``horovod.tensorflow`` directly and unwraps Keras variables.

Every collective is keyed by position (issue 12): the same tensors in the same
order on every rank, a ``None`` gradient sent as zeros (as Horovod's torch
optimizer does), and explicit Horovod names built from the tensors' shapes,
never from variable or op names (which differ between a loaded and a fresh model).
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import zlib

import keras
import tensorflow as tf

from .. import rules, squares16
from . import _squares16
from ._ops import stat_dtype, state_variables, variable_path, work_dtype
from .gsnr import GSNR, _densify, inner_learning_rate, resolve_fused, set_all_weights

_COMPRESSIONS = ("none", "fp16")
AVERAGE, SUM = 0, 1  # hvd.Average, hvd.Sum (the same integers in every Horovod framework)


def _hvd():
    import horovod.tensorflow as hvd

    if not hvd.is_initialized():
        hvd.init()
    return hvd


def _compressor(compression):
    """``"none"``/``"fp16"`` or a Horovod compressor class → (name, compressor)."""
    from horovod.tensorflow.compression import Compression

    if compression is None:
        compression = "none"
    if not isinstance(compression, str):
        for key in _COMPRESSIONS:
            if compression is getattr(Compression, key):
                compression = key
                break
    if compression not in _COMPRESSIONS:
        raise ValueError(f"invalid compression={compression!r}: must be one of 'none', 'fp16', "
                         "hvd.Compression.none or hvd.Compression.fp16")
    return compression, getattr(Compression, compression)


def _process_set(process_set):
    """``None`` → ``hvd.global_process_set`` (Horovod's default), resolved on first use."""
    return _hvd().global_process_set if process_set is None else process_set


def _micro_batches(micro_batches, backward_passes_per_step):
    """``micro_batches``, or Horovod's name for it, ``backward_passes_per_step`` (default 1)."""
    if backward_passes_per_step is None:
        return rules.check_micro_batches(1 if micro_batches is None else micro_batches)
    if micro_batches is not None and micro_batches != backward_passes_per_step:
        raise ValueError(f"invalid micro_batches={micro_batches!r} with backward_passes_per_step="
                         f"{backward_passes_per_step!r}: they are the same argument, give one")
    return rules.check_micro_batches(backward_passes_per_step)


def _horovod_args(what, gsnr, op, gradient_predivide_factor, num_groups, groups, device_sparse,
                  sparse_as_dense):
    """Check Horovod's wrapper arguments; return (op, f) as ``reduce_statistics`` takes them."""
    if op not in (AVERAGE, SUM):
        raise ValueError(f"invalid op={rules.HOROVOD_OPS.get(op, repr(op))} for {what}: hvd_lb.tf reduces "
                         "with hvd.Average (default) or hvd.Sum, as Horovod's Keras wrapper")
    if gsnr:
        rules.check_gsnr_op(op, what)
    f = gradient_predivide_factor
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < float("inf"):
        raise ValueError(f"invalid gradient_predivide_factor={f!r}: must be in (0, inf)")
    if f != 1.0 and op != AVERAGE:
        raise ValueError(f"invalid gradient_predivide_factor={f!r} with op=hvd.Sum: it splits an average "
                         "(as in Horovod)")
    if num_groups or groups is not None:
        bad = f"num_groups={num_groups!r}" if num_groups else f"groups={groups!r}"
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 0 or not (
                groups is None or isinstance(groups, list) or (isinstance(groups, int) and groups > 0)):
            raise ValueError(f"invalid {bad}: must be a non-negative integer or a list of lists of variables")
        if gsnr:
            raise ValueError(f"invalid {bad} with the GSNR transform: ḡ and s go out in one grouped "
                             "all-reduce; leave num_groups=0 and groups=None")
    if device_sparse:
        raise ValueError(f"invalid device_sparse={device_sparse!r}: hvd_lb.tf reduces sparse gradients as "
                         "dense (sparse_as_dense=True), on device_dense")
    if not isinstance(sparse_as_dense, bool):
        raise ValueError(f"invalid sparse_as_dense={sparse_as_dense!r}: must be True or False")
    return op, float(f)


def _dense(g):
    return None if g is None else tf.convert_to_tensor(g)


def _filled(grads, sources):
    """Dense gradients with ``None`` → zeros of the source's shape: every rank reduces every
    tensor (a variable unused on one rank would otherwise pair with another one's gradient)."""
    return [tf.zeros(v.shape, v.dtype) if g is None else _dense(g) for g, v in zip(grads, sources)]


def _name(kind, tensors):
    """A Horovod op name from what is reduced (kind, shapes, dtypes), the same on every rank."""
    sig = ";".join(f"{t.dtype.name}{t.shape.as_list()}" for t in tensors)
    return f"hvd_lb_{kind}_{len(tensors)}_{zlib.crc32(sig.encode()):08x}"


def _collectives(tensors, gather, process_set, op=AVERAGE, predivide=1.0, device=""):
    """Reduce ``tensors`` over workers and all-gather ``gather`` (or None) in one Horovod cycle.

    HorovodGroupedAllreduce takes one dtype, so mixed dtypes (fp16-compressed ḡ with
    float32 s, models mixing float32 and float64 variables) go out as one group per dtype;
    with the all-gather they are issued from a single graph so that Horovod negotiates
    them together. ``predivide`` = Horovod's gradient_predivide_factor f: 1/f before the
    sum, f/size after. Returns (reduced tensors, gathered tensor or None).
    """
    hvd = _hvd()
    groups = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    scale = dict(prescale_factor=1.0 / predivide, postscale_factor=predivide) if predivide != 1.0 else {}

    def run(ts, bits):
        out = [None] * len(ts)
        with tf.device(device):
            for idx in groups.values():
                part = [ts[i] for i in idx]
                reduced = hvd.grouped_allreduce(part, op=op, process_set=process_set, name=_name("reduce", part),
                                                ignore_name_scope=True, **scale)
                for i, r in zip(idx, reduced):
                    out[i] = r
            if bits is not None:
                bits = hvd.allgather(bits, process_set=process_set, name=_name("gather", [bits]),
                                     ignore_name_scope=True)
        return out, bits

    if tf.executing_eagerly() and (len(groups) > 1 or gather is not None):
        run = tf.function(run)
    return run(list(tensors), gather)


def reduce_statistics(grads, squares=None, compression="none", square_dtype=None, process_set=None,
                      micro_batches=None, op=AVERAGE, gradient_predivide_factor=1.0, device_dense=""):
    """All-reduce ḡ (and s when ``squares`` is given) across Horovod workers in one cycle.

    ``grads`` are each worker's (1/M)Σ_m x_{w,m}, ``squares`` its (1/M)Σ_m x²_{w,m};
    the average over ``process_set`` (default ``hvd.global_process_set``) gives ḡ and s
    of SPEC §1. A ``None`` entry must be ``None`` on every rank (the wrappers send zeros).
    ``micro_batches`` = this rank's M: sent along as (M, M²), so that workers with
    different M stop with an error at the first step instead of hanging later.
    ``op`` (hvd.Average or hvd.Sum), ``gradient_predivide_factor`` and ``device_dense``
    as Horovod's; ``square_dtype``: see ``DistributedOptimizer`` ("float16": ``squares`` are
    already scaled float16, as ``DistributedOptimizer`` sends them). Returns ``(mean, sq)``
    (``sq`` is ``None`` without ``squares``).
    """
    _, comp = _compressor(compression)
    square_dtype = rules.check_square_dtype(square_dtype)
    process_set = _process_set(process_set)
    present = [i for i, g in enumerate(grads) if g is not None]
    mean = list(grads)
    sq = None if squares is None else list(squares)
    if process_set.size() == 1 or not present:
        return mean, sq
    wire = rules.square_wire_dtype(square_dtype, process_set.size()) if sq is not None else None
    from tensorflow.python.ops import control_flow_util

    if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
        # Horovod's CPU/Gloo all-reduce has no XLA kernel; fail here, not deep inside XLA.
        raise ValueError("hvd_lb all-reduce inside an XLA-compiled function: compile the model with "
                         "jit_compile=False (or drop jit_compile=True from the tf.function)")
    packed, ctxs = [], []
    for i in present:
        # Horovod has no bfloat16 all-reduce: bfloat16 ḡ travels as float32 (issue 17).
        t, ctx = comp.compress(tf.cast(grads[i], tf.float32) if grads[i].dtype == tf.bfloat16 else grads[i])
        packed.append(t)
        ctxs.append(ctx)
    bits = None
    if wire == "bfloat16":
        # No bfloat16 all-reduce in Horovod 0.28: all-gather the 16-bit patterns of every s
        # in one flat row (SPEC §7), averaged below in float32.
        bits = tf.concat([tf.reshape(tf.bitcast(tf.cast(sq[i], tf.bfloat16), tf.int16), [-1])
                          for i in present], 0)[None]
    elif sq is not None:
        # s travels in float32 or wider (SPEC §1): float64 for float64 gradients unless told.
        packed += [tf.cast(sq[i], wire or stat_dtype(grads[i].dtype, square_dtype)) for i in present]
    n = len(packed)
    if micro_batches is not None:
        # Exact small integers in the first tensor's dtype, so no extra group or cycle.
        packed.append(tf.constant([micro_batches, micro_batches ** 2], packed[0].dtype))
    out, gathered = _collectives(packed, bits, process_set, op, gradient_predivide_factor, device_dense)
    if micro_batches is not None:
        out = _check_same_micro_batches(out, micro_batches, process_set.size() if op == SUM else 1)
    if gathered is not None:
        flat = tf.reduce_mean(tf.cast(tf.bitcast(gathered, tf.bfloat16), tf.float32), 0)
        sizes = [sq[i].shape.num_elements() for i in present]
        gathered = [tf.reshape(x, sq[i].shape) for x, i in zip(tf.split(flat, sizes), present)]
    for j, i in enumerate(present):
        mean[i] = tf.cast(comp.decompress(out[j], ctxs[j]), grads[i].dtype)
        if sq is not None:
            s = gathered[j] if gathered is not None else out[len(present) + j]
            sq[i] = tf.cast(s, stat_dtype(grads[i].dtype, square_dtype))
    return mean, sq


def _check_same_micro_batches(out, micro_batches, divide):
    """mean(M²) = mean(M)² on every rank iff all workers use the same M: else every rank raises."""
    m, m2 = tf.unstack(tf.cast(out[-1], tf.float64) / divide)
    check = tf.debugging.Assert(tf.abs(m2 - m * m) <= 1e-3 * m * m, [
        f"micro_batches (backward_passes_per_step) differs between workers: this one has {micro_batches}; "
        "give every worker the same value. Mean over workers, mean of squares:", m, m2])
    with tf.control_dependencies([check]):
        return [tf.identity(t) for t in out[:-1]]


def _vr_target(optimizer):
    """The optimizer that takes s: a ``GSNR`` (every VR rule is one), also inside a
    LossScaleOptimizer; else None."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer if isinstance(optimizer, GSNR) else None


def _check_k(optimizer, micro_batches, process_set):
    """k = W·M over the process set the statistics are reduced over (SPEC §2, §7)."""
    if _vr_target(optimizer) is not None:
        rules.check_samples(_process_set(process_set).size(), micro_batches)


def _sample(g, optimizer, square_dtype=None):
    """g in the statistics dtype, divided by a LossScaleOptimizer's current scale so s is unscaled."""
    g = tf.cast(g, stat_dtype(g.dtype, square_dtype))
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        # The scale its scale_loss used: the initial one until it is built.
        scale = optimizer.dynamic_scale if optimizer.built else optimizer.initial_scale
        g = g / tf.cast(scale, g.dtype)
    return g


@keras.saving.register_keras_serializable(package="hvd_lb")
class DistributedOptimizer(keras.optimizers.Optimizer):
    """``horovod.tensorflow.keras.DistributedOptimizer`` for Keras 3: ``apply`` (hence
    ``model.fit``) all-reduces first. Any Keras 3 optimizer; Horovod's arguments and defaults.

    ``backward_passes_per_step = M`` (alias ``micro_batches``): M calls to ``apply``
    accumulate locally, then one all-reduce and one real step of the wrapped optimizer,
    with k = W·M gradient samples (SPEC §1). Gradients are SUMMED over the micro-batches,
    as Horovod's: ḡ = mean over workers of Σ_m g_m, s = (1/k)Σx² with x = M·g_m;
    ``average_aggregated_gradients=True`` steps on ḡ/M and s/M² (SPEC §7). An
    ``hvd_lb.tf.GSNR`` (every VR rule), also inside a ``LossScaleOptimizer``, gets s from
    the same Horovod cycle. ``compression`` (``hvd.Compression.none``/``.fp16`` or
    ``"none"``/``"fp16"``) applies to ḡ only. ``op``: hvd.Average or hvd.Sum (Average with
    GSNR); ``gradient_predivide_factor`` f: 1/f before the sum, f/size after;
    ``device_dense``: where the all-reduce runs. Gradients always go dense
    (``sparse_as_dense``), all in one grouped all-reduce, so ``num_groups``/``groups`` (fusion
    hints) change nothing and are only checked. ``skip_nonfinite``: skip the step on every
    rank together when the reduced ḡ or s has a NaN/inf (state untouched, ``skipped_steps``
    counts, one line per 100 skips; no communication, one pass over ḡ). ``square_dtype`` = the dtype s travels in:
    None (float32; float64 for float64 variables), "float32", "float64", "bfloat16" (an
    all-gather of the 16-bit values, used only for ≤ 3 workers; SPEC §7) or "float16" (scaled
    by 2^e per variable, reduced beside ḡ, redone in float32 when flagged; SPEC §1).
    ``gsnr_interval`` N in [1, 2³¹ − 1]: s is reduced on every N-th step and reused in between
    (kept in optimizer variables, so checkpointed; SPEC §1). ``process_set``:
    the Horovod process set to reduce over (default ``hvd.global_process_set``); k counts
    its size. A ``None`` gradient is sent as zeros (nothing hangs); a variable whose gradient is None
    on every rank is left untouched, as Keras does; if some variable has a gradient on some ranks
    only, that step moves every variable on the average (zeros where None), as Horovod's PyTorch
    optimizer. ``overwrite_with_gradient`` variables take the maximum over the micro-batches (as
    Keras's gradient accumulation) and the average over workers. The gradients of 16-bit
    variables are accumulated, all-reduced (Horovod has no bfloat16 all-reduce) and handed to the
    wrapped optimizer in float32.
    """

    def __init__(self, optimizer, name=None, device_dense="", device_sparse="", compression="none",
                 sparse_as_dense=False, gradient_predivide_factor=1.0, op=AVERAGE,
                 backward_passes_per_step=None, average_aggregated_gradients=False, num_groups=0,
                 groups=None, process_set=None, *, micro_batches=None, square_dtype=None,
                 skip_nonfinite=False, gsnr_interval=1, **kwargs):
        if not isinstance(optimizer, keras.optimizers.Optimizer) or isinstance(
                optimizer, DistributedOptimizer):
            raise ValueError(f"invalid optimizer={optimizer!r}: must be a Keras 3 optimizer "
                             "(not already a DistributedOptimizer)")
        micro_batches = _micro_batches(micro_batches, backward_passes_per_step)
        compression, _ = _compressor(compression)
        square_dtype = rules.check_square_dtype(square_dtype)
        gsnr_interval = squares16.check_interval(gsnr_interval)
        op, predivide = _horovod_args(f"DistributedOptimizer({type(optimizer).__name__})",
                                      _vr_target(optimizer) is not None, op, gradient_predivide_factor,
                                      num_groups, groups, device_sparse, sparse_as_dense)
        for arg, value in (("average_aggregated_gradients", average_aggregated_gradients),
                           ("skip_nonfinite", skip_nonfinite)):
            if not isinstance(value, bool):
                raise ValueError(f"invalid {arg}={value!r}: must be True or False")
        if kwargs:
            raise ValueError(f"unknown argument(s) {', '.join(sorted(kwargs))} for DistributedOptimizer: "
                             "it takes Horovod's arguments (backward_passes_per_step, op, compression, ...) "
                             "plus micro_batches and square_dtype; set learning_rate and other Keras "
                             "optimizer arguments on the wrapped optimizer")
        _check_k(optimizer, micro_batches, process_set)
        super().__init__(learning_rate=0.0, name=name or f"distributed_{optimizer.name}")
        self.inner_optimizer = optimizer
        self.micro_batches = micro_batches
        self.compression = compression
        self.square_dtype = square_dtype
        self.gsnr_interval = gsnr_interval
        self.average_aggregated_gradients = average_aggregated_gradients
        self.skip_nonfinite = skip_nonfinite
        self.process_set = process_set
        self._warned_sparse = False
        self.op, self.gradient_predivide_factor, self.device_dense = op, predivide, device_dense

    @property
    def needs_squares(self) -> bool:
        return _vr_target(self.inner_optimizer) is not None

    def build(self, var_list):
        if self.built:
            return
        var_list = list(var_list)
        if self.micro_batches > 1:
            # float32 for 16-bit variables; overwrite_with_gradient ones keep their maximum.
            self._grad_acc = state_variables(self, var_list, "grad_accumulator", overwrite=True)
            if self.needs_squares:
                self._sq_acc = [
                    self.add_variable(tuple(v.shape), dtype=stat_dtype(tf.as_dtype(v.dtype), self.square_dtype),
                                      name=f"{variable_path(v).replace('/', '_')}_grad_sq_accumulator")
                    for v in var_list]
        if self.skip_nonfinite:
            self._skipped = self.add_variable((), dtype="int64", name="skipped_steps")
        if self.needs_squares and (self.square_dtype == "float16" or self.gsnr_interval > 1):
            _squares16.build(self, var_list, [stat_dtype(tf.as_dtype(v.dtype), self.square_dtype) for v in var_list])
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    def _check_agreement(self, var_list, elastic_sync: bool = False):
        """The same ``ValueError`` on every rank when ranks built different wrappers (GSNR on one
        rank only, another rule, micro_batches, a frozen variable, ...): one small all-gather at
        the first ``apply``, before any gradient is reduced (SPEC §7). Not in ``build``: a rank
        that restores a saved model builds its optimizer while loading, the others later."""
        if getattr(self, "_agreed", False) and not elastic_sync:
            return
        self._agreed = True
        ps = _process_set(self.process_set)
        if not ps.included() or ps.size() < 2 or (os.environ.get("HOROVOD_ELASTIC") == "1" and not elastic_sync):
            # Elastic: a worker added later steps alone first; the elastic states' sync, which
            # every rank runs after each reset, checks instead (``elastic_sync``).
            return
        settings = rules.agreement_settings(
            self.needs_squares, self.inner_optimizer, self.micro_batches, self.square_dtype, self.skip_nonfinite,
            self.op, self.gradient_predivide_factor, self.gsnr_interval,
            resolve_fused(_vr_target(self.inner_optimizer).fused) if self.needs_squares else None,
            average_aggregated_gradients=self.average_aggregated_gradients,
            # Not the paths: Keras numbers layers per process, and the collectives are named by shape.
            **{"variables (shape, dtype, trainable)": [
                [list(v.shape), tf.as_dtype(v.dtype).name, bool(v.trainable)] for v in var_list]})
        with tf.init_scope():  # eager even when Keras builds inside a traced step
            data = tf.constant(list(json.dumps(settings, sort_keys=True).encode()), tf.uint8)
            hvd = _hvd()
            sizes = hvd.allgather(tf.reshape(tf.size(data), [1]), process_set=ps,
                                  name="hvd_lb_agreement_n").numpy().tolist()
            padded = tf.reshape(tf.pad(data, [[0, max(sizes) - len(data)]]), [1, -1])
            rows = hvd.allgather(padded, process_set=ps, name="hvd_lb_agreement").numpy()
        every = [json.loads(bytes(rows[i, :n]).decode()) for i, n in enumerate(sizes)]
        error = rules.disagreement(every, ps.ranks or list(range(len(every))), "DistributedOptimizer")
        if error:
            raise ValueError(error)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped by ``skip_nonfinite`` so far."""
        return int(self._skipped.numpy()) if self.skip_nonfinite and self.built else 0

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    set_weights = set_all_weights

    def _begin(self, grads, trainable_variables):
        """The start of ``apply`` (both engines): build on first use, check the ranks agree →
        (variables, gradients, which are None: this rank's, known when traced, see _step)."""
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        tvs = list(trainable_variables) if trainable_variables is not None else self._trainable_variables
        self._check_agreement(tvs)
        grads = list(grads)
        if self.needs_squares:  # (every gradient goes dense; for GSNR with one warning, as on torch)
            for i, g in enumerate(grads):
                grads[i], self._warned_sparse = _densify(g, self._warned_sparse)
        if all(g is None for g in grads):
            raise ValueError("No gradients provided for any variable.")
        return tvs, grads, [g is None for g in grads]

    def apply(self, grads, trainable_variables=None):
        tvs, grads, absent = self._begin(grads, trainable_variables)
        # 16-bit gradients are reduced and handed on in float32 (``compression="fp16"`` halves the wire).
        grads = [tf.cast(g, work_dtype(g.dtype)) for g in _filled(grads, tvs)]
        if self.micro_batches == 1:
            sq = [tf.square(_sample(g, self.inner_optimizer, self.square_dtype)) for g in grads] if self.needs_squares else None
            self._step(grads, sq, tvs, absent)
        else:
            self._accumulate(grads, tvs, absent)
        # Counts micro-batches; the wrapped optimizer's ``iterations`` counts real steps.
        self._iterations.assign_add(1)

    def _accumulate(self, grads, tvs, absent):
        M = self.micro_batches
        idx = [self._get_variable_index(v) for v in tvs]
        if tf.executing_eagerly():
            # An eager loop's None set may change between micro-batches: a variable with a
            # gradient in any of them steps. (A traced step has one None set for all of them.)
            self._present = getattr(self, "_present", set()) | {i for i, a in zip(idx, absent) if not a}
            absent = [i not in self._present for i in idx]
        overwrite = [getattr(v, "overwrite_with_gradient", False) for v in tvs]
        for g, i, ow in zip(grads, idx, overwrite):
            acc = self._grad_acc[i]
            if ow:
                # As Keras's gradient accumulation: the maximum over the micro-batches (float8 scales).
                acc.assign(tf.maximum(acc, tf.cast(g, acc.dtype)))
                continue
            acc.assign_add(tf.cast(g, acc.dtype))
            if self.needs_squares:
                x = M * _sample(g, self.inner_optimizer, self.square_dtype)
                self._sq_acc[i].assign_add(x * x)

        def real_step():
            # Local (1/M)Σx = Σg and (1/M)Σx²; averaging over workers gives ḡ and s.
            local = [tf.convert_to_tensor(self._grad_acc[i].value) for i in idx]
            sq = [tf.convert_to_tensor(self._sq_acc[i].value) / M for i in idx] if self.needs_squares else None
            if self.average_aggregated_gradients:
                # Samples x = g_m: ḡ/M and s/M² (SPEC §7).
                local = [g if ow else g / M for g, ow in zip(local, overwrite)]
                sq = None if sq is None else [s / (M * M) for s in sq]
            self._step(local, sq, tvs, absent)
            for acc in self._grad_acc + (self._sq_acc if self.needs_squares else []):
                acc.assign(tf.zeros(acc.shape, acc.dtype))
            self._present = set()
            return tf.constant(True)

        tf.cond((self._iterations + 1) % M == 0, real_step, lambda: tf.constant(False))

    def _step(self, grads, sq, tvs, absent):
        n, workers = len(grads), _process_set(self.process_set).size()
        if workers > 1:
            # Per variable, in the same cycle: does some rank have its gradient, and does some
            # rank lack it (a gradient None on this rank is sent as zeros, so nothing hangs).
            flags = tf.constant([0.0 if a else 1.0 for a in absent] + [1.0 if a else 0.0 for a in absent],
                                grads[0].dtype)
            grads = grads + [flags]
            sq = None if sq is None else sq + [tf.zeros(2 * n, sq[0].dtype)]
        if sq is not None and hasattr(self, "_s16_count"):
            # float16 squares / gsnr_interval (SPEC §1): hvd_lb.tf._squares16 around the same call.
            def reduce(g, s, dtype, compress=True):
                return reduce_statistics(g, s, self.compression if compress else "none", dtype,
                                         self.process_set, self.micro_batches, self.op,
                                         self.gradient_predivide_factor, self.device_dense)
            reduce.workers = workers
            mean, sq = _squares16.statistics(self, n, grads, sq, reduce)
        else:
            mean, sq = reduce_statistics(grads, sq, self.compression, self.square_dtype, self.process_set,
                                         self.micro_batches, self.op, self.gradient_predivide_factor,
                                         self.device_dense)
        mixed = False
        if workers > 1:
            flags, mean, sq = mean[-1], mean[:-1], None if sq is None else sq[:-1]
            mixed = tf.reduce_any(tf.logical_and(flags[:n] != 0, flags[n:] != 0))

        def apply(dropped):
            return self._apply_reduced(mean, sq, tvs, dropped, workers)

        def step():
            if not any(absent) or mixed is False:
                return apply(absent)
            # Some variable has a gradient on some ranks only: every rank steps every variable on
            # the average (zeros where absent), as Horovod's PyTorch optimizer; otherwise the
            # None set is the same on every rank and stays untouched.
            return tf.cond(mixed, lambda: apply([False] * n), lambda: apply(absent))

        if not self.skip_nonfinite:
            step()
            return
        # ḡ and s are already reduced, identical on every rank: all skip together, no communication.
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in mean + (sq or []) if t is not None])

        def skip():
            self._skipped.assign_add(1)
            tf.cond(self._skipped % rules.SKIP_WARN_EVERY == 1,
                    lambda: tf.print("hvd_lb: non-finite averaged gradient or squares: step skipped on every "
                                     "rank;", self._skipped, "skipped so far", output_stream=sys.stderr),
                    lambda: tf.no_op())
            return tf.constant(False)

        tf.cond(finite, step, skip)

    def _apply_reduced(self, mean, sq, tvs, dropped, workers=1):
        """Step the wrapped optimizer on the reduced ḡ (and s for a GSNR); a variable whose
        gradient is None on every rank gets None: Keras leaves it untouched."""
        if sq is not None:
            # Under LossScaleOptimizer the finite check runs on the all-reduced ḡ, identical on
            # every rank, so all ranks skip or step together.
            _vr_target(self.inner_optimizer).set_grad_sq([None if d else s for s, d in zip(sq, dropped)],
                                                         _squares16.floor(self, workers))
        self.inner_optimizer.apply([None if d else g for g, d in zip(mean, dropped)], tvs)
        return tf.constant(True)

    # -- delegation to the wrapped optimizer -------------------------------------------

    learning_rate = inner_learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        self.inner_optimizer.exclude_from_weight_decay(var_list=var_list, var_names=var_names)

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def gsnr_diagnostics(self):
        """The wrapped optimizer's GSNR diagnostics (see ``GSNR``)."""
        target = _vr_target(self.inner_optimizer)
        return target.gsnr_diagnostics() if target is not None else {}

    def get_config(self):
        # A process set cannot be serialized: a restored optimizer reduces over the global set.
        return {"name": self.name,
                "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
                "micro_batches": self.micro_batches, "compression": self.compression,
                "square_dtype": self.square_dtype, "gsnr_interval": self.gsnr_interval,
                "average_aggregated_gradients": self.average_aggregated_gradients,
                "skip_nonfinite": self.skip_nonfinite,
                "op": self.op, "gradient_predivide_factor": self.gradient_predivide_factor}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("optimizer"),
                                                      custom_objects=custom_objects)
        return cls(inner, **config)


class DistributedGradientTape:
    """``horovod.tensorflow.DistributedGradientTape`` for Keras 3: ``gradient`` returns ḡ,
    all-reduced over workers. Horovod's arguments and defaults (as ``DistributedOptimizer``).

    With an ``hvd_lb.tf.GSNR`` optimizer (every VR rule; also inside a LossScaleOptimizer),
    the same Horovod cycle gives s = (1/k)Σx², kept as ``tape.grad_sq`` and handed to the
    optimizer: to ``optimizer`` when given, else to every GSNR that then steps these
    variables (``opt.apply_gradients`` in the same ``tf.function``, as Horovod's examples
    do). ``micro_batches = M``: pass a list of M micro-batch losses recorded on a
    ``persistent=True`` tape; their gradients are SUMMED, as Horovod's
    ``backward_passes_per_step``, with samples x_m = M·g_m (SPEC §1, §7). A ``None``
    gradient is returned (and reduced) as zeros, the same tensors on every rank.
    ``compression``, ``square_dtype`` and ``process_set`` as in ``DistributedOptimizer``.
    """

    def __init__(self, gradtape, device_dense="", device_sparse="", compression="none",
                 sparse_as_dense=False, op=AVERAGE, gradient_predivide_factor=1.0, num_groups=0,
                 groups=None, process_set=None, *, optimizer=None, micro_batches=1, square_dtype=None):
        if not isinstance(gradtape, tf.GradientTape):
            raise ValueError(f"invalid gradtape={gradtape!r}: must be a tf.GradientTape")
        if optimizer is not None and not isinstance(optimizer, keras.optimizers.Optimizer):
            raise ValueError(f"invalid optimizer={optimizer!r}: must be a Keras optimizer or None")
        if isinstance(optimizer, DistributedOptimizer):
            raise ValueError("invalid optimizer: a DistributedOptimizer all-reduces itself; pass the "
                             "plain optimizer to DistributedGradientTape")
        self._tape = gradtape
        self._optimizer = optimizer
        self.micro_batches = rules.check_micro_batches(micro_batches)
        self.compression, _ = _compressor(compression)
        self.square_dtype = rules.check_square_dtype(square_dtype)
        if self.square_dtype == "float16":
            raise ValueError("invalid square_dtype='float16' for DistributedGradientTape: float16 squares keep a "
                             "per-tensor scale across steps; use hvd_lb.tf.DistributedOptimizer (model.fit) for them")
        self.process_set = process_set
        self._horovod = (op, gradient_predivide_factor, num_groups, groups, device_sparse, sparse_as_dense)
        self.op, self.predivide = _horovod_args("DistributedGradientTape", _vr_target(optimizer) is not None,
                                                *self._horovod)
        self.device_dense = device_dense
        self.grad_sq = None
        _check_k(optimizer, self.micro_batches, process_set)

    def __getattr__(self, name):
        return getattr(self._tape, name)

    def __enter__(self):
        self._tape.__enter__()
        return self

    def __exit__(self, *exc):
        return self._tape.__exit__(*exc)

    def _squares(self):
        """Whether to compute s: for ``optimizer`` if it is a GSNR, else if any GSNR exists."""
        if self._optimizer is not None:
            return _vr_target(self._optimizer) is not None
        if not GSNR.live():
            return False
        # Checked here, not at construction: Horovod's signature names no optimizer.
        _horovod_args("DistributedGradientTape with a GSNR optimizer", True, *self._horovod)
        _check_k(GSNR.live()[0], self.micro_batches, self.process_set)
        return True

    def gradient(self, target, sources, output_gradients=None,
                 unconnected_gradients=tf.UnconnectedGradients.NONE):
        M = self.micro_batches
        flat = tf.nest.flatten(sources)
        squares = self._squares()
        if M == 1:
            grads = _filled(self._tape.gradient(target, flat, output_gradients, unconnected_gradients), flat)
            sq = [tf.square(_sample(g, self._optimizer, self.square_dtype)) for g in grads] if squares else None
        else:
            if not isinstance(target, (list, tuple)) or len(target) != M:
                raise ValueError(f"invalid target: with micro_batches={M} pass a list of {M} "
                                 "micro-batch losses")
            if not self._tape._persistent:
                raise ValueError("micro_batches > 1 needs tf.GradientTape(persistent=True)")
            per = [_filled(self._tape.gradient(t, flat, None, unconnected_gradients), flat) for t in target]
            grads = [tf.add_n(list(gs)) for gs in zip(*per)]  # (1/M)Σ x_m = Σ g_m
            sq = [tf.add_n([tf.square(M * _sample(g, self._optimizer, self.square_dtype)) for g in gs]) / M
                  for gs in zip(*per)] if squares else None
        mean, sq = reduce_statistics(grads, sq, self.compression, self.square_dtype, self.process_set, M,
                                     self.op, self.predivide, self.device_dense)
        self.grad_sq = sq
        if squares:
            if self._optimizer is not None:
                _vr_target(self._optimizer).set_grad_sq(sq)
            else:
                GSNR.offer_grad_sq(flat, sq)
        return tf.nest.pack_sequence_as(sources, mean)


def PartialDistributedGradientTape(gradtape, device_dense="", device_sparse="", compression="none",
                                   sparse_as_dense=False, op=AVERAGE, gradient_predivide_factor=1.0,
                                   num_groups=0, groups=None, process_set=None, local_layers=None, **kwargs):
    """Horovod's ``PartialDistributedGradientTape``: gradients of ``local_layers`` stay local.

    Only without local layers (then it is ``DistributedGradientTape``): worker-local
    gradients would leave GSNR without samples and need a second reduction list.
    """
    if local_layers:
        raise ValueError(f"invalid local_layers={local_layers!r}: hvd_lb.tf reduces every gradient; use "
                         "horovod.tensorflow.PartialDistributedGradientTape for worker-local layers")
    return DistributedGradientTape(gradtape, device_dense, device_sparse, compression, sparse_as_dense, op,
                                   gradient_predivide_factor, num_groups, groups, process_set, **kwargs)


def _unwrap(variables):
    return [v.value if isinstance(v, keras.Variable) else v for v in variables]


_broadcasts = itertools.count()  # one prefix per broadcast call, the same sequence on every rank


def restart_broadcast_names():
    """Restart the call count that names broadcasts: an elastic sync calls it on every rank, so a
    worker that joins (count 0) names its broadcasts as the others do."""
    global _broadcasts
    _broadcasts = itertools.count()


def broadcast_variables(variables, root_rank=0, process_set=None):
    """``hvd.broadcast_variables`` that accepts Keras 3 variables (and tf.Variables).

    Matched by position in ``variables``, never by name: a model restored with
    ``load_model`` on rank 0 only and a freshly built one elsewhere name their variables
    differently (issue 12). Every rank first checks that all hold the same number of
    variables (one small all-gather), and raises if not, instead of hanging.
    """
    hvd = _hvd()
    process_set = _process_set(process_set)
    if isinstance(root_rank, bool) or not isinstance(root_rank, int) or not 0 <= root_rank < hvd.size():
        raise ValueError(f"invalid root_rank={root_rank!r}: must be an integer in [0, {hvd.size() - 1}]")
    variables = _unwrap(variables)
    if process_set.size() == 1:
        return
    call = next(_broadcasts)

    def run():
        n = tf.constant([len(variables)], tf.int32)
        counts = hvd.allgather(n, process_set=process_set, name=f"hvd_lb_bcast_{call}_count",
                               ignore_name_scope=True)
        check = tf.debugging.Assert(tf.reduce_all(counts == n[0]), [
            f"broadcast_variables: the workers hold different numbers of variables (this one "
            f"{len(variables)}): build the same model and optimizer on every rank; counts:", counts])
        with tf.control_dependencies([check]):
            for i, v in enumerate(variables):
                v.assign(hvd.broadcast(v, root_rank, name=f"hvd_lb_bcast_{call}_{i}", ignore_name_scope=True,
                                       process_set=process_set))

    tf.function(run)() if tf.executing_eagerly() else run()


__all__ = ["DistributedOptimizer", "DistributedGradientTape", "PartialDistributedGradientTape",
           "broadcast_variables",
           "reduce_statistics", "stat_dtype"]
