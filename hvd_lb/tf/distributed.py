"""Horovod on Keras 3: gradient statistics, a distributed optimizer and gradient tape.

docs/SPEC.md §1: with W workers and M micro-batches the k = W·M samples are
x_{w,m} = M·g_{w,m}; the step uses ḡ = (1/k)Σx and, for an optimizer that is
(or wraps) ``hvd_lb.tf.GSNR``, s = (1/k)Σx². Both go out in one Horovod cycle
(one ``hvd.grouped_allreduce``, plus one all-gather for bfloat16 s, SPEC §7);
other optimizers reduce each gradient exactly once, like plain Horovod.
Horovod's own Keras layer is broken on Keras 3 (horovod#4290), so this
module talks to ``horovod.tensorflow`` directly and unwraps Keras variables.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from .. import rules
from ._ops import stat_dtype, variable_path
from .gsnr import GSNR

_COMPRESSIONS = ("none", "fp16")


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


def _dense(g):
    return None if g is None else tf.convert_to_tensor(g)


def _collectives(tensors, gather, process_set):
    """Average ``tensors`` over workers and all-gather ``gather`` (or None) in one Horovod cycle.

    HorovodGroupedAllreduce takes one dtype, so mixed dtypes (fp16-compressed ḡ with
    float32 s, models mixing float32 and float64 variables) go out as one group per dtype;
    with the all-gather they are issued from a single graph so that Horovod negotiates
    them together. Returns (averaged tensors, gathered tensor or None).
    """
    hvd = _hvd()
    groups = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    if len(groups) == 1 and gather is None:
        return list(hvd.grouped_allreduce(list(tensors), op=hvd.Average, process_set=process_set)), None

    def run(ts, bits):
        out = [None] * len(ts)
        for idx in groups.values():
            reduced = hvd.grouped_allreduce([ts[i] for i in idx], op=hvd.Average, process_set=process_set)
            for i, r in zip(idx, reduced):
                out[i] = r
        return out, None if bits is None else hvd.allgather(bits, process_set=process_set)

    if tf.executing_eagerly():
        run = tf.function(run)
    return run(list(tensors), gather)


def reduce_statistics(grads, squares=None, compression="none", square_dtype=None, process_set=None):
    """All-reduce ḡ (and s when ``squares`` is given) across Horovod workers in one cycle.

    ``grads`` are each worker's (1/M)Σ_m x_{w,m}, ``squares`` its (1/M)Σ_m x²_{w,m};
    the average over ``process_set`` (default ``hvd.global_process_set``) gives ḡ and s
    of SPEC §1. ``None`` entries stay ``None``. ``square_dtype``: see
    ``DistributedOptimizer``. Returns ``(mean, sq)`` (``sq`` is ``None`` without ``squares``).
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
        t, ctx = comp.compress(grads[i])
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
        packed += [tf.cast(sq[i], wire or stat_dtype(grads[i].dtype)) for i in present]
    out, gathered = _collectives(packed, bits, process_set)
    if gathered is not None:
        flat = tf.reduce_mean(tf.cast(tf.bitcast(gathered, tf.bfloat16), tf.float32), 0)
        sizes = [sq[i].shape.num_elements() for i in present]
        gathered = [tf.reshape(x, sq[i].shape) for x, i in zip(tf.split(flat, sizes), present)]
    for j, i in enumerate(present):
        mean[i] = comp.decompress(out[j], ctxs[j])
        if sq is not None:
            s = gathered[j] if gathered is not None else out[len(present) + j]
            sq[i] = tf.cast(s, stat_dtype(grads[i].dtype))
    return mean, sq


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


def _sample(g, optimizer):
    """g in the statistics dtype, divided by a LossScaleOptimizer's current scale so s is unscaled."""
    g = tf.cast(g, stat_dtype(g.dtype))
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        # The scale its scale_loss used: the initial one until it is built.
        scale = optimizer.dynamic_scale if optimizer.built else optimizer.initial_scale
        g = g / tf.cast(scale, g.dtype)
    return g


@keras.saving.register_keras_serializable(package="hvd_lb")
class DistributedOptimizer(keras.optimizers.Optimizer):
    """Wrap a Keras optimizer so that ``apply`` (hence ``model.fit``) all-reduces first.

    ``micro_batches = M`` (alias: Horovod's ``backward_passes_per_step``): M calls to
    ``apply`` accumulate locally, then one all-reduce and one real step of the wrapped
    optimizer, with k = W·M gradient samples (SPEC §1). Gradients are SUMMED over the
    micro-batches, as Horovod's ``backward_passes_per_step``: ḡ = mean over workers of
    Σ_m g_m, s = (1/k)Σx² with x = M·g_m. A ``model.fit`` user whose loss is a
    per-micro-batch mean scales the loss by 1/M or passes
    ``average_aggregated_gradients=True`` (Horovod Keras' argument), which steps on
    ḡ/M and s/M² (SPEC §7). Works with any Keras optimizer (one Average all-reduce per
    gradient); an ``hvd_lb.tf.GSNR`` (every VR rule), also inside a
    ``LossScaleOptimizer``, gets s from the same Horovod cycle.
    ``compression`` (``"none"``/``"fp16"`` or ``hvd.Compression.*``) applies to ḡ only.
    ``square_dtype`` = the dtype s travels in: None (float32; float64 for float64
    variables), "float32", "float64" or "bfloat16" (an all-gather of the 16-bit values,
    used only for ≤ 3 workers, float32 above; SPEC §7). ``process_set``: the Horovod
    process set to reduce over (default ``hvd.global_process_set``); k counts its size.
    """

    def __init__(self, optimizer, micro_batches=None, compression="none", square_dtype=None,
                 average_aggregated_gradients=False, backward_passes_per_step=None, process_set=None,
                 name=None, **kwargs):
        if not isinstance(optimizer, keras.optimizers.Optimizer) or isinstance(
                optimizer, DistributedOptimizer):
            raise ValueError(f"invalid optimizer={optimizer!r}: must be a Keras 3 optimizer "
                             "(not already a DistributedOptimizer)")
        micro_batches = _micro_batches(micro_batches, backward_passes_per_step)
        compression, _ = _compressor(compression)
        square_dtype = rules.check_square_dtype(square_dtype)
        if not isinstance(average_aggregated_gradients, bool):
            raise ValueError(f"invalid average_aggregated_gradients={average_aggregated_gradients!r}: "
                             "must be True or False")
        if kwargs:
            raise ValueError(f"unknown argument(s) {', '.join(sorted(kwargs))} for DistributedOptimizer: "
                             "set Keras optimizer arguments on the wrapped optimizer")
        _check_k(optimizer, micro_batches, process_set)
        super().__init__(learning_rate=0.0, name=name or f"distributed_{optimizer.name}")
        self.inner_optimizer = optimizer
        self.micro_batches = micro_batches
        self.compression = compression
        self.square_dtype = square_dtype
        self.average_aggregated_gradients = average_aggregated_gradients
        self.process_set = process_set

    @property
    def needs_squares(self) -> bool:
        return _vr_target(self.inner_optimizer) is not None

    def build(self, var_list):
        if self.built:
            return
        var_list = list(var_list)
        if self.micro_batches > 1:
            self._grad_acc = self.add_optimizer_variables(var_list, "grad_accumulator")
            if self.needs_squares:
                self._sq_acc = [
                    self.add_variable(tuple(v.shape), dtype=stat_dtype(tf.as_dtype(v.dtype)),
                                      name=f"{variable_path(v).replace('/', '_')}_grad_sq_accumulator")
                    for v in var_list]
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        tvs = list(trainable_variables) if trainable_variables is not None else self._trainable_variables
        grads = [_dense(g) for g in grads]
        if self.micro_batches == 1:
            sq = [None if g is None else tf.square(_sample(g, self.inner_optimizer)) for g in grads] \
                if self.needs_squares else None
            self._step(grads, sq, tvs)
        else:
            self._accumulate(grads, tvs)
        # Counts micro-batches; the wrapped optimizer's ``iterations`` counts real steps.
        self._iterations.assign_add(1)

    def _accumulate(self, grads, tvs):
        M = self.micro_batches
        idx = [self._get_variable_index(v) for v in tvs]
        for g, i in zip(grads, idx):
            if g is None:
                continue
            self._grad_acc[i].assign_add(tf.cast(g, self._grad_acc[i].dtype))
            if self.needs_squares:
                x = M * _sample(g, self.inner_optimizer)
                self._sq_acc[i].assign_add(x * x)

        def real_step():
            # Local (1/M)Σx = Σg and (1/M)Σx²; averaging over workers gives ḡ and s.
            local = [None if g is None else tf.convert_to_tensor(self._grad_acc[i].value)
                     for g, i in zip(grads, idx)]
            sq = [None if g is None else tf.convert_to_tensor(self._sq_acc[i].value) / M
                  for g, i in zip(grads, idx)] if self.needs_squares else None
            if self.average_aggregated_gradients:
                # Samples x = g_m: ḡ/M and s/M² (SPEC §7).
                local = [None if g is None else g / M for g in local]
                sq = None if sq is None else [None if s is None else s / (M * M) for s in sq]
            self._step(local, sq, tvs)
            for acc in self._grad_acc + (self._sq_acc if self.needs_squares else []):
                acc.assign(tf.zeros(acc.shape, acc.dtype))
            return tf.constant(True)

        tf.cond((self._iterations + 1) % M == 0, real_step, lambda: tf.constant(False))

    def _step(self, grads, sq, tvs):
        mean, sq = reduce_statistics(grads, sq, self.compression, self.square_dtype, self.process_set)
        if sq is not None:
            # Under LossScaleOptimizer the finite check runs on the all-reduced ḡ, identical on
            # every rank, so all ranks skip or step together.
            _vr_target(self.inner_optimizer).set_grad_sq(sq)
        self.inner_optimizer.apply(mean, tvs)

    # -- delegation to the wrapped optimizer -------------------------------------------

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

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
                "square_dtype": self.square_dtype,
                "average_aggregated_gradients": self.average_aggregated_gradients}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("optimizer"),
                                                      custom_objects=custom_objects)
        return cls(inner, **config)


class DistributedGradientTape:
    """Wrap a ``tf.GradientTape`` so ``gradient`` returns ḡ, all-reduced over workers.

    For an ``optimizer`` that is (or, inside a LossScaleOptimizer, wraps) an
    ``hvd_lb.tf.GSNR`` (every VR rule), the same Horovod cycle also gives s, handed to
    its ``set_grad_sq`` (and kept as ``tape.grad_sq``); call ``optimizer.apply`` in the
    same ``tf.function``. ``micro_batches = M``: pass a list of M micro-batch losses
    recorded on a ``persistent=True`` tape; their gradients are SUMMED, as Horovod's
    ``backward_passes_per_step``, with samples x_m = M·g_m (SPEC §1, §7).
    ``compression``, ``square_dtype`` and ``process_set`` as in ``DistributedOptimizer``.
    """

    def __init__(self, tape, optimizer=None, micro_batches=1, compression="none",
                 square_dtype=None, process_set=None):
        if not isinstance(tape, tf.GradientTape):
            raise ValueError(f"invalid tape={tape!r}: must be a tf.GradientTape")
        if optimizer is not None and not isinstance(optimizer, keras.optimizers.Optimizer):
            raise ValueError(f"invalid optimizer={optimizer!r}: must be a Keras optimizer or None")
        if isinstance(optimizer, DistributedOptimizer):
            raise ValueError("invalid optimizer: a DistributedOptimizer all-reduces itself; pass the "
                             "plain optimizer to DistributedGradientTape")
        self._tape = tape
        self._optimizer = optimizer
        self.micro_batches = rules.check_micro_batches(micro_batches)
        self.compression, _ = _compressor(compression)
        self.square_dtype = rules.check_square_dtype(square_dtype)
        self.process_set = process_set
        self.grad_sq = None
        _check_k(optimizer, self.micro_batches, process_set)

    def __getattr__(self, name):
        return getattr(self._tape, name)

    def __enter__(self):
        self._tape.__enter__()
        return self

    def __exit__(self, *exc):
        return self._tape.__exit__(*exc)

    def gradient(self, target, sources, output_gradients=None,
                 unconnected_gradients=tf.UnconnectedGradients.NONE):
        M = self.micro_batches
        flat = tf.nest.flatten(sources)
        target_opt = _vr_target(self._optimizer)
        squares = target_opt is not None
        if M == 1:
            grads = [_dense(g) for g in self._tape.gradient(target, flat, output_gradients,
                                                            unconnected_gradients)]
            sq = [None if g is None else tf.square(_sample(g, self._optimizer)) for g in grads] \
                if squares else None
        else:
            if not isinstance(target, (list, tuple)) or len(target) != M:
                raise ValueError(f"invalid target: with micro_batches={M} pass a list of {M} "
                                 "micro-batch losses")
            if not self._tape._persistent:
                raise ValueError("micro_batches > 1 needs tf.GradientTape(persistent=True)")
            per = [[_dense(g) for g in self._tape.gradient(t, flat, None, unconnected_gradients)]
                   for t in target]
            grads, sq = [], [] if squares else None
            for i in range(len(flat)):
                gs = [p[i] for p in per if p[i] is not None]
                if not gs:
                    grads.append(None)
                    if squares:
                        sq.append(None)
                    continue
                grads.append(tf.add_n(gs))  # (1/M)Σ x_m = Σ g_m
                if squares:
                    xs = [M * _sample(g, self._optimizer) for g in gs]
                    sq.append(tf.add_n([x * x for x in xs]) / M)
        mean, sq = reduce_statistics(grads, sq, self.compression, self.square_dtype, self.process_set)
        self.grad_sq = sq
        if squares:
            target_opt.set_grad_sq(sq)
        return tf.nest.pack_sequence_as(sources, mean)


def _unwrap(variables):
    return [v.value if isinstance(v, keras.Variable) else v for v in variables]


def broadcast_variables(variables, root_rank=0):
    """``hvd.broadcast_variables`` that accepts Keras 3 variables (and tf.Variables)."""
    hvd = _hvd()
    if isinstance(root_rank, bool) or not isinstance(root_rank, int) or not 0 <= root_rank < hvd.size():
        raise ValueError(f"invalid root_rank={root_rank!r}: must be an integer in [0, {hvd.size() - 1}]")
    variables = _unwrap(variables)
    if hvd.size() > 1 and variables:
        hvd.broadcast_variables(variables, root_rank)


__all__ = ["DistributedOptimizer", "DistributedGradientTape", "broadcast_variables",
           "reduce_statistics", "stat_dtype"]
