"""Per-tensor update formulas of docs/SPEC.md §2–3, written once for every backend.

Each function takes ``B``, a small namespace of array operations (see
``NumpyOps``; the torch and TF backends provide their own), and uses only
branch-free tensor operations, so the same code runs eagerly, inside
``tf.function`` / XLA, and on torch tensors.  Python branching on tensor
values is avoided on purpose: ``where`` carries every edge case.

The float64 NumPy oracle in ``hvd_lb.reference`` is written independently of
this module, so a mistake here shows up as a parity failure, not twice.

Required operations of ``B``:
``square sqrt maximum minimum mean norm where(cond, x, y) clip(x, lo, hi)
ones_like zeros_like cast_like(x, like) logical_and(a, b)``;
``where``/``maximum``/``minimum``/``clip`` must accept Python scalars for the
value arguments.
"""
from __future__ import annotations

import math

# δ = DELTA_REL·mean(var) + DELTA_ABS keeps r_raw finite where var = 0 (SPEC §2).
DELTA_REL = 1e-12
DELTA_ABS = 1e-30


def variance_floor(is_float64: bool) -> float:
    """ε_w of SPEC §2: s − ḡ² below ε_w·s is rounding noise (8 units of rounding of s)."""
    return 2.0 ** -50 if is_float64 else 2.0 ** -21


def gsnr_ratio(B, mean, sq, gamma, eps_w):
    """r = clip(r_raw/mean(r_raw), γ, 1), r_raw = ḡ²/(max(s − ḡ², ε_w·s) + δ)  (VRGD §4).

    ``eps_w`` = ``variance_floor(...)`` of the working dtype. Returns
    ``(r, mean_gsnr, clipped_fraction)``; r = 1 for an all-zero gradient.
    """
    r_tilde, mu = gsnr_relative(B, mean, sq, eps_w)
    return B.clip(r_tilde, gamma, 1.0), mu, clipped_fraction(B, r_tilde, gamma)


def gsnr_relative(B, mean, sq, eps_w):
    """(r̃, μ_r): r̃ = r_raw/μ_r (1 where μ_r = 0), μ_r = mean(r_raw), r_raw as in ``gsnr_ratio``."""
    g2 = B.square(mean)
    var = B.maximum(sq - g2, eps_w * sq)
    delta = DELTA_REL * B.mean(var) + DELTA_ABS
    r_raw = g2 / (var + delta)
    mu = B.mean(r_raw)
    zero = mu == 0
    return B.where(zero, B.ones_like(r_raw), r_raw / B.where(zero, B.ones_like(mu), mu)), mu


def clipped_fraction(B, r_tilde, gamma):
    """The share of elements whose r̃ is raised to γ (a diagnostic)."""
    return B.mean(B.cast_like(r_tilde < gamma, r_tilde))


def gsnr_scale(B, grad, r, avg, gsnr_momentum, step):
    """ĝ = p̂ ⊙ ḡ, p_t = β₃p_{t−1} + (1−β₃)r, p̂ = p_t/(1 − β₃^t). Returns (ĝ, p_t)."""
    avg = gsnr_momentum * avg + (1.0 - gsnr_momentum) * r
    return avg / (1.0 - gsnr_momentum ** step) * grad, avg


def adam_direction(B, grad, exp_avg, exp_avg_sq, beta1, beta2, eps, step):
    """m̂/(√v̂ + ε) with bias correction. Returns (direction, m, v)."""
    exp_avg = beta1 * exp_avg + (1.0 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * grad * grad
    m_hat = exp_avg / (1.0 - beta1 ** step)
    v_hat = exp_avg_sq / (1.0 - beta2 ** step)
    return m_hat / (B.sqrt(v_hat) + eps), exp_avg, exp_avg_sq


def lars_trust(B, w_norm, g_norm, trust_coefficient, eps, weight_decay):
    """η‖w‖/(‖g‖ + λ‖w‖ + ε) where both norms are > 0, else 1 (You et al. 2017)."""
    ok = B.logical_and(w_norm > 0, g_norm > 0)
    ratio = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps)
    return B.where(ok, ratio, B.ones_like(w_norm))


def lars_scale(B, trust, lr, trust_clip):
    """Factor on d = g + λw: lr·trust, or LARC's min(trust, lr) when clipping."""
    return B.minimum(trust, lr) if trust_clip else lr * trust


def lamb_trust(B, w_norm, u_norm, max_trust=None):
    """‖w‖/‖u‖ where both norms are > 0, else 1; clamped above by ``max_trust``."""
    ok = B.logical_and(w_norm > 0, u_norm > 0)
    trust = B.where(ok, w_norm / B.where(ok, u_norm, B.ones_like(u_norm)), B.ones_like(w_norm))
    return trust if max_trust is None else B.minimum(trust, max_trust)


def tvlars_phi(step, alpha, decay_coefficient, delay_steps, min_ratio):
    """φ_t = 1/(α + exp(λ_d(t − d_e))) + γ_min (TVLARS eq. 4). ``step`` is a Python int."""
    psi = decay_coefficient * (step - delay_steps)
    return (0.0 if psi > 700 else 1.0 / (alpha + math.exp(psi))) + min_ratio


def tvlars_phi_tensor(B, step, alpha, decay_coefficient, delay_steps, min_ratio):
    """φ_t for a tensor ``step`` (graph mode); exp(ψ) saturates to inf and φ → γ_min."""
    psi = decay_coefficient * (step - delay_steps)
    return 1.0 / (alpha + B.exp(psi)) + min_ratio


def tvlars_trust(B, w_norm, d_norm, phi, trust_coefficient, eps):
    """φ_t·η‖w‖/(‖g + λw‖ + ε) where both norms are > 0, else φ_t."""
    ok = B.logical_and(w_norm > 0, d_norm > 0)
    return B.where(ok, phi * trust_coefficient * w_norm / (d_norm + eps), phi * B.ones_like(w_norm))


def tvlars_iterate(param, update, prev_iterate, momentum):
    """m_{t+1} = w_t − u, w_{t+1} = m_{t+1} + μ(m_{t+1} − m_t). Returns (w_{t+1}, m_{t+1})."""
    m = param - update
    return m + momentum * (m - prev_iterate), m


def global_norm_scale(B, total_norm):
    """1/‖d‖_global, or 0 when the global norm is 0 (SNGM: u ← βu then)."""
    zero = total_norm == 0
    return B.where(zero, B.zeros_like(total_norm), 1.0 / B.where(zero, B.ones_like(total_norm), total_norm))


class NumpyOps:
    """``B`` for NumPy arrays (used to test this module against the reference)."""

    import numpy as _np

    square = staticmethod(_np.square)
    sqrt = staticmethod(_np.sqrt)
    exp = staticmethod(_np.exp)
    maximum = staticmethod(_np.maximum)
    minimum = staticmethod(_np.minimum)
    mean = staticmethod(_np.mean)
    where = staticmethod(_np.where)
    clip = staticmethod(_np.clip)
    ones_like = staticmethod(_np.ones_like)
    zeros_like = staticmethod(_np.zeros_like)
    logical_and = staticmethod(_np.logical_and)

    @staticmethod
    def norm(x):
        return NumpyOps._np.sqrt(NumpyOps._np.sum(NumpyOps._np.square(x)))

    @staticmethod
    def cast_like(x, like):
        return NumpyOps._np.asarray(x, dtype=NumpyOps._np.asarray(like).dtype)
