"""Horovod on Keras 3: gradient statistics, a distributed optimizer and gradient tape.

SPEC §1: with W workers and M micro-batches the k = W·M samples are
x_{w,m} = M·g_{w,m}; the step uses ḡ = (1/k)Σx and, for VR rules,
s = (1/k)Σx². Both go out in one ``hvd.grouped_allreduce`` (one Horovod
cycle); non-VR rules reduce each gradient exactly once, like plain Horovod.
Horovod's own Keras layer is broken on Keras 3 (horovod#4290), so this
module talks to ``horovod.tensorflow`` directly and unwraps Keras variables.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from .. import rules
from ._ops import stat_dtype
from .optimizers import LargeBatchOptimizer

_COMPRESSIONS = ("none", "fp16")
_SQUARE_DTYPES = (None, "float32")


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


def _check_square_dtype(square_dtype):
    if isinstance(square_dtype, tf.DType):
        square_dtype = square_dtype.name
    if square_dtype == "bfloat16":
        raise ValueError("invalid square_dtype='bfloat16': Horovod 0.28's TensorFlow all-reduce has no "
                         "bfloat16 kernel (float16 would overflow on squares); use None or 'float32'")
    if square_dtype not in _SQUARE_DTYPES:
        raise ValueError(f"invalid square_dtype={square_dtype!r}: must be None (float32, or float64 "
                         "for float64 gradients) or 'float32'")
    return square_dtype


def _dense(g):
    return None if g is None else tf.convert_to_tensor(g)


def _grouped_average(tensors):
    """Average ``tensors`` over workers in one Horovod cycle.

    HorovodGroupedAllreduce takes one dtype, so mixed dtypes (fp16-compressed ḡ with
    float32 s, models mixing float32 and float64 variables) go out as one group per dtype,
    issued from a single graph so that Horovod negotiates them together.
    """
    hvd = _hvd()
    groups = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    if len(groups) == 1:
        return list(hvd.grouped_allreduce(list(tensors), op=hvd.Average))

    def run(ts):
        out = [None] * len(ts)
        for idx in groups.values():
            for i, r in zip(idx, hvd.grouped_allreduce([ts[i] for i in idx], op=hvd.Average)):
                out[i] = r
        return out

    return tf.function(run)(list(tensors)) if tf.executing_eagerly() else run(list(tensors))


def reduce_statistics(grads, squares=None, compression="none", square_dtype=None):
    """All-reduce ḡ (and s when ``squares`` is given) across Horovod workers in one call.

    ``grads`` are each worker's (1/M)Σ_m x_{w,m}, ``squares`` its (1/M)Σ_m x²_{w,m};
    the average over workers gives ḡ and s of SPEC §1. ``None`` entries stay ``None``.
    Returns ``(mean, sq)`` (``sq`` is ``None`` without ``squares``).
    """
    hvd = _hvd()
    _, comp = _compressor(compression)
    square_dtype = _check_square_dtype(square_dtype)
    present = [i for i, g in enumerate(grads) if g is not None]
    mean = list(grads)
    sq = None if squares is None else list(squares)
    if hvd.size() == 1 or not present:
        return mean, sq
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
    if sq is not None:
        # s is reduced in float32 or wider unless bfloat16 is asked for (SPEC §1).
        packed += [tf.cast(sq[i], square_dtype or stat_dtype(grads[i].dtype)) for i in present]
    out = _grouped_average(packed)
    for j, i in enumerate(present):
        mean[i] = comp.decompress(out[j], ctxs[j])
        if sq is not None:
            sq[i] = tf.cast(out[len(present) + j], stat_dtype(grads[i].dtype))
    return mean, sq


def _needs_squares(optimizer) -> bool:
    return isinstance(optimizer, LargeBatchOptimizer) and optimizer.rule.gsnr


def _vr_target(optimizer):
    """The optimizer that takes s: a VR rule, also inside a LossScaleOptimizer; else None."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer if _needs_squares(optimizer) else None


def _check_k(optimizer, micro_batches):
    if _needs_squares(optimizer):
        rules.check_samples(_hvd().size(), micro_batches)


@keras.saving.register_keras_serializable(package="hvd_lb")
class DistributedOptimizer(keras.optimizers.Optimizer):
    """Wrap a Keras optimizer so that ``apply`` (hence ``model.fit``) all-reduces first.

    ``micro_batches = M``: M calls to ``apply`` accumulate Σg and Σ(M·g)² locally,
    then one grouped all-reduce and one real step of the wrapped optimizer,
    with k = size × M gradient samples (SPEC §1). Works with any Keras optimizer
    (one Average all-reduce per gradient); hvd_lb VR optimizers also get s.
    ``compression`` (``"none"``/``"fp16"`` or ``hvd.Compression.*``) applies to ḡ only;
    s stays float32 or wider (``square_dtype``: None or "float32"; bfloat16 is refused,
    Horovod's TF ops have no bfloat16 kernel).
    """

    def __init__(self, optimizer, micro_batches=1, compression="none", square_dtype=None,
                 name=None, **kwargs):
        if not isinstance(optimizer, keras.optimizers.Optimizer) or isinstance(optimizer, DistributedOptimizer):
            raise ValueError(f"invalid optimizer={optimizer!r}: must be a Keras 3 optimizer "
                             "(not already a DistributedOptimizer)")
        micro_batches = rules.check_micro_batches(micro_batches)
        compression, _ = _compressor(compression)
        square_dtype = _check_square_dtype(square_dtype)
        if kwargs:
            raise ValueError(f"unknown argument(s) {', '.join(sorted(kwargs))} for DistributedOptimizer: "
                             "set Keras optimizer arguments on the wrapped optimizer")
        _check_k(_vr_target(optimizer), micro_batches)
        super().__init__(learning_rate=0.0, name=name or f"distributed_{optimizer.name}")
        self.inner_optimizer = optimizer
        self.micro_batches = micro_batches
        self.compression = compression
        self.square_dtype = square_dtype

    @property
    def needs_squares(self) -> bool:
        return _vr_target(self.inner_optimizer) is not None

    def _unscale(self, g):
        """g in stat dtype, divided by LossScaleOptimizer's current scale so s is unscaled."""
        g = tf.cast(g, stat_dtype(g.dtype))
        if isinstance(self.inner_optimizer, keras.optimizers.LossScaleOptimizer):
            g = g / tf.cast(self.inner_optimizer.dynamic_scale, g.dtype)
        return g

    def build(self, var_list):
        if self.built:
            return
        var_list = list(var_list)
        if self.micro_batches > 1:
            self._grad_acc = self.add_optimizer_variables(var_list, "grad_accumulator")
            if self.needs_squares:
                self._sq_acc = [self.add_variable(tuple(v.shape), dtype=stat_dtype(tf.as_dtype(v.dtype)),
                                                  name=f"{v.path.replace('/', '_')}_grad_sq_accumulator")
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
            sq = [None if g is None else tf.square(self._unscale(g)) for g in grads] \
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
                x = M * self._unscale(g)
                self._sq_acc[i].assign_add(x * x)

        def real_step():
            # Local (1/M)Σx = Σg and (1/M)Σx²; averaging over workers gives ḡ and s.
            local = [None if g is None else tf.convert_to_tensor(self._grad_acc[i].value)
                     for g, i in zip(grads, idx)]
            sq = [None if g is None else tf.convert_to_tensor(self._sq_acc[i].value) / M
                  for g, i in zip(grads, idx)] if self.needs_squares else None
            self._step(local, sq, tvs)
            for acc in self._grad_acc + (self._sq_acc if self.needs_squares else []):
                acc.assign(tf.zeros(acc.shape, acc.dtype))
            return tf.constant(True)

        tf.cond((self._iterations + 1) % M == 0, real_step, lambda: tf.constant(False))

    def _step(self, grads, sq, tvs):
        mean, sq = reduce_statistics(grads, sq, self.compression, self.square_dtype)
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
        """The wrapped optimizer's GSNR diagnostics (see ``LargeBatchOptimizer``)."""
        fn = getattr(self.inner_optimizer, "gsnr_diagnostics", None)
        return fn() if fn else {}

    def get_config(self):
        return {"name": self.name,
                "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
                "micro_batches": self.micro_batches, "compression": self.compression,
                "square_dtype": self.square_dtype}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("optimizer"),
                                                      custom_objects=custom_objects)
        return cls(inner, **config)


class DistributedGradientTape:
    """Wrap a ``tf.GradientTape`` so ``gradient`` returns ḡ, all-reduced over workers.

    For a VR ``optimizer`` the same grouped all-reduce also gives s, handed to
    ``optimizer.set_grad_sq`` (and kept as ``tape.grad_sq``); call
    ``optimizer.apply`` in the same ``tf.function``. ``micro_batches = M``:
    pass a list of M micro-batch losses recorded on a ``persistent=True`` tape;
    samples are x_m = M·g_m as in SPEC §1.
    """

    def __init__(self, tape, optimizer=None, micro_batches=1, compression="none",
                 square_dtype=None):
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
        self.square_dtype = _check_square_dtype(square_dtype)
        self.grad_sq = None
        _check_k(optimizer, self.micro_batches)

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
        squares = _needs_squares(self._optimizer)
        if M == 1:
            grads = [_dense(g) for g in self._tape.gradient(target, flat, output_gradients,
                                                            unconnected_gradients)]
            sq = [None if g is None else tf.square(tf.cast(g, stat_dtype(g.dtype))) for g in grads] \
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
                    xs = [M * tf.cast(g, stat_dtype(g.dtype)) for g in gs]
                    sq.append(tf.add_n([x * x for x in xs]) / M)
        mean, sq = reduce_statistics(grads, sq, self.compression, self.square_dtype)
        self.grad_sq = sq
        if squares:
            self._optimizer.set_grad_sq(sq)
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
