"""Keras 3 optimizers for every rule of docs/SPEC.md §4, driven by ``hvd_lb.rules``.

A base rule is one TF function in ``UPDATES`` (``@register(name)``); ``register``
also makes its Keras classes from the rule table: ``rule.class_name`` (a
``LargeBatchOptimizer``) and ``"VR" + class_name``, the base class behind the
GSNR transform (``hvd_lb.tf.GSNR``, SPEC §7). The maths is the shared
branch-free ``hvd_lb.formulas`` run on TF tensors, so the same code runs
eagerly, in ``tf.function`` and under XLA (``jit_compile=True``).

Weight decay λ is applied inside the rule (SPEC §3), so Keras' own decoupled
decay (``_apply_weight_decay``) is switched off; ``exclude_from_weight_decay``
is still honoured, as an extra "decay off" filter.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import keras
import tensorflow as tf
from keras.src.utils import tracking

from .. import formulas as F
from .. import grouping, rules
from ._args import check_keras, check_learning_rate, learning_rate_checks
from ._ops import B, _like, check_float_variables, state_variables, variable_path, work_dtype
from .gsnr import GSNR
from . import distribute as _strategy

# Keras base-optimizer arguments passed through untouched.
_KERAS_ARGS = ("clipnorm", "clipvalue", "global_clipnorm", "use_ema", "ema_momentum",
               "ema_overwrite_frequency", "loss_scale_factor", "gradient_accumulation_steps")


class Step(NamedTuple):
    """What a base rule's update sees for one tensor (docs/CONTRIBUTING.md)."""

    hp: Dict[str, Any]  # the rule's validated hyperparameters, PyTorch spelling
    lr: tf.Tensor       # learning rate of this step, in the tensor's dtype
    wd: float           # λ, or 0 where decay is off (SPEC §3)
    adapt: bool         # trust ratio on (SPEC §3)
    t: tf.Tensor        # step t from 1, in the tensor's dtype
    shared: Any         # what the rule's ``prepare`` returned for this step, else None


# Base rule name → (update(c: Step, g, w, state) -> new w, prepare or None); see ``register``.
UPDATES: Dict[str, Tuple[Callable, Optional[Callable]]] = {}
OPTIMIZERS: Dict[str, type] = {}


def _arguments(rule: rules.Rule, learning_rate, kwargs) -> Tuple[Dict, Any, Dict]:
    """Keras-spelled arguments of ``rule`` → (validated hp, learning rate, Keras base arguments)."""
    base_args = {k: kwargs.pop(k) for k in _KERAS_ARGS if k in kwargs}
    valid = [k for k in rules.to_keras(rule.defaults) if k != "learning_rate"]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown argument(s) {', '.join(unknown)} for optimizer '{rule.name}': valid "
            f"hyperparameters are learning_rate, {', '.join(valid)}")
    if learning_rate is None:
        learning_rate = rule.defaults["lr"]
    check_keras(rule, dict(kwargs, **({} if callable(learning_rate) else {"learning_rate": learning_rate})))
    hp = rules.from_keras(kwargs)
    if not callable(learning_rate):
        hp["lr"] = learning_rate
    hp = rules.validate(rule.name, hp)
    return hp, learning_rate if callable(learning_rate) else float(hp["lr"]), base_args


class LargeBatchOptimizer(keras.optimizers.Optimizer):
    """Base of the hvd_lb Keras optimizers of the base rules (SPEC §3); subclasses set ``rule_name``.

    Args: ``learning_rate`` (float, ``LearningRateSchedule`` or callable;
    default from the rule table), the rule's hyperparameters in Keras spelling
    (``beta_1``, ``beta_2``, ``epsilon``, ``weight_decay``, ``momentum``, ...),
    ``exclude``/``include``: fnmatch patterns on variable paths that switch
    trust-ratio adaptation and weight decay off/on (default: off for
    ``ndim ≤ 1``, see ``hvd_lb.grouping``), and the usual Keras optimizer
    arguments (``clipnorm``, ``use_ema``, ``gradient_accumulation_steps``, ...).
    The update itself is ``UPDATES[rule.base]``. Sparse gradients step as their dense value
    (as Keras's AdamW and Lamb); bfloat16/float16 variables step in float32, with float32
    state, and are written back in their dtype; a non-float variable is refused at build; a
    negative or non-finite learning rate from a callable, schedule or tensor is refused at the
    step (ValueError; a schedule's later values in a graph: a TF assertion).

    ``fused=True`` runs the update of each variable as one XLA-compiled ``tf.function``
    call returning the new weight and slots, for every rule alike; ``prepare`` (SNGM's
    global norm) and the assignments stay outside. Equal to ``fused=False`` to 1e-12 in
    float64 and 1e-6 in float32; runs eagerly, inside a ``tf.function`` and under
    ``model.fit`` (a step that all-reduces with Horovod must not itself be jit-compiled).
    XLA compiles once per distinct (shape, dtype) of the variables, on the first step; lr
    and t enter as tensors, so later steps reuse the programs. Default False, from
    ``bench/real_shapes_tf.py --fused`` (2-core CPU, float32, 2 workers, ResNet-18 and a
    7.3M-parameter transformer, four runs): LAMB's ``apply`` alone took 0.62–0.73x the
    time, but the whole training step 0.76–1.08x (wall; CPU time 0.79–1.05x), a gain
    within this shared machine's noise, for 0.7–2.3 s more on the first step (tracing and
    compiles, timed in one process without Horovod). It also stays off because XLA is not
    on every TF build or device (GPUs were not measured) and a rule added with
    ``register`` would otherwise have to be XLA-compilable. Worth trying where the
    optimizer is a large share of the step.
    """

    rule_name: str = ""

    def __init__(self, learning_rate=None, exclude=None, include=None, fused=False, name=None, **kwargs):
        rule = rules.get_rule(self.rule_name)
        rules.check_bool("fused", fused)
        hp, lr_value, base_args = _arguments(rule, learning_rate, kwargs)
        # Keras keeps a float lr in a floatx (float32) variable; ours is float64 so float64
        # models see the exact lr. A placeholder callable stops Keras creating its own.
        super().__init__(learning_rate=lr_value if callable(lr_value) else (lambda: 0.0),
                         weight_decay=hp["weight_decay"], name=name, **base_args)
        self._rule = rule
        self._hp = hp
        self.fused = fused
        if not callable(lr_value):
            with keras.name_scope(self.name, caller=self):
                lr_var = keras.Variable(lr_value, name="learning_rate", dtype="float64",
                                        trainable=False, aggregation="only_first_replica")
            self._track_variable(lr_var)
            self._learning_rate = lr_var
        self._exclude = grouping.patterns("exclude", exclude)
        self._include = grouping.patterns("include", include)

    @property
    def rule(self) -> rules.Rule:
        return self._rule

    @property
    def learning_rate(self):
        return self._get_current_learning_rate()

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        # A NaN or negative rate set later is caught here, on the Python value (issue 12).
        keras.optimizers.Optimizer.learning_rate.fset(self, check_learning_rate(learning_rate, self._rule.name))

    @property
    def hyperparameters(self) -> Dict:
        """The rule's hyperparameters in Keras spelling (``learning_rate`` as constructed)."""
        return rules.to_keras(self._hp)

    @tracking.no_automatic_dependency_tracking
    def build(self, variables):
        if self.built:
            return
        check_float_variables(variables, f"optimizer '{self.name}'")
        super().build(variables)
        # Per tensor: True = trust ratio and weight decay on (SPEC §3).
        self._adapt = [not grouping.is_excluded(variable_path(v), len(v.shape), self._exclude, self._include)
                       for v in variables]
        for slot in self._rule.slots:
            setattr(self, slot, state_variables(self, variables, slot))

    def slots(self) -> Dict[str, List]:
        """State slot name (``rules.Rule.slots``) → list of optimizer variables, in variable order."""
        return {s: list(getattr(self, s)) for s in self._rule.slots} if self.built else {}

    def get_config(self):
        config = super().get_config()
        hp = {k: v for k, v in rules.to_keras(self._hp).items() if k != "learning_rate"}
        config.update(hp)
        config["exclude"] = list(self._exclude)
        config["include"] = list(self._include)
        config["fused"] = self.fused
        return config

    def _apply_weight_decay(self, variables):
        # λ is part of every rule (SPEC §3); Keras' decoupled decay would apply it twice.
        return

    def _backend_update_step(self, grads, variables, learning_rate):
        variables = list(variables)
        if _strategy.in_replica_step():
            # Inside strategy.run: ḡ as Keras's optimizers do (one SUM all-reduce of the
            # 1/R-scaled gradients), then each replica's copy steps from the cross-replica context.
            grads = [g for g, _ in self._all_reduce_sum_gradients(list(zip(grads, variables)))]
            return _strategy.merge(lambda g, lr: self._backend_update_step(g, variables, lr), grads, learning_rate)
        with tf.control_dependencies(learning_rate_checks(self, _strategy.local(learning_rate), self.name)):
            _strategy.per_replica(functools.partial(self._update, variables=variables), variables[0],
                                  list(grads), learning_rate)

    def _update(self, grads, learning_rate, variables):
        update, prepare = UPDATES[self._rule.base]
        one = _update_xla(update) if self.fused else functools.partial(_update_one, update)
        variables = list(variables)
        idx = [self._get_variable_index(v) for v in variables]
        # 16-bit variables step in float32 (their state is float32); a sparse gradient
        # (tf.IndexedSlices) steps as its dense value, as Keras's AdamW and Lamb do.
        weights = [tf.cast(tf.convert_to_tensor(v), work_dtype(v.dtype)) for v in variables]
        grads = [tf.cast(tf.convert_to_tensor(g), w.dtype) for g, w in zip(grads, weights)]
        wds = [self._hp["weight_decay"] if self._adapt[i] and self._use_weight_decay(v) else 0.0
               for i, v in zip(idx, variables)]
        # Computed from every tensor before any is updated (SNGM's global norm).
        shared = prepare(self._hp, grads, weights, wds) if prepare else None
        for g, w, v, i, wd in zip(grads, weights, variables, idx, wds):
            slots = {s: getattr(self, s)[i] for s in self._rule.slots}
            c = Step(self._hp, _like(learning_rate, w), wd, self._adapt[i],
                     tf.cast(self.iterations + 1, w.dtype), shared)
            # Read values, not the tf.Variables behind ``.value``: a variable passed into the
            # XLA function under reduce_retracing keeps its static shape, clashing with the next.
            new_w, changed = one(c, g, w, {s: tf.convert_to_tensor(var) for s, var in slots.items()})
            self.assign(v, new_w)
            for s, value in changed.items():
                self.assign(slots[s], value)


def _update_one(update, c, g, w, state):
    """``update`` on one variable → (new w, {slot: new value} for the slots it wrote)."""
    new = dict(state)
    w = update(c, g, w, new)
    return w, {s: x for s, x in new.items() if x is not state[s]}


@functools.lru_cache(maxsize=None)
def _update_xla(update):
    """``_update_one`` of ``update`` as one XLA program per variable (see ``LargeBatchOptimizer``).

    Traced per (rank, dtype, Step's Python values: hyperparameters, λ, adapt); the step's
    lr, t and ``shared`` are tensors, so later steps reuse the trace. ``reduce_retracing``:
    from the second shape of a rank on, one trace with unknown dimensions serves all; XLA
    compiles once per distinct (shape, dtype) and caches the program.
    """
    return tf.function(functools.partial(_update_one, update), jit_compile=True, reduce_retracing=True)


class _NamedGSNR(GSNR):
    """A ``vr-`` rule (SPEC §4): its base rule's optimizer behind ``GSNR`` (SPEC §2, §7).

    Takes the base rule's arguments (``exclude``/``include``/``fused`` as there) plus
    ``gamma`` = γ and ``gsnr_momentum`` = β₃ (defaults from the rule table) and
    ``gsnr_fused``, the transform's ``fused`` (default None: True with ``fused=True``, so
    that it fuses both, else ``GSNR``'s auto); Keras arguments (``clipnorm``, ...) act
    on ḡ. s, the mean of squared gradient samples (SPEC §1), comes from
    ``DistributedOptimizer``, ``DistributedGradientTape`` or ``set_grad_sq`` before ``apply``.
    """

    rule_name: str = ""

    def __init__(self, learning_rate=None, exclude=None, include=None, fused=False, gsnr_fused=None,
                 name=None, **kwargs):
        rule = rules.get_rule(self.rule_name)
        rules.check_bool("fused", fused)
        gsnr_fused = rules.check_bool("gsnr_fused", gsnr_fused, allow_none=True)
        if gsnr_fused is None and fused:
            gsnr_fused = True
        hp, lr_value, base_args = _arguments(rule, learning_rate, kwargs)
        base = rules.get_rule(rule.base)
        inner = OPTIMIZERS[base.name](lr_value, exclude=exclude, include=include, fused=fused,
                                      **rules.to_keras({k: hp[k] for k in base.defaults if k != "lr"}))
        super().__init__(inner, gamma=hp["gamma"], momentum=hp["gsnr_momentum"], fused=gsnr_fused,
                         name=name, **base_args)
        self._rule = rule
        self._hp = hp

    rule = LargeBatchOptimizer.rule
    hyperparameters = LargeBatchOptimizer.hyperparameters

    def get_config(self):
        # Flat, as the base rule's classes: the base's arguments, γ, β₃, and this wrapper's Keras ones.
        config = self.inner_optimizer.get_config()
        outer = keras.optimizers.Optimizer.get_config(self)
        config.update({k: outer[k] for k in ("name",) + _KERAS_ARGS})
        config.update(gamma=self._hp["gamma"], gsnr_momentum=self._hp["gsnr_momentum"], gsnr_fused=self.fused)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return keras.optimizers.Optimizer.from_config.__func__(cls, config, custom_objects)


# -- one function per base rule (SPEC §3) ------------------------------------------------------

def _make_class(name: str) -> type:
    rule = rules.get_rule(name)
    base = _NamedGSNR if rule.gsnr else LargeBatchOptimizer
    defaults = ", ".join(f"{k}={v!r}" for k, v in rules.to_keras(rule.defaults).items())
    doc = f"``{name}``: {rule.doc}.\n\nDefaults: {defaults}.\n\n" + (base.__doc__ or "")
    cls = type(rule.class_name, (base,), {"rule_name": name, "__doc__": doc, "__module__": __name__})
    return keras.saving.register_keras_serializable(package="hvd_lb")(cls)


def register(name: str, prepare: Optional[Callable] = None):
    """Decorator: ``update(c, g, w, state) -> new w`` is base rule ``name`` on TF.

    ``c`` is a ``Step``; ``state`` maps the rule's slots (``rules.Rule.slots``) to their
    current tensors, and ``update`` puts the new ones in it (``state[slot] = value``).
    ``prepare(hp, grads, weights, wds)``, when given, runs once per step over
    every tensor before any update and its result is ``c.shared``. Registering creates
    the Keras classes ``rule.class_name`` and ``"VR" + rule.class_name`` in ``OPTIMIZERS``
    (and in this module); ``rules.register(name, ...)`` must come first.
    """

    def deco(update):
        rule = rules.get_rule(name)
        if rule.gsnr:
            raise ValueError(f"invalid rule {name!r}: register the base rule; its vr- twin follows")
        UPDATES[rule.name] = (update, prepare)
        for n in (rule.name, "vr-" + rule.name):
            cls = OPTIMIZERS[n] = _make_class(n)
            globals()[cls.__name__] = cls
        return update

    return deco


@register("sgd")
def _sgd(c, g, w, state):
    return w - c.lr * (g + c.wd * w)


@register("momentum")
def _momentum(c, g, w, state):
    mu = c.hp["momentum"]
    upd = g + c.wd * w
    b = state["momentum_buffer"] = mu * state["momentum_buffer"] + upd
    return w - c.lr * (upd + mu * b if c.hp["nesterov"] else b)


def _adam_direction(c, g, w, state):
    """u = m̂/(√v̂ + ε) + λw, updating the moments (Adam and LAMB)."""
    beta1, beta2 = c.hp["betas"]
    direction, state["exp_avg"], state["exp_avg_sq"] = F.adam_direction(
        B, g, state["exp_avg"], state["exp_avg_sq"], beta1, beta2, c.hp["eps"], c.t)
    return direction + c.wd * w


@register("adam")
def _adam(c, g, w, state):
    return w - c.lr * _adam_direction(c, g, w, state)


@register("lamb")
def _lamb(c, g, w, state):
    u = _adam_direction(c, g, w, state)
    if c.adapt:
        u = F.lamb_trust(B, B.norm(w), B.norm(u), c.hp["max_trust"]) * u
    return w - c.lr * u


@register("lars")
def _lars(c, g, w, state):
    hp = c.hp
    if c.adapt:
        trust = F.lars_trust(B, B.norm(w), B.norm(g), hp["trust_coefficient"], hp["eps"], c.wd)
        factor = F.lars_scale(B, trust, c.lr, hp["trust_clip"])
    else:
        factor = c.lr
    upd = factor * (g + c.wd * w)
    b = state["momentum_buffer"] = hp["momentum"] * state["momentum_buffer"] + upd
    return w - (upd + hp["momentum"] * b if hp["nesterov"] else b)


def _sngm_inverse_norm(hp, grads, weights, wds):
    """1/‖d‖_global, d = g + λw over every tensor of the step, in the widest dtype present."""
    nd = tf.float64 if any(w.dtype == tf.float64 for w in weights) else tf.float32
    total = tf.sqrt(tf.add_n([tf.cast(tf.reduce_sum(tf.square(g + wd * w)), nd)
                              for g, w, wd in zip(grads, weights, wds)]))
    return F.global_norm_scale(B, total)


@register("sngm", prepare=_sngm_inverse_norm)
def _sngm(c, g, w, state):
    b = state["momentum_buffer"] = (c.hp["momentum"] * state["momentum_buffer"]
                                    + (g + c.wd * w) * tf.cast(c.shared, w.dtype))
    return w - c.lr * b


@register("tvlars")
def _tvlars(c, g, w, state):
    hp = c.hp
    phi = F.tvlars_phi_tensor(B, c.t, hp["alpha"], hp["decay_coefficient"], hp["delay_steps"],
                              hp["min_ratio"])
    upd = g + c.wd * w
    trust = (F.tvlars_trust(B, B.norm(w), B.norm(upd), phi, hp["trust_coefficient"], hp["eps"])
             if c.adapt else phi)
    # m_1 = w_1: taken lazily at t = 1, so weights broadcast after build still count.
    m_prev = tf.where(c.t == 1, w, state["prev_iterate"])
    w, state["prev_iterate"] = F.tvlars_iterate(w, c.lr * trust * upd, m_prev, hp["momentum"])
    return w


def create(name: str, /, learning_rate=None, **hparams) -> keras.optimizers.Optimizer:
    """``create("vr-lamb", learning_rate=1e-3, weight_decay=0.01)`` → the Keras optimizer
    (``name=`` in ``hparams`` is the optimizer's Keras name)."""
    return OPTIMIZERS[rules.get_rule(name).name](learning_rate=learning_rate, **hparams)


__all__ = ["LargeBatchOptimizer", "GSNR", "Step", "UPDATES", "OPTIMIZERS", "register", "create"] + \
    [c.__name__ for c in OPTIMIZERS.values()]
