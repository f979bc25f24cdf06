"""Keras 3 optimizers for every rule of SPEC §4, driven by ``hvd_lb.rules``.

Each class is a ``keras.optimizers.Optimizer``; the maths is the shared
branch-free ``hvd_lb.formulas`` run on TF tensors, so the same code runs
eagerly, in ``tf.function`` and under XLA (``jit_compile=True``).

Weight decay λ is applied inside the rule (SPEC §3), so Keras' own decoupled
decay (``_apply_weight_decay``) is switched off; ``exclude_from_weight_decay``
is still honoured, as an extra "decay off" filter.
"""
from __future__ import annotations

from typing import Dict, List

import keras
import numpy as np
import tensorflow as tf
from keras.src.utils import tracking

from .. import formulas as F
from .. import grouping, rules
from ._ops import B, _like, stat_dtype

# Keras base-optimizer arguments passed through untouched.
_KERAS_ARGS = ("clipnorm", "clipvalue", "global_clipnorm", "use_ema", "ema_momentum",
               "ema_overwrite_frequency", "loss_scale_factor", "gradient_accumulation_steps")


class _Scratch:
    pending_sq = None
    stats = None


class LargeBatchOptimizer(keras.optimizers.Optimizer):
    """Base of the hvd_lb Keras optimizers; subclasses only set ``rule_name``.

    Args: ``learning_rate`` (float, ``LearningRateSchedule`` or callable;
    default from the rule table), the rule's hyperparameters in Keras spelling
    (``beta_1``, ``beta_2``, ``epsilon``, ``weight_decay``, ``momentum``, ...),
    ``exclude``/``include``: fnmatch patterns on variable paths that switch
    trust-ratio adaptation and weight decay off/on (default: off for
    ``ndim ≤ 1``, see ``hvd_lb.grouping``), and the usual Keras optimizer
    arguments (``clipnorm``, ``use_ema``, ``gradient_accumulation_steps``, ...).

    VR rules need s, the mean of squared gradient samples (SPEC §1): wrap the
    optimizer in ``DistributedOptimizer``, use ``DistributedGradientTape``, or
    call ``set_grad_sq`` before ``apply``.
    """

    rule_name: str = ""

    def __init__(self, learning_rate=None, exclude=None, include=None, name=None, **kwargs):
        rule = rules.get_rule(self.rule_name)
        base_args = {k: kwargs.pop(k) for k in _KERAS_ARGS if k in kwargs}
        valid = [k for k in rules.to_keras(rule.defaults) if k != "learning_rate"]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown argument(s) {', '.join(unknown)} for optimizer '{rule.name}': valid "
                f"hyperparameters are learning_rate, {', '.join(valid)}")
        hp = rules.from_keras(kwargs)
        if learning_rate is None:
            learning_rate = rule.defaults["lr"]
        if callable(learning_rate):
            lr_value = learning_rate
        else:
            hp["lr"] = learning_rate
        hp = rules.validate(rule.name, hp)
        if not callable(learning_rate):
            lr_value = float(hp["lr"])
        if rule.gsnr and base_args.get("gradient_accumulation_steps"):
            raise ValueError(
                f"invalid gradient_accumulation_steps={base_args['gradient_accumulation_steps']!r} "
                f"for optimizer '{rule.name}': Keras accumulation loses the per-sample squares a VR "
                "rule needs; use hvd_lb.tf.DistributedOptimizer(opt, micro_batches=N) instead")
        # Keras keeps a float lr in a floatx (float32) variable; ours is float64 so float64
        # models see the exact lr. A placeholder callable stops Keras creating its own.
        super().__init__(learning_rate=lr_value if callable(lr_value) else (lambda: 0.0),
                         weight_decay=hp["weight_decay"], name=name, **base_args)
        self._rule = rule
        self._hp = hp
        if not callable(lr_value):
            with keras.name_scope(self.name, caller=self):
                lr_var = keras.Variable(lr_value, name="learning_rate", dtype="float64",
                                        trainable=False, aggregation="only_first_replica")
            self._track_variable(lr_var)
            self._learning_rate = lr_var
        self._exclude = grouping.patterns("exclude", exclude)
        self._include = grouping.patterns("include", include)
        # Per-call tensors live outside Keras/TF attribute tracking.
        self._io = _Scratch()

    # -- construction --------------------------------------------------------------------

    @property
    def rule(self) -> rules.Rule:
        return self._rule

    @property
    def hyperparameters(self) -> Dict:
        """The rule's hyperparameters in Keras spelling (``learning_rate`` as constructed)."""
        return rules.to_keras(self._hp)

    @tracking.no_automatic_dependency_tracking
    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        # Per tensor: True = trust ratio and weight decay on (SPEC §3).
        self._adapt = [not grouping.is_excluded(v.path, len(v.shape), self._exclude, self._include)
                       for v in variables]
        for slot in self._rule.slots:
            setattr(self, slot, self.add_optimizer_variables(variables, slot))
        if self._rule.gsnr:
            # Rows: (mean GSNR μ_r, fraction clipped to γ) per variable, read by gsnr_diagnostics.
            self._gsnr_diag = self.add_variable((len(variables), 2), dtype="float32",
                                                name="gsnr_diagnostics")

    def slots(self) -> Dict[str, List]:
        """State slot name (``rules.Rule.slots``) → list of optimizer variables, in variable order."""
        return {s: list(getattr(self, s)) for s in self._rule.slots} if self.built else {}

    def get_config(self):
        config = super().get_config()
        hp = {k: v for k, v in rules.to_keras(self._hp).items() if k != "learning_rate"}
        config.update(hp)
        config["exclude"] = list(self._exclude)
        config["include"] = list(self._include)
        return config

    # -- Keras hooks ---------------------------------------------------------------------

    def _apply_weight_decay(self, variables):
        # λ is part of every rule (SPEC §3); Keras' decoupled decay would apply it twice.
        return

    def set_grad_sq(self, grad_sq):
        """Hand s = (1/k)Σx² (SPEC §1) for the next ``apply``, one tensor per gradient."""
        self._io.pending_sq = None if grad_sq is None else list(grad_sq)

    def apply(self, grads, trainable_variables=None):
        grads = list(grads)
        if self._rule.gsnr and len(grads):
            sq, self._io.pending_sq = self._io.pending_sq, None
            if sq is None:
                raise ValueError(
                    f"optimizer '{self._rule.name}' needs the mean of squared gradient samples "
                    "(SPEC §1): wrap it in hvd_lb.tf.DistributedOptimizer, use "
                    "hvd_lb.tf.DistributedGradientTape(tape, optimizer=opt), or call "
                    "opt.set_grad_sq(squares) before apply")
            if len(sq) != len(grads):
                raise ValueError(f"invalid grad_sq: {len(sq)} tensors for {len(grads)} gradients")
            tvs = list(trainable_variables) if trainable_variables is not None else self._trainable_variables
            # Keyed by variable: Keras filters None gradients and clips ḡ before the update;
            # r is computed on the unclipped statistics.
            self._io.stats = {self._var_key(v): (g, s) for g, s, v in zip(grads, sq, tvs) if g is not None}
        try:
            return super().apply(grads, trainable_variables)
        finally:
            self._io.stats = None

    def _backend_update_step(self, grads, variables, learning_rate):
        variables = list(variables)
        idx = [self._get_variable_index(v) for v in variables]
        adapt = [self._adapt[i] for i in idx]
        decay = [a and self._use_weight_decay(v) for a, v in zip(adapt, variables)]
        weights = [tf.convert_to_tensor(v.value) for v in variables]
        grads = [tf.cast(g, w.dtype) for g, w in zip(grads, weights)]
        if self._rule.gsnr:
            grads = self._scale_by_gsnr(grads, variables, weights, idx)
        new = self._base_update(grads, weights, idx, adapt, decay, learning_rate)
        for v, w in zip(variables, new):
            self.assign(v, w)

    # -- the rules -----------------------------------------------------------------------

    def _step(self, dtype):
        """t of SPEC §3, counting from 1 (``iterations`` counts finished steps)."""
        return tf.cast(self.iterations + 1, dtype)

    def _scale_by_gsnr(self, grads, variables, weights, idx):
        """ĝ = p̂ ⊙ ḡ with r from (ḡ, s) (SPEC §2); records diagnostics per variable."""
        hp = self._hp
        scale = self.loss_scale_factor
        out, diag = [], []
        for g, v, w, i in zip(grads, variables, weights, idx):
            mean, sq = self._io.stats[self._var_key(v)]
            sd = stat_dtype(w.dtype)
            mean, sq = tf.cast(mean, sd), tf.cast(sq, sd)
            if scale is not None:
                mean, sq = mean / scale, sq / (scale * scale)
            r, mu, clipped = F.gsnr_ratio(B, mean, sq, hp["gamma"])
            avg = getattr(self, "gsnr_avg")[i]
            g_hat, p = F.gsnr_scale(B, tf.cast(g, sd), r, tf.cast(avg.value, sd),
                                    hp["gsnr_momentum"], self._step(sd))
            self.assign(avg, p)
            out.append(tf.cast(g_hat, w.dtype))
            diag.append(tf.stack([tf.cast(mu, tf.float32), tf.cast(clipped, tf.float32)]))
        self._gsnr_diag.value.scatter_nd_update(tf.constant(idx)[:, None], tf.stack(diag))
        return out

    def _base_update(self, grads, weights, idx, adapt, decay, learning_rate):
        hp, base = self._hp, self._rule.base
        lam = hp["weight_decay"]
        new = []
        if base == "sngm":
            # ‖d‖ over every tensor of the optimizer, in the widest dtype present.
            nd = tf.float64 if any(w.dtype == tf.float64 for w in weights) else tf.float32
            ds = [g + lam * w if d else g for g, w, d in zip(grads, weights, decay)]
            total = tf.sqrt(tf.add_n([tf.cast(tf.reduce_sum(tf.square(d)), nd) for d in ds]))
            inv = F.global_norm_scale(B, total)
        for n, (g, w, i, a, d) in enumerate(zip(grads, weights, idx, adapt, decay)):
            dt = w.dtype
            lr = _like(learning_rate, w)
            wd = lam if d else 0.0
            if base == "sgd":
                w = w - lr * (g + wd * w)
            elif base == "momentum":
                buf = self.momentum_buffer[i]
                upd = g + wd * w
                b = hp["momentum"] * buf.value + upd
                self.assign(buf, b)
                w = w - lr * (upd + hp["momentum"] * b if hp["nesterov"] else b)
            elif base in ("adam", "lamb"):
                m_var, v_var = self.exp_avg[i], self.exp_avg_sq[i]
                beta1, beta2 = hp["betas"]
                direction, m, v = F.adam_direction(B, g, m_var.value, v_var.value, beta1, beta2,
                                                   hp["eps"], self._step(dt))
                self.assign(m_var, m)
                self.assign(v_var, v)
                u = direction + wd * w
                if base == "lamb" and a:
                    u = F.lamb_trust(B, B.norm(w), B.norm(u), hp["max_trust"]) * u
                w = w - lr * u
            elif base == "lars":
                buf = self.momentum_buffer[i]
                if a:
                    trust = F.lars_trust(B, B.norm(w), B.norm(g), hp["trust_coefficient"], hp["eps"], wd)
                    factor = F.lars_scale(B, trust, lr, hp["trust_clip"])
                else:
                    factor = lr
                upd = factor * (g + wd * w)
                b = hp["momentum"] * buf.value + upd
                self.assign(buf, b)
                w = w - (upd + hp["momentum"] * b if hp["nesterov"] else b)
            elif base == "sngm":
                buf = self.momentum_buffer[i]
                b = hp["momentum"] * buf.value + ds[n] * tf.cast(inv, dt)
                self.assign(buf, b)
                w = w - lr * b
            elif base == "tvlars":
                t = self._step(dt)
                phi = F.tvlars_phi_tensor(B, t, hp["alpha"], hp["decay_coefficient"],
                                          hp["delay_steps"], hp["min_ratio"])
                upd = g + wd * w
                trust = (F.tvlars_trust(B, B.norm(w), B.norm(upd), phi, hp["trust_coefficient"], hp["eps"])
                         if a else phi)
                prev = self.prev_iterate[i]
                # m_1 = w_1: taken lazily at t = 1, so weights broadcast after build still count.
                m_prev = tf.where(t == 1, w, prev.value)
                w, m = F.tvlars_iterate(w, lr * trust * upd, m_prev, hp["momentum"])
                self.assign(prev, m)
            else:  # pragma: no cover - the rule table has no other base
                raise ValueError(f"unknown base rule {base!r}")
            new.append(w)
        return new

    # -- diagnostics ---------------------------------------------------------------------

    def gsnr_diagnostics(self) -> Dict[str, Dict[str, float]]:
        """{variable path: {"mean_gsnr": μ_r, "clipped_fraction": share of r̃ < γ}} of the last step.

        Read from optimizer variables written during the step: no extra all-reduce.
        Empty for non-VR rules and before the first step.
        """
        if not self._rule.gsnr or not self.built or int(self.iterations.numpy()) == 0:
            return {}
        rows = np.asarray(self._gsnr_diag.numpy(), np.float64)
        return {v.path: {"mean_gsnr": float(r[0]), "clipped_fraction": float(r[1])}
                for v, r in zip(self._trainable_variables, rows)}


# -- the named optimizers (SPEC §4) ----------------------------------------------------------

_CLASS_NAMES = {"sgd": "SGD", "momentum": "Momentum", "adam": "Adam", "lars": "LARS",
                "lamb": "LAMB", "sngm": "SNGM", "tvlars": "TVLARS"}
OPTIMIZERS: Dict[str, type] = {}


def _make_class(name: str) -> type:
    rule = rules.get_rule(name)
    cls_name = ("VR" if rule.gsnr else "") + _CLASS_NAMES[rule.base]
    defaults = ", ".join(f"{k}={v!r}" for k, v in rules.to_keras(rule.defaults).items())
    doc = f"``{name}``: {rule.doc}.\n\nDefaults: {defaults}.\n\n" + (LargeBatchOptimizer.__doc__ or "")
    cls = type(cls_name, (LargeBatchOptimizer,), {"rule_name": name, "__doc__": doc,
                                                  "__module__": __name__})
    return keras.saving.register_keras_serializable(package="hvd_lb")(cls)


for _name in rules.NAMES:
    OPTIMIZERS[_name] = _make_class(_name)
    globals()[OPTIMIZERS[_name].__name__] = OPTIMIZERS[_name]


def create(name: str, learning_rate=None, **hparams) -> LargeBatchOptimizer:
    """``create("vr-lamb", learning_rate=1e-3, weight_decay=0.01)`` → the Keras optimizer."""
    return OPTIMIZERS[rules.get_rule(name).name](learning_rate=learning_rate, **hparams)


__all__ = ["LargeBatchOptimizer", "OPTIMIZERS", "create"] + [c.__name__ for c in OPTIMIZERS.values()]
