"""GSNR scaling as a Keras 3 optimizer wrapper: ĝ = p̂ ⊙ ḡ in front of any optimizer.

docs/SPEC.md §2 and §7 (VRGD, Yu et al., §4: "GSNR can be easily applied on any
optimizer"). The maths is ``hvd_lb.formulas.gsnr_ratio``/``gsnr_scale`` on TF tensors.
"""
from __future__ import annotations

import functools
import warnings
import weakref
from fnmatch import fnmatchcase
from typing import Dict, List

import keras
import numpy as np
import tensorflow as tf
from keras.src.utils import tracking

from .. import formulas as F
from .. import grouping, rules
from ._args import check_learning_rate, learning_rate_checks
from ._ops import B, check_float_variables, stat_dtype, state_variables, variable_path


def _get_inner_lr(self):
    return self.inner_optimizer.learning_rate


def _set_inner_lr(self, learning_rate):
    self.inner_optimizer.learning_rate = check_learning_rate(learning_rate, self.name)


# The learning rate of a wrapper (GSNR, DistributedOptimizer) is its wrapped optimizer's.
inner_learning_rate = property(_get_inner_lr, _set_inner_lr)


def set_all_weights(opt, weights):
    """Keras's ``set_weights`` over ``opt.variables``: a wrapper's own and its wrapped optimizer's."""
    if not opt.built:
        raise ValueError("You are calling `set_weights()` on an optimizer that has not yet been built. "
                         "Please call `optimizer.build(trainable_variables)` first.")
    variables = opt.variables
    if len(weights) != len(variables):
        raise ValueError(f"invalid weights: {len(weights)} arrays for the {len(variables)} variables of "
                         f"optimizer '{opt.name}'")
    for variable, weight in zip(variables, weights):
        if tuple(variable.shape) != tuple(weight.shape):
            raise ValueError(f"Optimizer variable {variable.path} has shape {tuple(variable.shape)} not "
                             f"compatible with provided weight shape {tuple(weight.shape)}.")
        variable.assign(weight)


def _densify(g, warned):
    """A sparse gradient (tf.IndexedSlices) as a dense tensor: GSNR's variance is per element.
    Returns (gradient, whether warned)."""
    if isinstance(g, tf.IndexedSlices):
        if not warned:
            warnings.warn("hvd_lb: sparse gradients are densified for GSNR (the element-wise variance "
                          "needs every element)", stacklevel=4)
        return tf.convert_to_tensor(g), True
    return g, warned


class _Scratch:
    """Per-call tensors, kept outside Keras/TF attribute tracking."""

    pending_sq = None
    floor = None  # ε_w of float16 squares (hvd_lb.squares16.variance_floor), with pending_sq
    stats = None


def _key(v):
    """One key for a Keras variable and the tf.Variable behind it."""
    return id(v.value if isinstance(v, keras.Variable) else v)


def _gsnr_one(mean, sq, g, avg, t, gamma, momentum, scale, floor=None):
    """SPEC §2 on one variable → (ĝ in ``g``'s dtype, p_t in ``avg``'s, float32 [μ_r, clipped fraction]).

    ``mean``, ``sq``: ḡ and s (times ``scale`` = the loss scale factor, or None);
    ``g``: ḡ after Keras' clipping; ``avg``: p_{t−1}; ``t``: this step, from 1.
    """
    # float32 or wider, and at least s's: float64 squares (square_dtype="float64") keep
    # |x| > 1.8e19 finite, so the maths runs in float64 too.
    sd = tf.float64 if tf.as_dtype(sq.dtype) == tf.float64 else stat_dtype(avg.dtype)
    shape = tf.shape(avg)
    # Element-wise maths and whole-tensor means only, so on flat views (free reshapes): XLA
    # then fuses a tensor of any rank into the same loops (a 512x256x3x3 float32 kernel:
    # 9.9 -> 6.2 ms; 3x3x256x512: 7.6 -> 6.0 ms).
    mean, sq, g, avg = (tf.reshape(x, [-1]) for x in (mean, sq, g, avg))
    mean, sq = tf.cast(mean, sd), tf.cast(sq, sd)
    if scale is not None:
        mean, sq = mean / scale, sq / (scale * scale)
    r, mu, clipped = F.gsnr_ratio(B, mean, sq, gamma, max(F.variance_floor(sd == tf.float64), floor or 0.0))
    g_hat, p = F.gsnr_scale(B, tf.cast(g, sd), r, tf.cast(avg, sd), momentum, tf.cast(t, sd))
    return (tf.reshape(tf.cast(g_hat, g.dtype), shape), tf.reshape(tf.cast(p, avg.dtype), shape),
            tf.cast(tf.stack([mu, clipped]), tf.float32))


@functools.lru_cache(maxsize=None)
def _gsnr_xla():
    """``_gsnr_one`` as one XLA program per variable (``fused=True``, or None where XLA runs),
    shared by every GSNR.

    About twenty element-wise ops and three means become a few loops. Traced per (dtypes, γ,
    β₃, loss scale); t is a tensor, so later steps reuse the trace. ``reduce_retracing``:
    from the second shape on, one trace of unknown shape serves all (2 traces for 30
    variables of ranks 0 to 4); XLA compiles once per distinct (shape, dtype) and caches the
    program (no recompile limit or fallback met: 30 shapes of 26 sizes tried).
    """
    return tf.function(_gsnr_one, jit_compile=True, reduce_retracing=True)


@functools.lru_cache(maxsize=None)
def xla_available() -> bool:
    """Whether an XLA-compiled ``tf.function`` runs on this TF build and default device.

    Probed once per process with a tiny program, inside ``tf.init_scope`` so that it runs
    eagerly even while a ``tf.function`` (``model.fit``'s step) is being traced. A build or
    device without XLA raises a ``tf.errors.OpError`` (no ``_XlaCompile`` kernel, JIT
    disabled), which means False, silently: the plain path computes the same numbers (to 1e-6
    in float32), and a warning on every such run would ask for nothing but ``fused=False``.
    Unlike torch's auto (CPU only), this one also compiles on GPUs: Keras itself jit-compiles
    ``fit`` there by default.
    """
    with tf.init_scope():
        try:
            tf.function(lambda x: x * x + 1.0, jit_compile=True)(tf.constant([1.0])).numpy()
        except tf.errors.OpError:
            return False
    return True


def resolve_fused(fused) -> bool:
    """``fused`` as given (True, False), or for None (auto) whether XLA works here."""
    return xla_available() if fused is None else fused


_LIVE = weakref.WeakSet()  # every GSNR, so a tape told of no optimizer knows to compute s
_OFFERED = {}  # variable key → s from the last DistributedGradientTape(tape) without optimizer=


@keras.saving.register_keras_serializable(package="hvd_lb")
class GSNR(keras.optimizers.Optimizer):
    """Scale the gradient by its GSNR, then step ``optimizer`` (any Keras 3 optimizer).

    Per tensor, from ḡ (the gradients given to ``apply``) and s = (1/k)Σx² (given
    with ``set_grad_sq`` before ``apply``; ``DistributedOptimizer`` and
    ``DistributedGradientTape`` do it), docs/SPEC.md §2:

        r = clip(r_raw/mean(r_raw), γ, 1),  r_raw = ḡ²/(max(s − ḡ², ε_w·s) + δ)
        p_t = β₃p_{t−1} + (1 − β₃)r,  ĝ = p_t/(1 − β₃^t) ⊙ ḡ

    computed in float32 or wider, then ``optimizer.apply(ĝ)``. ``gamma`` = γ ∈ (0, 1],
    ``momentum`` = β₃ ∈ [0, 1) (0: ĝ = r ⊙ ḡ). p_t is the optimizer variable slot
    ``gsnr_avg``; t counts this wrapper's own steps (``iterations``). ``exclude``:
    fnmatch patterns on variable paths whose ḡ passes through unscaled (default:
    none, SPEC §7). Keras arguments (``clipnorm``, ``loss_scale_factor``, ``use_ema``,
    ...) given here act on ḡ before scaling, r being computed from the unclipped
    statistics; the learning rate and weight decay are the wrapped optimizer's.
    For mixed precision put it inside: ``LossScaleOptimizer(GSNR(opt))``. A sparse gradient
    (``tf.IndexedSlices``) is densified, with one warning (the variance is per element); a
    variable with a None gradient is left untouched, as Keras does. ``variables`` and
    ``set_weights`` (hence checkpoints and ``.keras`` files) cover the wrapped optimizer's state.

    ``fused`` (default None, auto): each variable's r, μ_r, clipped fraction, p_t and ĝ in
    one XLA-compiled ``tf.function`` call (the assignments stay outside) where XLA runs on
    this TF build and device (``xla_available``, probed once per process), else plain TF ops;
    True asks for XLA (its errors raised), False for plain ops. Both equal to 1e-12 in float64
    and 1e-6 in float32; XLA runs eagerly, inside a ``tf.function`` and under ``model.fit``
    (a step that all-reduces with Horovod must not itself be jit-compiled: no XLA kernel).
    XLA compiles once per distinct (shape, dtype) on the first step, with no recompile
    limit met; t enters as a tensor, so later steps reuse the programs (two traces in all).
    Default auto, from one process, one thread, ``apply`` of GSNR(AdamW) in a
    ``tf.function``: 0.80x the time of plain ops on ResNet-18 (124 vs 155 ms) and 0.85x on
    a 7.3M-parameter transformer, the same as ``fused=True`` (0.97–1.02x); under
    ``bench/real_shapes_tf.py --fused`` (2 workers, load average 3–6) 0.67–0.93x for
    ``apply`` and 0.87–1.03x for the whole step (CPU time). The first step costs 0.9–1.6 s
    more on ResNet-18 (17 shapes), nothing measurable on the transformer, 2.0 s on 30
    variables of 26 sizes; on such tiny variables a step is 0.3 ms slower (call overhead).
    """

    def __init__(self, optimizer, gamma=0.1, momentum=0.0, exclude=None, fused=None, name=None, **kwargs):
        if not isinstance(optimizer, keras.optimizers.Optimizer) or isinstance(
                optimizer, (GSNR, keras.optimizers.LossScaleOptimizer)):
            raise ValueError(f"invalid optimizer={optimizer!r}: must be a Keras 3 optimizer, not a GSNR or "
                             "LossScaleOptimizer (use LossScaleOptimizer(GSNR(opt)))")
        for arg in ("learning_rate", "weight_decay"):
            if arg in kwargs:
                raise ValueError(f"GSNR takes no {arg}: set it on the wrapped optimizer")
        if kwargs.get("gradient_accumulation_steps"):
            raise ValueError(
                f"invalid gradient_accumulation_steps={kwargs['gradient_accumulation_steps']!r} for GSNR: "
                "Keras accumulation loses the per-sample squares GSNR needs; use "
                "hvd_lb.tf.DistributedOptimizer(opt, micro_batches=N) instead")
        if optimizer.loss_scale_factor is not None:
            # model.fit scales the loss with the outer optimizer's factor; s must be unscaled too.
            raise ValueError("set loss_scale_factor on GSNR, not on the wrapped optimizer")
        gamma, momentum = rules.check_gsnr(gamma, momentum)
        exclude = grouping.patterns("exclude", exclude)
        rules.check_bool("fused", fused, allow_none=True)
        super().__init__(learning_rate=0.0, name=name, **kwargs)
        self.inner_optimizer = optimizer
        self.gamma, self.momentum, self.fused = gamma, momentum, fused
        self._exclude = exclude
        self._io = _Scratch()
        self._warned_sparse = False
        _LIVE.add(self)

    @staticmethod
    def live() -> List["GSNR"]:
        """The GSNR optimizers alive in this process."""
        return list(_LIVE)

    @staticmethod
    def offer_grad_sq(variables, grad_sq):
        """s for ``variables``, taken by the next GSNR ``apply`` that steps them (a tape
        written as Horovod's examples, ``DistributedGradientTape(tape)``, names no optimizer)."""
        for v, s in zip(variables, grad_sq):
            _OFFERED[_key(v)] = s

    @tracking.no_automatic_dependency_tracking
    def build(self, variables):
        if self.built:
            return
        check_float_variables(variables, f"optimizer '{self.name}'")
        super().build(variables)
        self._scaled = [not any(fnmatchcase(variable_path(v), p) for p in self._exclude) for v in variables]
        self.gsnr_avg = state_variables(self, variables, rules.GSNR_SLOT)
        # Rows: (mean GSNR μ_r, fraction clipped to γ) per variable, read by gsnr_diagnostics.
        self._gsnr_diag = self.add_variable((len(variables), 2), dtype="float32", name="gsnr_diagnostics")
        self.inner_optimizer.build(variables)

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    set_weights = set_all_weights

    # -- the wrapped optimizer's learning rate and weight decay ---------------------------

    learning_rate = inner_learning_rate

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        self.inner_optimizer.exclude_from_weight_decay(var_list=var_list, var_names=var_names)

    def finalize_variable_values(self, var_list):
        super().finalize_variable_values(var_list)
        self.inner_optimizer.finalize_variable_values(var_list)

    # -- the step ---------------------------------------------------------------------------

    def set_grad_sq(self, grad_sq, floor=None):
        """Hand s = (1/k)Σx² (SPEC §1) for the next ``apply``, one tensor per gradient;
        ``floor``: ε_w where s came as float16 (SPEC §2)."""
        self._io.pending_sq = None if grad_sq is None else list(grad_sq)
        self._io.floor = floor

    def apply(self, grads, trainable_variables=None):
        from . import distribute as _strategy  # (imports this module)

        grads = list(grads)
        for i, g in enumerate(grads):
            grads[i], self._warned_sparse = _densify(g, self._warned_sparse)
        if self._io.pending_sq is None and _strategy.in_replica_step():
            # tf.distribute without hvd_lb.tf.distribute.DistributedOptimizer: [g, x²] in one
            # all-reduce here, then this apply again with ḡ and s from the cross-replica context.
            tvs = list(trainable_variables) if trainable_variables is not None else self._trainable_variables
            return _strategy.replica_apply(self, grads, tvs)
        if len(grads):
            sq, self._io.pending_sq = self._io.pending_sq, None
            tvs = list(trainable_variables) if trainable_variables is not None else self._trainable_variables
            if sq is None and all(_key(v) in _OFFERED for v in tvs):
                sq = [_OFFERED.pop(_key(v)) for v in tvs]
            if sq is None:
                raise ValueError(
                    f"optimizer '{self.name}' needs the mean of squared gradient samples (SPEC §1): "
                    "wrap it in hvd_lb.tf.DistributedOptimizer, use "
                    "hvd_lb.tf.DistributedGradientTape(tape), or call "
                    "opt.set_grad_sq(squares) before apply. A local step taken only to create the "
                    "optimizer's state (the allreduce=False first step of Horovod's elastic examples) has "
                    "one gradient sample and no variance: build instead, model.build(input_shape) and "
                    "opt.build(model.trainable_variables) (hvd_lb.tf.elastic's states build the optimizer)")
            if len(sq) != len(grads):
                raise ValueError(f"invalid grad_sq: {len(sq)} tensors for {len(grads)} gradients")
            # Keyed by variable: Keras filters None gradients and clips ḡ before
            # _backend_update_step; r is computed on the unclipped statistics.
            self._io.stats = {self._var_key(v): (g, s) for g, s, v in zip(grads, sq, tvs) if g is not None}
        try:
            return super().apply(grads, trainable_variables)
        finally:
            self._io.stats = None
            self._io.floor = None

    def _backend_update_step(self, grads, variables, learning_rate):
        # The wrapped optimizer's rate: refused here too when it is a Keras one (issue 17).
        with tf.control_dependencies(learning_rate_checks(self.inner_optimizer, learning_rate, self.name)):
            self._update(grads, variables)

    def _update(self, grads, variables):
        from . import distribute as _strategy

        variables = list(variables)
        stats = [self._io.stats[self._var_key(v)] for v in variables]
        # Auto resolved here, in the cross-replica context, not once per replica.
        scale = functools.partial(self._scale, variables, resolve_fused(self.fused))
        # Under tf.distribute: once per replica, each on its own copy of p_t (ḡ and s are mirrored).
        out = _strategy.per_replica(scale, variables[0], list(grads), stats)
        self.inner_optimizer.apply(list(out), variables)

    def _scale(self, variables, fused, grads, stats):
        """ĝ per variable (p_t and the diagnostics written); ``fused``: through ``_gsnr_xla``."""
        one = _gsnr_xla() if fused else _gsnr_one
        t = self.iterations + 1
        out, rows, diag = [], [], []
        for g, v, (mean, sq) in zip(grads, variables, stats):
            i = self._get_variable_index(v)
            if not self._scaled[i]:
                out.append(tf.convert_to_tensor(g))
                continue
            avg = self.gsnr_avg[i]
            g_hat, p, row = one(mean, sq, tf.convert_to_tensor(g), tf.convert_to_tensor(avg), t, self.gamma,
                                self.momentum, self.loss_scale_factor, self._io.floor)
            self.assign(avg, p)
            # A shared XLA trace may have unknown dimensions (reduce_retracing): give the
            # wrapped optimizer ĝ with its variable's static shape.
            out.append(tf.ensure_shape(g_hat, v.shape) if fused else g_hat)
            rows.append(i)
            diag.append(row)
        if rows:
            # (a whole-matrix assign: mirrored variables have no scatter_nd_update)
            self.assign(self._gsnr_diag, tf.tensor_scatter_nd_update(
                tf.convert_to_tensor(self._gsnr_diag), tf.constant(rows)[:, None], tf.stack(diag)))
        return out

    # -- state and diagnostics -------------------------------------------------------------

    def slots(self) -> Dict[str, List]:
        """State slot name → optimizer variables in variable order: ``gsnr_avg`` and the wrapped
        optimizer's slots where it has ``slots()`` (hvd_lb optimizers)."""
        inner = getattr(self.inner_optimizer, "slots", None)
        out = dict(inner()) if inner else {}
        if self.built:
            out[rules.GSNR_SLOT] = list(self.gsnr_avg)
        return out

    def gsnr_diagnostics(self) -> Dict[str, Dict[str, float]]:
        """{variable path: {"mean_gsnr": μ_r, "clipped_fraction": share of r̃ < γ}} of the last step.

        Read from optimizer variables written during the step: no extra all-reduce.
        Empty before the first step; excluded variables are left out.
        """
        if not self.built or int(self.iterations.numpy()) == 0:
            return {}
        rows = np.asarray(self._gsnr_diag.numpy(), np.float64)
        return {variable_path(v): {"mean_gsnr": float(r[0]), "clipped_fraction": float(r[1])}
                for v, r, on in zip(self._trainable_variables, rows, self._scaled) if on}

    def get_config(self):
        config = super().get_config()
        del config["learning_rate"], config["weight_decay"]  # the wrapped optimizer's
        config.update(optimizer=keras.saving.serialize_keras_object(self.inner_optimizer),
                      gamma=self.gamma, momentum=self.momentum, exclude=list(self._exclude), fused=self.fused)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("optimizer"), custom_objects=custom_objects)
        return cls(inner, **config)


__all__ = ["GSNR"]
