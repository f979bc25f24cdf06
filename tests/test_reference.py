"""The float64 NumPy reference against hand-worked values from SPEC §1–3.

Expected values are written out from the SPEC formulas with scalars, not with
the reference's own code, for 2 steps of every base rule; VR rules are checked
against the base rule fed a hand-computed ĝ.
"""
import math

import numpy as np
import pytest

from hvd_lb import reference as R
from hvd_lb import rules

W0 = [3.0, 4.0]           # ‖w₀‖ = 5
G1 = [0.6, 0.8]           # ‖g₁‖ = 1
G2 = [0.0, 1.0]           # ‖g₂‖ = 1


def run(name, grads, w0=W0, **hp):
    opt = R.ReferenceOptimizer(name, [np.array(w0)], **hp)
    out = []
    for g in grads:
        out.append(opt.step([np.array(g)])[0].copy())
    return out, opt


def close(a, b, tol=1e-12):
    np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=tol, atol=tol)


def test_sgd_hand_values():
    (w1, w2), _ = run("sgd", [G1, G2], lr=0.1, weight_decay=0.01)
    close(w1, [3 - 0.1 * (0.6 + 0.03), 4 - 0.1 * (0.8 + 0.04)])
    close(w2, [w1[0] - 0.1 * (0 + 0.01 * w1[0]), w1[1] - 0.1 * (1 + 0.01 * w1[1])])
    close(w2, [2.934063, 3.812084])


def test_momentum_hand_values():
    (w1, w2), opt = run("momentum", [G1, G2], lr=0.1)
    close(w1, [2.94, 3.92])
    close(w2, [2.94 - 0.1 * 0.54, 3.92 - 0.1 * 1.72])
    close(opt.state["momentum_buffer"][0], [0.54, 1.72])
    (n1, n2), _ = run("momentum", [G1, G2], lr=0.1, nesterov=True)
    close(n1, [3 - 0.19 * 0.6, 4 - 0.19 * 0.8])
    close(n2, [n1[0] - 0.1 * (0 + 0.9 * 0.54), n1[1] - 0.1 * (1 + 0.9 * 1.72)])


def test_adam_hand_values():
    eps, lr, wd = 1e-8, 0.1, 0.01
    (w1, w2), opt = run("adam", [G1, G2], lr=lr, weight_decay=wd)
    exp1 = [w - lr * (g / (abs(g) + eps) + wd * w) for w, g in zip(W0, G1)]
    close(w1, exp1)
    exp2 = []
    for w, g1, g2 in zip(w1, G1, G2):
        m = 0.9 * 0.1 * g1 + 0.1 * g2
        v = 0.999 * 0.001 * g1 ** 2 + 0.001 * g2 ** 2
        exp2.append(w - lr * ((m / (1 - 0.9 ** 2)) / (math.sqrt(v / (1 - 0.999 ** 2)) + eps) + wd * w))
    close(w2, exp2)
    close(opt.state["exp_avg"][0], [0.9 * 0.1 * a + 0.1 * b for a, b in zip(G1, G2)])


def test_lars_hand_values():
    eta, eps, lr = 0.001, 1e-9, 1.0
    (w1, w2), opt = run("lars", [G1, G2], lr=lr)
    t1 = eta * 5 / (1 + eps)
    close(w1, [3 - t1 * 0.6, 4 - t1 * 0.8])
    t2 = eta * math.hypot(*w1) / (1 + eps)
    b2 = [0.9 * t1 * 0.6 + t2 * 0.0, 0.9 * t1 * 0.8 + t2 * 1.0]
    close(w2, [w1[0] - b2[0], w1[1] - b2[1]])
    close(opt.state["momentum_buffer"][0], b2)
    # weight decay enters the trust ratio's denominator and the direction
    (d1,), _ = run("lars", [G1], lr=0.5, weight_decay=0.1)
    t = eta * 5 / (1 + 0.1 * 5 + eps)
    close(d1, [3 - 0.5 * t * (0.6 + 0.3), 4 - 0.5 * t * (0.8 + 0.4)])
    # LARC clip mode: min(trust, lr) replaces lr·trust
    (c1,), _ = run("lars", [G1], lr=1e-4, trust_clip=True)
    close(c1, [3 - 1e-4 * 0.6, 4 - 1e-4 * 0.8])


def test_lamb_hand_values():
    eps, lr = 1e-6, 0.01
    (w1, w2), _ = run("lamb", [G1, G2], lr=lr)
    u1 = [g / (abs(g) + eps) for g in G1]
    trust1 = 5 / math.hypot(*u1)
    close(w1, [w - lr * trust1 * u for w, u in zip(W0, u1)])
    u2 = []
    for g1, g2 in zip(G1, G2):
        m = (0.09 * g1 + 0.1 * g2) / (1 - 0.81)
        v = (0.999 * 0.001 * g1 ** 2 + 0.001 * g2 ** 2) / (1 - 0.999 ** 2)
        u2.append(m / (math.sqrt(v) + eps))
    trust2 = math.hypot(*w1) / math.hypot(*u2)
    close(w2, [w - lr * trust2 * u for w, u in zip(w1, u2)])
    (m1,), _ = run("lamb", [G1], lr=lr, max_trust=2.0)
    close(m1, [w - lr * 2.0 * u for w, u in zip(W0, u1)])


def test_sngm_uses_the_global_norm_over_every_tensor():
    opt = R.ReferenceOptimizer("sngm", [np.array(W0), np.array([1.0])], lr=0.1)
    w1, b1 = opt.step([np.array(G1), np.array([1.0])])
    gn = math.sqrt(2.0)
    close(w1, [3 - 0.1 * 0.6 / gn, 4 - 0.1 * 0.8 / gn])
    close(b1, [1 - 0.1 / gn])
    w2, b2 = opt.step([np.array(G2), np.array([0.0])])
    u2 = [0.9 * 0.6 / gn + 0.0, 0.9 * 0.8 / gn + 1.0]
    close(w2, [w1[0] - 0.1 * u2[0], w1[1] - 0.1 * u2[1]])
    # zero global norm: u ← βu
    w3, _ = opt.step([np.zeros(2), np.zeros(1)])
    close(w3, [w2[0] - 0.1 * 0.9 * u2[0], w2[1] - 0.1 * 0.9 * u2[1]])


def test_tvlars_hand_values():
    eta, eps, lr, mu = 0.001, 1e-9, 1.0, 0.9
    phi = [1 / (1 + math.exp(1e-4 * (t - 1000))) for t in (1, 2)]
    (w1, w2), opt = run("tvlars", [G1, G2], lr=lr)
    t1 = phi[0] * eta * 5 / (1 + eps)
    m2 = [w - lr * t1 * g for w, g in zip(W0, G1)]
    close(w1, [m + mu * (m - w) for m, w in zip(m2, W0)])
    t2 = phi[1] * eta * math.hypot(*w1) / (1 + eps)
    m3 = [w - lr * t2 * g for w, g in zip(w1, G2)]
    close(w2, [a + mu * (a - b) for a, b in zip(m3, m2)])
    close(opt.state["prev_iterate"][0], m3)
    assert R.tvlars_phi(10 ** 9, 1.0, 1e-4, 1000, 0.05) == 0.05


# Two samples per step whose GSNR is worked out by hand (SPEC §2):
# step 1: x = [2,3,1], [2,1,-1] → ḡ = [2,2,0], var = [0,1,1] → r = [1, γ, γ]
# step 2: x = [1,1,1], [1,1,-1] → ḡ = [1,1,0], var = [0,0,1] → r = [1, 1, γ]
SAMPLES = [
    [[np.array([2.0, 3.0, 1.0])], [np.array([2.0, 1.0, -1.0])]],
    [[np.array([1.0, 1.0, 1.0])], [np.array([1.0, 1.0, -1.0])]],
]


def hand_g_hat(gamma, beta3):
    r1, r2 = np.array([1, gamma, gamma]), np.array([1, 1, gamma])
    g1, g2 = np.array([2.0, 2.0, 0.0]), np.array([1.0, 1.0, 0.0])
    p1 = (1 - beta3) * r1
    p2 = beta3 * p1 + (1 - beta3) * r2
    return [p1 / (1 - beta3) * g1, p2 / (1 - beta3 ** 2) * g2]


def test_gsnr_hand_values():
    mean, sq = R.gradient_stats(SAMPLES[0])
    close(mean[0], [2, 2, 0])
    close(sq[0], [4, 5, 1])
    r, mu, clipped = R.gsnr_ratio(mean[0], sq[0], 0.1)
    close(r, [1, 0.1, 0.1])
    floor = 2.0 ** -50 * 4  # SPEC §2: var of the identical first element is floored at ε_w·s
    delta = 1e-12 * (2 + floor) / 3 + 1e-30
    assert mu == pytest.approx((4 / (floor + delta) + 4 / (1 + delta)) / 3, rel=1e-12)
    assert clipped == pytest.approx(2 / 3)
    g_hat = hand_g_hat(0.1, 0.9)
    close(g_hat[1], [1, (0.09 * 0.1 + 0.1) / 0.19, 0])


@pytest.mark.parametrize("name", [n for n in rules.NAMES if n.startswith("vr-")])
@pytest.mark.parametrize("beta3", [0.0, 0.9])
def test_vr_rule_is_its_base_rule_on_the_hand_computed_g_hat(name, beta3):
    w0 = [np.array([0.5, -1.0, 2.0])]
    vr = R.ReferenceOptimizer(name, w0, gamma=0.1, gsnr_momentum=beta3)
    base = R.ReferenceOptimizer(name[3:], w0)
    for samples, g_hat in zip(SAMPLES, hand_g_hat(0.1, beta3)):
        a = vr.step_samples(samples)
        b = base.step([g_hat])
        close(a[0], b[0], 1e-10)
    assert set(vr.state) == set(vr.rule.slots)
    close(vr.state["gsnr_avg"][0],
          beta3 * (1 - beta3) * np.array([1, 0.1, 0.1]) + (1 - beta3) * np.array([1, 1, 0.1]))


def random_problem(seed, k=4, steps=3):
    rng = np.random.default_rng(seed)
    params = [rng.normal(size=(4, 3)), rng.normal(size=3), rng.normal(size=(2, 2, 2))]
    samples = [[[rng.normal(loc=0.3, size=p.shape) for p in params] for _ in range(k)] for _ in range(steps)]
    return params, samples


@pytest.mark.parametrize("name", [n for n in rules.NAMES if n.startswith("vr-")])
def test_gamma_one_makes_every_vr_rule_its_base_rule(name):
    params, samples = random_problem(1)
    vr = R.ReferenceOptimizer(name, params, gamma=1.0, adapt=[True, False, True], decay=[True, False, True])
    base = R.ReferenceOptimizer(name[3:], params, adapt=[True, False, True], decay=[True, False, True])
    for s in samples:
        mean, _ = R.gradient_stats(s)
        for a, b in zip(vr.step_samples(s), base.step(mean)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", rules.NAMES)
def test_zero_gradients_and_zero_weights_stay_finite(name):
    zeros = [np.zeros((3, 2)), np.zeros(2)]
    opt = R.ReferenceOptimizer(name, zeros, weight_decay=0.01)
    for _ in range(3):
        out = opt.step_samples([[np.zeros_like(p) for p in zeros]] * 2)
    assert all(np.isfinite(p).all() for p in out)
    for slot in opt.state.values():
        assert all(np.isfinite(a).all() for a in slot)
    # zero weights with non-zero gradients: trust ratios fall back to 1
    opt = R.ReferenceOptimizer(name, zeros, lr=0.01)
    rng = np.random.default_rng(0)
    for _ in range(3):
        out = opt.step_samples([[rng.normal(size=p.shape) for p in zeros] for _ in range(2)])
    assert all(np.isfinite(p).all() for p in out)


def test_k_below_two_and_missing_statistics_are_clear_errors():
    with pytest.raises(ValueError, match="micro_batches"):
        R.gradient_stats([[np.ones(2)]])
    opt = R.ReferenceOptimizer("vr-sgd", [np.ones(2)])
    with pytest.raises(ValueError, match="DistributedOptimizer"):
        opt.step([np.ones(2)])
    with pytest.raises(ValueError, match="micro_batches"):
        opt.step_samples([[np.ones(2)]])


def test_micro_batch_samples_scale_by_M_to_match_horovod_accumulation():
    # 2 workers × 2 micro-batches: Horovod averages over workers of the local sums.
    g = [[[np.array([1.0])], [np.array([3.0])]], [[np.array([5.0])], [np.array([7.0])]]]
    xs = R.micro_batch_samples(g)
    assert [x[0][0] for x in xs] == [2.0, 6.0, 10.0, 14.0]
    mean, sq = R.gradient_stats(xs)
    assert mean[0][0] == ((1 + 3) + (5 + 7)) / 2
    assert sq[0][0] == (4 + 36 + 100 + 196) / 4


def test_per_tensor_flags_turn_off_decay_and_adaptation():
    opt = R.ReferenceOptimizer("lars", [np.array(W0)], adapt=[False], decay=[False], lr=0.1,
                               weight_decay=0.5)
    close(opt.step([np.array(G1)])[0], [3 - 0.1 * 0.6, 4 - 0.1 * 0.8])
    opt = R.ReferenceOptimizer("lamb", [np.array(W0)], adapt=[False], lr=0.1)
    close(opt.step([np.array(G1)])[0], [3 - 0.1 * 0.6 / (0.6 + 1e-6), 4 - 0.1 * 0.8 / (0.8 + 1e-6)])
