"""The backend-generic formulas (run with NumPy ops) agree with the independent reference."""
import math

import numpy as np
import pytest

from hvd_lb import formulas as F
from hvd_lb import reference as R

B = F.NumpyOps


@pytest.mark.parametrize("seed", range(5))
def test_gsnr_ratio_matches_reference(seed):
    rng = np.random.default_rng(seed)
    xs = rng.normal(loc=rng.normal(size=50), size=(4, 50))
    mean, sq = xs.mean(0), (xs ** 2).mean(0)
    r, mu, clipped = F.gsnr_ratio(B, mean, sq, 0.1, F.variance_floor(True))
    r_ref, mu_ref, clipped_ref = R.gsnr_ratio(mean, sq, 0.1)
    np.testing.assert_allclose(r, r_ref, rtol=1e-13)
    assert mu == pytest.approx(mu_ref, rel=1e-13) and clipped == pytest.approx(clipped_ref)


def test_gsnr_ratio_all_zero_gradient_is_one():
    r, mu, clipped = F.gsnr_ratio(B, np.zeros(3), np.zeros(3), 0.1, F.variance_floor(True))
    np.testing.assert_array_equal(r, np.ones(3))
    assert mu == 0 and clipped == 0


def test_trust_ratios_fall_back_to_one_on_zero_norms():
    assert F.lars_trust(B, np.float64(0), np.float64(1), 1e-3, 1e-9, 0.0) == 1
    assert F.lars_trust(B, np.float64(5), np.float64(0), 1e-3, 1e-9, 0.0) == 1
    assert F.lars_trust(B, np.float64(5), np.float64(1), 1e-3, 0.0, 0.1) == pytest.approx(5e-3 / 1.5)
    assert F.lamb_trust(B, np.float64(5), np.float64(0)) == 1
    assert F.lamb_trust(B, np.float64(5), np.float64(2), max_trust=2.0) == 2.0
    assert F.tvlars_trust(B, np.float64(0), np.float64(1), 0.3, 1e-3, 1e-9) == pytest.approx(0.3)
    assert F.global_norm_scale(B, np.float64(0)) == 0
    assert F.global_norm_scale(B, np.float64(4)) == 0.25


def test_tvlars_phi_scalar_and_tensor_forms_agree():
    for t in (1, 10, 1000, 50000):
        a = F.tvlars_phi(t, 1.0, 1e-4, 1000, 0.01)
        b = F.tvlars_phi_tensor(B, np.float64(t), 1.0, 1e-4, 1000, 0.01)
        assert a == pytest.approx(float(b), rel=1e-14)
        assert a == R.tvlars_phi(t, 1.0, 1e-4, 1000, 0.01)
    with np.errstate(over="ignore"):
        assert float(F.tvlars_phi_tensor(B, np.float64(1e9), 1.0, 1.0, 0, 0.02)) == 0.02


def test_adam_and_gsnr_momentum_steps():
    g = np.array([0.5, -1.0])
    d, m, v = F.adam_direction(B, g, np.zeros(2), np.zeros(2), 0.9, 0.999, 1e-8, 1)
    np.testing.assert_allclose(d, g / (np.abs(g) + 1e-8))
    g_hat, p = F.gsnr_scale(B, g, np.array([1.0, 0.1]), np.zeros(2), 0.9, 1)
    np.testing.assert_allclose(g_hat, [0.5, -0.1])
    np.testing.assert_allclose(p, [0.1, 0.01])
    w, m = F.tvlars_iterate(np.array([1.0]), np.array([0.1]), np.array([1.0]), 0.9)
    np.testing.assert_allclose(m, [0.9])
    np.testing.assert_allclose(w, [0.9 - 0.09])
    assert math.isclose(F.lars_scale(B, np.float64(0.5), 0.1, True), 0.1)
