"""Float64 NumPy reference of every update rule in SPEC §1–3: the test oracle.

Written as small optax-like transforms.  A transform has
``init(params) -> state`` and ``update(updates, state, params, ctx) -> (updates, state)``;
``chain`` composes them and every optimizer of SPEC §4 is one short chain, a
VR optimizer being ``chain(scale_by_gsnr(...), *base)``.  The chain's final
output ``Δ`` is what the step subtracts: ``w ← w − Δ``.

State is a flat dict of named slots (the names of ``hvd_lb.rules.Rule.slots``),
each a list with one array per tensor, so backends can be compared slot by slot.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from . import rules

Arrays = List[np.ndarray]


@dataclass
class StepContext:
    """What one step knows besides gradients: lr, step t (from 1), per-tensor flags, s."""

    lr: float
    step: int
    adapt: Sequence[bool]
    decay: Sequence[bool]
    sq: Optional[Arrays] = None  # s = mean of squared samples (SPEC §1), VR rules only
    floor: float = 2.0 ** -50    # ε_w (SPEC §2): float64's, or float16 squares' (float16_floor)


class Transform(NamedTuple):
    init: Callable[[Arrays], Dict[str, Arrays]]
    update: Callable[[Arrays, Dict[str, Arrays], Arrays, StepContext], Tuple[Arrays, Dict[str, Arrays]]]


def _no_state(_params):
    return {}


def _zeros_like(params):
    return [np.zeros_like(p) for p in params]


def _norm(x) -> float:
    return float(np.sqrt(np.sum(np.square(x))))


def chain(*transforms: Transform) -> Transform:
    def init(params):
        state = {}
        for t in transforms:
            slots = t.init(params)
            assert not set(slots) & set(state), "slot names must be unique in a chain"
            state.update(slots)
        return state

    def update(updates, state, params, ctx):
        new_state = dict(state)
        for t in transforms:
            updates, new_state = t.update(updates, new_state, params, ctx)
        return updates, new_state

    return Transform(init, update)


# --- SPEC §1: gradient statistics -------------------------------------------------

def gradient_stats(samples: Sequence[Arrays]) -> Tuple[Arrays, Arrays]:
    """ḡ = (1/k) Σ x and s = (1/k) Σ x² over k samples, each a list of per-tensor arrays.

    A sample is x_{w,m} = M·g_{w,m} (SPEC §1); pass them already scaled.
    """
    k = len(samples)
    if k < 2:
        rules.check_samples(k if k >= 1 else 1, 1)
    n = len(samples[0])
    mean = [np.mean([np.asarray(s[i], np.float64) for s in samples], axis=0) for i in range(n)]
    sq = [np.mean([np.square(np.asarray(s[i], np.float64)) for s in samples], axis=0) for i in range(n)]
    return mean, sq


def micro_batch_samples(worker_micro_grads: Sequence[Sequence[Arrays]]) -> List[Arrays]:
    """Per-(worker, micro-batch) gradients g_{w,m} → samples x_{w,m} = M·g_{w,m}."""
    out = []
    for micro in worker_micro_grads:
        m = len(micro)
        out.extend([[m * np.asarray(t, np.float64) for t in g] for g in micro])
    return out


# --- SPEC §2: GSNR scaling ----------------------------------------------------------

# ε_w of SPEC §2 in float64: variances below 2⁻⁵⁰·s are rounding noise.
VARIANCE_FLOOR = 2.0 ** -50


def float16_floor(workers: int) -> float:
    """ε_w of float16 squares (SPEC §2): 2⁻⁸·2^⌈log₂(W)/2⌉ (8 float16 units times ~√W additions)."""
    k = 0
    while 4 ** k < workers:  # smallest k with 2^k ≥ √W
        k += 1
    return 2.0 ** (k - 8)


def float16_squares(half: np.ndarray, exponent: int, divisor: float, mean: np.ndarray,
                    workers: int) -> np.ndarray:
    """s from reduced float16 squares (SPEC §1): max(half·2^−e/divisor, ḡ² + ε_w·2⁻¹⁴·2^−e/divisor),
    in float64 (2⁻¹⁴: float16's smallest normal).

    ``divisor``: 1 where the reduction averaged (Horovod), W where it summed (DDP).
    """
    unit = 2.0 ** -exponent / divisor
    s = np.asarray(half, np.float64) * unit
    return np.maximum(s, np.square(np.asarray(mean, np.float64)) + float16_floor(workers) * 2.0 ** -14 * unit)


def gsnr_ratio(mean: np.ndarray, sq: np.ndarray, gamma: float,
               floor: float = VARIANCE_FLOOR) -> Tuple[np.ndarray, float, float]:
    """Clipped normalised GSNR r for one tensor (VRGD §4), with diagnostics.

    var = max(s − ḡ², ε_w·s), δ = 1e-12·mean(var) + 1e-30, r_raw = ḡ²/(var + δ),
    r = clip(r_raw / mean(r_raw), γ, 1)  (r = 1 when mean(r_raw) = 0).
    Returns (r, mean(r_raw), fraction of elements clipped up to γ).
    """
    g2 = np.square(mean)
    var = np.maximum(sq - g2, floor * sq)
    delta = 1e-12 * np.mean(var) + 1e-30
    r_raw = g2 / (var + delta)
    mu = float(np.mean(r_raw))
    if mu == 0.0:
        return np.ones_like(mean), 0.0, 0.0
    r_tilde = r_raw / mu
    return np.clip(r_tilde, gamma, 1.0), mu, float(np.mean(r_tilde < gamma))


def scale_by_gsnr(gamma: float, gsnr_momentum: float, apply: Optional[Sequence[bool]] = None) -> Transform:
    """ĝ = p̂ ⊙ ḡ with p_t = β₃p + (1−β₃)r, p̂ = p/(1−β₃^t); β₃ = 0 gives ĝ = r ⊙ ḡ.

    ``apply``: per-tensor flags (default all); a tensor with False passes ḡ through
    and keeps p_t = 0 (the transform's ``exclude``).
    """

    def init(params):
        return {"gsnr_avg": _zeros_like(params)}

    def update(updates, state, params, ctx):
        if ctx.sq is None:
            raise ValueError(
                "VR optimizers need the mean of squared gradient samples (SPEC §1): "
                "wrap the optimizer in hvd_lb's DistributedOptimizer"
            )
        b3 = gsnr_momentum
        out, p_new = [], []
        flags = [True] * len(updates) if apply is None else apply
        for g, s, p, on in zip(updates, ctx.sq, state["gsnr_avg"], flags):
            if not on:
                p_new.append(p)
                out.append(g)
                continue
            r, _, _ = gsnr_ratio(g, s, gamma, ctx.floor)
            p = b3 * p + (1.0 - b3) * r
            p_new.append(p)
            out.append(p / (1.0 - b3 ** ctx.step) * g)
        return out, {**state, "gsnr_avg": p_new}

    return Transform(init, update)


# --- SPEC §3: building blocks of the base rules -------------------------------------

def add_decayed_weights(weight_decay: float) -> Transform:
    """u + λw on tensors whose decay flag is set."""

    def update(updates, state, params, ctx):
        out = [u + weight_decay * w if d else u for u, w, d in zip(updates, params, ctx.decay)]
        return out, state

    return Transform(_no_state, update)


def trace(momentum: float, nesterov: bool = False) -> Transform:
    """b ← μb + u; emits b, or u + μb with Nesterov (PyTorch SGD convention)."""

    def init(params):
        return {"momentum_buffer": _zeros_like(params)}

    def update(updates, state, params, ctx):
        bufs = [momentum * b + u for b, u in zip(state["momentum_buffer"], updates)]
        out = [u + momentum * b for u, b in zip(updates, bufs)] if nesterov else bufs
        return out, {**state, "momentum_buffer": bufs}

    return Transform(init, update)


def scale_by_learning_rate() -> Transform:
    def update(updates, state, params, ctx):
        return [ctx.lr * u for u in updates], state

    return Transform(_no_state, update)


def scale_by_adam(betas: Tuple[float, float], eps: float) -> Transform:
    """m̂/(√v̂ + ε) with bias-corrected first and second moments."""
    b1, b2 = betas

    def init(params):
        return {"exp_avg": _zeros_like(params), "exp_avg_sq": _zeros_like(params)}

    def update(updates, state, params, ctx):
        ms, vs, out = [], [], []
        c1, c2 = 1.0 - b1 ** ctx.step, 1.0 - b2 ** ctx.step
        for g, m, v in zip(updates, state["exp_avg"], state["exp_avg_sq"]):
            m = b1 * m + (1.0 - b1) * g
            v = b2 * v + (1.0 - b2) * g * g
            ms.append(m)
            vs.append(v)
            out.append((m / c1) / (np.sqrt(v / c2) + eps))
        return out, {**state, "exp_avg": ms, "exp_avg_sq": vs}

    return Transform(init, update)


def scale_by_lamb_trust(max_trust: Optional[float]) -> Transform:
    """trust·u with trust = ‖w‖/‖u‖ (clamped above by max_trust) on adapted tensors."""

    def update(updates, state, params, ctx):
        out = []
        for u, w, a in zip(updates, params, ctx.adapt):
            wn, un = _norm(w), _norm(u)
            trust = wn / un if (a and wn > 0 and un > 0) else 1.0
            if max_trust is not None and a:
                trust = min(trust, max_trust)
            out.append(trust * u)
        return out, state

    return Transform(_no_state, update)


def _lars_trust(g, w, eta, eps, wd) -> float:
    wn, gn = _norm(w), _norm(g)
    if wn > 0 and gn > 0:
        return eta * wn / (gn + wd * wn + eps)
    return 1.0


def scale_by_lars_trust(trust_coefficient: float, eps: float, weight_decay: float,
                        trust_clip: bool) -> Transform:
    """lr·trust·(g + λw), trust = η‖w‖/(‖g‖ + λ‖w‖ + ε) (You et al. 2017).

    With ``trust_clip`` (LARC clip mode) adapted tensors use min(trust, lr) in
    place of lr·trust; tensors that are not adapted always use lr.
    """

    def update(updates, state, params, ctx):
        out = []
        for g, w, a, d in zip(updates, params, ctx.adapt, ctx.decay):
            wd = weight_decay if d else 0.0
            upd = g + wd * w
            if a:
                trust = _lars_trust(g, w, trust_coefficient, eps, wd)
                scale = min(trust, ctx.lr) if trust_clip else ctx.lr * trust
            else:
                scale = ctx.lr
            out.append(scale * upd)
        return out, state

    return Transform(_no_state, update)


def normalize_by_global_norm() -> Transform:
    """d/‖d‖_global over every tensor (SNGM); zero when the global norm is zero."""

    def update(updates, state, params, ctx):
        total = math.sqrt(sum(float(np.sum(np.square(u))) for u in updates))
        if total == 0.0:
            return [np.zeros_like(u) for u in updates], state
        return [u / total for u in updates], state

    return Transform(_no_state, update)


def tvlars_phi(step: int, alpha: float, decay_coefficient: float, delay_steps: float,
               min_ratio: float) -> float:
    """φ_t = 1/(α + exp(λ_d·(t − d_e))) + γ_min (TVLARS eq. 4)."""
    psi = decay_coefficient * (step - delay_steps)
    # exp overflows past ~709; φ's first term is then 0 to double precision.
    return (0.0 if psi > 700 else 1.0 / (alpha + math.exp(psi))) + min_ratio


def scale_by_tvlars_trust(trust_coefficient, eps, weight_decay, alpha, decay_coefficient,
                          delay_steps, min_ratio) -> Transform:
    """lr·trust_t·(g + λw), trust_t = φ_t·η‖w‖/(‖g + λw‖ + ε), or φ_t when not adapted."""

    def update(updates, state, params, ctx):
        phi = tvlars_phi(ctx.step, alpha, decay_coefficient, delay_steps, min_ratio)
        out = []
        for g, w, a, d in zip(updates, params, ctx.adapt, ctx.decay):
            upd = g + weight_decay * w if d else g
            wn, dn = _norm(w), _norm(upd)
            trust = phi * trust_coefficient * wn / (dn + eps) if (a and wn > 0 and dn > 0) else phi
            out.append(ctx.lr * trust * upd)
        return out, state

    return Transform(_no_state, update)


def tvlars_momentum(momentum: float) -> Transform:
    """m_{t+1} = w_t − u, w_{t+1} = m_{t+1} + μ(m_{t+1} − m_t), m_1 = w_1; emits w_t − w_{t+1}."""

    def init(params):
        return {"prev_iterate": [np.array(p, np.float64, copy=True) for p in params]}

    def update(updates, state, params, ctx):
        ms, out = [], []
        for u, w, m_prev in zip(updates, params, state["prev_iterate"]):
            m = w - u
            ms.append(m)
            out.append(w - (m + momentum * (m - m_prev)))
        return out, {**state, "prev_iterate": ms}

    return Transform(init, update)


# --- SPEC §3–4: named optimizers ----------------------------------------------------

# Base rule name → builder(hp) of its chain (hyperparameters already validated).
BASE_TRANSFORMS: Dict[str, Callable[[Dict[str, Any]], Transform]] = {}


def register(name: str):
    """Decorator: the reference chain of base rule ``name`` (see docs/CONTRIBUTING.md)."""

    def deco(builder):
        BASE_TRANSFORMS[name] = builder
        return builder

    return deco


register("sgd")(lambda hp: chain(add_decayed_weights(hp["weight_decay"]), scale_by_learning_rate()))
register("momentum")(lambda hp: chain(add_decayed_weights(hp["weight_decay"]),
                                      trace(hp["momentum"], hp["nesterov"]), scale_by_learning_rate()))
register("adam")(lambda hp: chain(scale_by_adam(hp["betas"], hp["eps"]),
                                  add_decayed_weights(hp["weight_decay"]), scale_by_learning_rate()))
register("lamb")(lambda hp: chain(scale_by_adam(hp["betas"], hp["eps"]),
                                  add_decayed_weights(hp["weight_decay"]),
                                  scale_by_lamb_trust(hp["max_trust"]), scale_by_learning_rate()))
register("lars")(lambda hp: chain(scale_by_lars_trust(hp["trust_coefficient"], hp["eps"],
                                                      hp["weight_decay"], hp["trust_clip"]),
                                  trace(hp["momentum"], hp["nesterov"])))
register("sngm")(lambda hp: chain(add_decayed_weights(hp["weight_decay"]), normalize_by_global_norm(),
                                  trace(hp["momentum"]), scale_by_learning_rate()))
register("tvlars")(lambda hp: chain(
    scale_by_tvlars_trust(hp["trust_coefficient"], hp["eps"], hp["weight_decay"], hp["alpha"],
                          hp["decay_coefficient"], hp["delay_steps"], hp["min_ratio"]),
    tvlars_momentum(hp["momentum"])))


def base_transform(base: str, hp: Dict[str, Any]) -> Transform:
    """The chain for one base rule of SPEC §3 (hyperparameters already validated)."""
    if base not in BASE_TRANSFORMS:
        raise ValueError(f"unknown base rule {base!r}")
    return BASE_TRANSFORMS[base](hp)


def make(name: str, **hparams) -> Tuple[rules.Rule, Dict[str, Any], Transform]:
    """Validate ``hparams`` for optimizer ``name`` and build its transform chain."""
    rule = rules.get_rule(name)
    hp = rules.validate(rule.name, hparams)
    base = base_transform(rule.base, hp)
    if rule.gsnr:
        return rule, hp, chain(scale_by_gsnr(hp["gamma"], hp["gsnr_momentum"]), base)
    return rule, hp, base


class ReferenceOptimizer:
    """Stateful convenience wrapper: the oracle the backend tests step side by side.

    ``adapt``/``decay`` are per-tensor flags (default: all on).
    """

    def __init__(self, name: str, params: Sequence[np.ndarray], adapt=None, decay=None, **hparams):
        self.rule, self.hparams, self.transform = make(name, **hparams)
        self.params = [np.array(p, np.float64, copy=True) for p in params]
        n = len(self.params)
        self.adapt = list(adapt) if adapt is not None else [True] * n
        self.decay = list(decay) if decay is not None else [True] * n
        self.state = self.transform.init(self.params)
        self.t = 0

    def step(self, grads: Sequence[np.ndarray], sq: Optional[Sequence[np.ndarray]] = None,
             lr: Optional[float] = None, floor: float = VARIANCE_FLOOR) -> List[np.ndarray]:
        """One step on the averaged gradient ḡ (and s for VR rules); ``floor``: ε_w (SPEC §2)."""
        self.t += 1
        ctx = StepContext(
            lr=self.hparams["lr"] if lr is None else lr, step=self.t, adapt=self.adapt,
            decay=self.decay,
            sq=None if sq is None else [np.asarray(s, np.float64) for s in sq], floor=floor,
        )
        grads = [np.asarray(g, np.float64) for g in grads]
        delta, self.state = self.transform.update(grads, self.state, self.params, ctx)
        self.params = [w - d for w, d in zip(self.params, delta)]
        return self.params

    def step_samples(self, samples: Sequence[Sequence[np.ndarray]], lr: Optional[float] = None):
        """One step from k gradient samples x_i (SPEC §1): ḡ, and s for VR rules."""
        mean, sq = gradient_stats(samples) if (self.rule.gsnr or len(samples) >= 2) else (
            [np.asarray(g, np.float64) for g in samples[0]], None)
        return self.step(mean, sq if self.rule.gsnr else None, lr)


__all__ = [
    "StepContext", "Transform", "chain", "gradient_stats", "float16_floor", "float16_squares", "micro_batch_samples", "gsnr_ratio",
    "scale_by_gsnr", "add_decayed_weights", "trace", "scale_by_learning_rate", "scale_by_adam",
    "scale_by_lamb_trust", "scale_by_lars_trust", "normalize_by_global_norm", "tvlars_phi",
    "scale_by_tvlars_trust", "tvlars_momentum", "BASE_TRANSFORMS", "register", "base_transform", "make",
    "ReferenceOptimizer",
]
