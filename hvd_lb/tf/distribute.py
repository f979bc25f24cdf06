"""hvd_lb on TensorFlow's own engine, ``tf.distribute``: no Horovod.

Usage (``MultiWorkerMirroredStrategy`` across hosts from ``TF_CONFIG``, or
``MirroredStrategy`` across local devices)::

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = make_model()
        opt = hvd_lb.tf.create("vr-lamb", learning_rate=1e-3)          # or GSNR(keras AdamW)
        opt = hvd_lb.tf.distribute.DistributedOptimizer(opt, micro_batches=M)   # M = 1: optional
        model.compile(optimizer=opt, loss="mse")
    model.fit(dataset)                       # or strategy.run(step) with opt.apply(grads, vars)

docs/SPEC.md §1 with R = ``strategy.num_replicas_in_sync`` replicas and k = R·M
samples. Under a strategy Keras scales each replica's loss by 1/R (custom loops do
the same with ``tf.nn.compute_average_loss``) and sums the replicas' gradients, so the
gradient g a replica hands to ``apply`` for micro-batch m is x/(R·M) of its sample x.
Each replica packs its Σ_m g_m and its share (1/k)Σ_m x_m² of s into one flat tensor
per dtype; ONE all-reduce (SUM) of that tensor gives ḡ and s on every replica (the
same numbers as the Horovod path); the wrapped optimizer then steps each replica's
copy of the variables with them (a ``merge_call``, as Keras's own optimizers).

Without ``DistributedOptimizer``, every hvd_lb optimizer built inside the scope also
works on its own: a base rule all-reduces ḡ as Keras's optimizers do; a ``GSNR``
(every ``vr-`` rule) reduces [g, x²] in one all-reduce itself (M = 1).
"""
from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from .. import rules
from ._ops import stat_dtype, work_dtype
from .distributed import DistributedOptimizer as _HorovodOptimizer
from .distributed import _check_same_micro_batches, _filled, _sample, _vr_target

SUM = tf.distribute.ReduceOp.SUM
MORE = "replicas (MirroredStrategy over 2 or more devices, or 2 or more TF_CONFIG workers)"


def replicas() -> int:
    """R: the replicas of the current strategy (1 outside any strategy's scope)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def in_replica_step() -> bool:
    """Inside ``strategy.run`` (Keras ``fit``'s train step) of a real strategy: variables are
    written from the cross-replica context, through ``merge_call``."""
    return tf.distribute.has_strategy() and tf.distribute.get_replica_context() is not None


def merge(fn, *args):
    """``fn(*args)`` once, in the cross-replica context, from inside the replica context;
    tensors in ``args`` arrive as per-replica values."""
    return tf.distribute.get_replica_context().merge_call(lambda _strategy, *a: fn(*a), args=args)


def per_replica(fn, anchor, *args):
    """``fn(*args)`` once per local replica, with that replica's values of ``args``, from the
    cross-replica context of a strategy; inside ``fn`` reading or assigning a mirrored
    variable touches that replica's copy only (``extended.update``'s update context, anchored
    on the variable ``anchor``). Returns ``fn``'s tensors as mirrored values. Without a
    strategy: ``fn(*args)``."""
    if not tf.distribute.has_strategy():
        return fn(*args)
    anchor = anchor.value if isinstance(anchor, keras.Variable) else anchor
    return tf.distribute.get_strategy().extended.update(anchor, lambda _v, *a: fn(*a), args=args, group=True)


@contextlib.contextmanager
def _merge_calls_from_cross_replica():
    """Keras's TF optimizers reach the cross-replica context through ``maybe_merge_call``,
    which under MirroredStrategy asks the replica context for a ``merge_call`` and fails
    when called from the cross-replica context already (as hvd_lb steps the wrapped
    optimizer). There it now calls the function directly, as it does under
    MultiWorkerMirroredStrategy; elsewhere nothing changes."""
    interim = tf.__internal__.distribute.interim
    original = interim.maybe_merge_call

    def maybe_merge_call(fn, strategy, *args, **kwargs):
        if tf.distribute.has_strategy() and tf.distribute.get_replica_context() is None:
            return fn(strategy, *args, **kwargs)
        return original(fn, strategy, *args, **kwargs)

    interim.maybe_merge_call = maybe_merge_call
    try:
        yield
    finally:
        interim.maybe_merge_call = original


def local(value):
    """This process's first replica's value of a per-replica (or plain) value."""
    return tf.distribute.get_strategy().experimental_local_results(value)[0]


class Layout:
    """Where each tensor sits in the flat per-dtype buffers that go out in one all-reduce."""

    def __init__(self, tensors):
        self.shapes = [t.shape for t in tensors]
        self.dtypes = [t.dtype for t in tensors]
        self.order = list(dict.fromkeys(self.dtypes))

    def pack(self, tensors):
        """One flat tensor per dtype (usually one), in ``self.order``."""
        return [tf.concat([tf.reshape(t, [-1]) for t, d in zip(tensors, self.dtypes) if d == dtype], 0)
                for dtype in self.order]

    def unpack(self, flats):
        parts = {d: iter(tf.split(f, [s.num_elements() for s, dd in zip(self.shapes, self.dtypes) if dd == d]))
                 for d, f in zip(self.order, flats)}
        return [tf.reshape(next(parts[d]), s) for s, d in zip(self.shapes, self.dtypes)]


def shares(grads, optimizer, micro_batches, squares, average=False):
    """A replica's shares of ḡ and s for one micro-batch (gradients already dense, no None).

    g = x/(R·M) under Keras's 1/R loss scaling, so Σ over replicas and micro-batches of g is
    ḡ and of x²/k = R·M·g² is s (SPEC §1); ``average``: samples x = R·g (SPEC §7,
    ``average_aggregated_gradients``). Returns (ḡ shares, s shares or None).
    """
    R, M = replicas(), micro_batches
    scale = R if average else R * M
    mean = [g / M if average else g for g in grads]
    if not squares:
        return mean, None
    sq = []
    for g in grads:
        x = scale * _sample(g, optimizer)  # divided by a LossScaleOptimizer's scale
        sq.append(x * x / (R * M))
    return mean, sq


def reduce_and_apply(layout, flats, n, apply, anchor, check_micro_batches=None):
    """From the cross-replica context: ONE all-reduce (SUM) of each replica's packed
    buffers, unpacked on each replica, then ``apply(mean, sq)`` once with mirrored values
    (``mean``: the first ``n`` tensors, ``sq``: the next ``n`` or None)."""
    strategy = tf.distribute.get_strategy()
    if tf.distribute.has_strategy():
        # Back to where each replica's buffer is; with one local replica (MWMS) the buffer is a
        # plain tensor: to where the variables live.
        where = anchor.value if isinstance(anchor, keras.Variable) else anchor
        reduced = strategy.extended.batch_reduce_to(
            SUM, [(f, f if isinstance(f, tf.distribute.DistributedValues) else where) for f in flats])
    else:
        reduced = flats

    def split(*fl):
        out = layout.unpack(list(fl))
        if check_micro_batches is not None:
            out = _check_same_micro_batches(out, check_micro_batches, replicas())
        return out

    out = per_replica(split, anchor, *reduced)
    mean, sq = out[:n], out[n:2 * n] if len(out) >= 2 * n else None
    with _merge_calls_from_cross_replica():
        apply(mean, sq)
    return tf.constant(True)


def replica_apply(optimizer, grads, variables):
    """A ``GSNR`` stepped inside ``strategy.run`` without ``DistributedOptimizer`` (M = 1):
    [g, x²] of the present gradients in one all-reduce, then ``optimizer.apply`` with ḡ and s."""
    rules.check_samples(replicas(), 1, MORE)
    pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
    if not pairs:
        raise ValueError("No gradients provided for any variable.")
    grads, variables = [tf.cast(g, work_dtype(g.dtype)) for g, _ in pairs], [v for _, v in pairs]
    mean, sq = shares(grads, optimizer, 1, True)
    sq = [tf.cast(s, stat_dtype(g.dtype)) for s, g in zip(sq, grads)]
    layout = Layout(mean + sq)

    def apply(mean, sq):
        optimizer.set_grad_sq(sq)
        optimizer.apply(mean, variables)

    return merge(lambda *fl: reduce_and_apply(layout, list(fl), len(mean), apply, variables[0]),
                 *layout.pack(mean + sq))


_KERAS_FIXED = []


def fix_keras_multi_worker():
    """Two failures of Keras 3's ``fit`` under MultiWorkerMirroredStrategy (measured with
    Keras 3.15.1, any optimizer), mended in Keras's TF trainer; idempotent, called by
    ``DistributedOptimizer``: ``_maybe_symbolic_build`` ``strategy.reduce``s a first (x, y)
    batch as one value (fails on the tuple: the local replica's batch is used instead), and
    the train step's metrics are reduced with ``axis=0`` (fails on scalars: reduced whole)."""
    if _KERAS_FIXED:
        return
    from keras.src.backend.tensorflow import trainer as T
    from keras.src import tree

    _KERAS_FIXED.append(True)
    reduce_per_replica, build = T.reduce_per_replica, T.TensorFlowTrainer._maybe_symbolic_build

    def multi_worker(strategy):
        return T._collective_all_reduce_multi_worker(strategy)

    def fixed_reduce(values, strategy, reduction):
        if reduction in ("auto", "mean") and multi_worker(strategy):
            return tree.map_structure(
                lambda v: strategy.reduce("MEAN", v, axis=None) if v.shape.rank == 0
                else reduce_per_replica(v, strategy, reduction), values)
        return reduce_per_replica(values, strategy, reduction)

    def fixed_build(self, iterator=None, data_batch=None):
        if iterator is not None and self._distribute_strategy is not None and multi_worker(self.distribute_strategy):
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(
                    lambda x: x.values[0] if isinstance(x, tf.distribute.DistributedValues) else x, next(it))
                break
            iterator = None
        return build(self, iterator, data_batch)

    T.reduce_per_replica, T.TensorFlowTrainer._maybe_symbolic_build = fixed_reduce, fixed_build


# Its own registered name: "hvd_lb>DistributedOptimizer" is the Horovod path's (saved models
# of either engine load back into the class that saved them).
@keras.saving.register_keras_serializable(package="hvd_lb", name="StrategyDistributedOptimizer")
class DistributedOptimizer(_HorovodOptimizer):
    """``hvd_lb.tf.DistributedOptimizer`` on ``tf.distribute`` instead of Horovod: build it
    inside ``strategy.scope()`` (any Keras 3 optimizer; k = replicas × ``micro_batches``).

    ``micro_batches = M``: M calls to ``apply`` accumulate on each replica (summed, as the
    Horovod path; ``average_aggregated_gradients=True``: averaged), then one all-reduce
    of [ḡ, s, (M, M²)] and one real step of the wrapped optimizer. A GSNR optimizer (every
    ``vr-`` rule) gets s from the same all-reduce; other optimizers reduce each gradient
    once. ``None`` gradients are left alone as Keras does (the same set on every replica:
    Keras traces one step function for all); sparse gradients are reduced dense. k < 2 with
    GSNR is refused, k < 8 warns once (``rules.check_samples``).
    """

    def __init__(self, optimizer, micro_batches=1, average_aggregated_gradients=False, name=None):
        if not isinstance(optimizer, keras.optimizers.Optimizer) or isinstance(optimizer, _HorovodOptimizer):
            raise ValueError(f"invalid optimizer={optimizer!r}: must be a Keras 3 optimizer "
                             "(not already a DistributedOptimizer)")
        micro_batches = rules.check_micro_batches(micro_batches)
        rules.check_bool("average_aggregated_gradients", average_aggregated_gradients)
        if _vr_target(optimizer) is not None:
            if not tf.distribute.has_strategy() and micro_batches < 2:
                raise ValueError("invalid place for hvd_lb.tf.distribute.DistributedOptimizer with GSNR: build it "
                                 "inside strategy.scope(), where k counts the strategy's replicas (outside any "
                                 "strategy k = micro_batches = 1)")
            rules.check_samples(replicas(), micro_batches, MORE)
        fix_keras_multi_worker()
        keras.optimizers.Optimizer.__init__(self, learning_rate=0.0, name=name or f"distributed_{optimizer.name}")
        self.inner_optimizer = optimizer
        self.micro_batches = micro_batches
        self.average_aggregated_gradients = average_aggregated_gradients
        self.square_dtype, self.skip_nonfinite, self.process_set = None, False, None
        self._warned_sparse = False

    def build(self, var_list):
        if self.built:
            return
        var_list = list(var_list)
        if self.micro_batches > 1:
            # Each replica's own sums (ON_READ: written in the replica context), one flat
            # buffer per dtype laid out as what goes out in the all-reduce.
            layout = self._layout(var_list)
            self._acc = []
            for dtype, n in zip(layout.order, self._sizes(layout)):
                with keras.name_scope(self.name, caller=self):
                    acc = keras.Variable(tf.zeros([n], dtype), trainable=False, name=f"accumulator_{dtype.name}",
                                         synchronization="on_read", aggregation="sum")
                self._track_variable(acc)
                self._acc.append(acc)
        self.inner_optimizer.build(var_list)
        keras.optimizers.Optimizer.build(self, var_list)

    def _layout(self, variables):
        grads = [tf.zeros(v.shape, work_dtype(v.dtype)) for v in variables]
        sq = [tf.zeros(v.shape, stat_dtype(work_dtype(v.dtype))) for v in variables] if self.needs_squares else []
        return Layout(grads + sq + [tf.zeros([2], grads[0].dtype)])

    @staticmethod
    def _sizes(layout):
        return [sum(s.num_elements() for s, d in zip(layout.shapes, layout.dtypes) if d == dt) for dt in layout.order]

    def _check_agreement(self, var_list, elastic_sync: bool = False):
        # No small all-gather here: a replica of another shape fails in the all-reduce.
        return

    def apply(self, grads, trainable_variables=None):
        tvs, grads, absent = self._begin(grads, trainable_variables)
        M = self.micro_batches
        dense = [tf.cast(g, work_dtype(g.dtype)) for g in _filled(grads, tvs)]
        mean, sq = shares(dense, self.inner_optimizer, M, self.needs_squares, self.average_aggregated_gradients)
        if sq is not None:
            sq = [tf.cast(s, stat_dtype(g.dtype)) for s, g in zip(sq, dense)]
        count = tf.constant([1, M], dense[0].dtype)  # Σ over M micro-batches: (M, M²)
        layout = Layout(mean + (sq or []) + [count])
        flats = layout.pack(mean + (sq or []) + [count])

        def apply(mean, sq):
            self._apply_reduced(mean, sq, tvs, absent)

        def cross(step, *flats):
            def real():
                return reduce_and_apply(layout, list(flats), len(tvs), apply, tvs[0], M)
            if step is None:
                return real()
            return tf.cond(local(step), real, lambda: tf.constant(False))

        if M == 1:
            self._cross(cross, None, flats)
        else:
            for acc, f in zip(self._acc, flats):
                acc.assign_add(f)
            step = (self._iterations + 1) % M == 0
            self._cross(cross, step, [tf.convert_to_tensor(acc.value) for acc in self._acc])
            tf.cond(step, self._reset, tf.no_op)
        self._iterations.assign_add(1)

    @staticmethod
    def _cross(fn, step, flats):
        return merge(fn, step, *flats) if in_replica_step() else fn(step, *flats)

    def _reset(self):
        for acc in self._acc:
            acc.assign(tf.zeros_like(acc.value))
        return tf.no_op()

    def get_config(self):
        return {"name": self.name, "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
                "micro_batches": self.micro_batches,
                "average_aggregated_gradients": self.average_aggregated_gradients}


__all__ = ["DistributedOptimizer", "replicas", "in_replica_step", "per_replica", "merge", "replica_apply"]
