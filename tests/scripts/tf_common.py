"""Shared by the TF tests and their horovodrun workers: seeded data and test settings."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

# Non-default hyperparameters (Keras spelling) so every branch of each rule runs.
TEST_HP = {
    "sgd": {"weight_decay": 0.05},
    "momentum": {"weight_decay": 0.05, "nesterov": True},
    "adam": {"weight_decay": 0.05, "beta_1": 0.8, "beta_2": 0.99},
    "lars": {"weight_decay": 0.05, "learning_rate": 0.5},
    "lamb": {"weight_decay": 0.05, "max_trust": 5.0},
    "sngm": {"weight_decay": 0.05},
    "tvlars": {"weight_decay": 0.05, "delay_steps": 10, "decay_coefficient": 0.2,
               "min_ratio": 0.01, "learning_rate": 0.5},
}
for _b in list(TEST_HP):
    TEST_HP["vr-" + _b] = dict(TEST_HP[_b], gamma=0.3)
TEST_HP["vr-momentum"]["gsnr_momentum"] = 0.5


def init_params(seed=0):
    """A matrix (adapted), a bias (ndim 1: adapt and decay off) and an all-zero matrix."""
    rng = np.random.default_rng(seed)
    return {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=(3,)),
            "zero": np.zeros((2, 2))}


def flags():
    return [True, False, True]


def sample_grads(step, sample, shapes, seed=0):
    """Per-sample gradient x for (step, sample); step 4 is all-zero on every sample."""
    rng = np.random.default_rng([seed, step, sample])
    if step == 4:
        return [np.zeros(s) for s in shapes]
    # A shared signal plus noise, so r varies across elements.
    base = np.random.default_rng([seed, step]).normal(size=sum(int(np.prod(s)) for s in shapes))
    out, i = [], 0
    for s in shapes:
        n = int(np.prod(s))
        out.append((base[i:i + n] + rng.normal(scale=0.7, size=n)).reshape(s))
        i += n
    return out


# -- a tiny Dense(3) regression shared by the horovodrun workers and the tests' replay --
N_PER_RANK, BATCH, IN_DIM, OUT_DIM, EPOCHS = 24, 4, 4, 3, 2
APPLIES = EPOCHS * N_PER_RANK // BATCH  # apply() calls (micro-batches) per run


def shard(rank):
    rng = np.random.default_rng([7, rank])
    X = rng.normal(size=(N_PER_RANK, IN_DIM))
    y = X @ rng.normal(size=(IN_DIM, OUT_DIM)) + rng.normal(scale=0.5, size=(N_PER_RANK, OUT_DIM))
    return X, y


def batch(rank, i):
    """Micro-batch i (counting across epochs, no shuffling) of worker ``rank``."""
    X, y = shard(rank)
    j = (i * BATCH) % N_PER_RANK
    return X[j:j + BATCH], y[j:j + BATCH]


def init_dense(rank):
    rng = np.random.default_rng([11, rank])
    return [rng.normal(size=(IN_DIM, OUT_DIM)), rng.normal(scale=0.1, size=(OUT_DIM,))]


def dense_mse_grad(W, b, X, y):
    """∇ of Keras' "mse" (mean over batch and outputs) for y = XW + b."""
    r = X @ W + b - y
    c = 2.0 / (X.shape[0] * y.shape[1])
    return [c * X.T @ r, c * r.sum(0)]


def replay(name, hp, size, micro_batches, lr_fn=None):
    """The float64 reference fed the per-sample gradients each worker sees (SPEC §1).

    Starts from rank 0's weights (broadcast). Returns (reference, last (ḡ, s)).
    """
    from hvd_lb import rules
    from hvd_lb.reference import ReferenceOptimizer, gradient_stats, micro_batch_samples

    ref = ReferenceOptimizer(name, init_dense(0), adapt=[True, False], decay=[True, False],
                             **rules.from_keras(hp))
    last = None
    for t in range(APPLIES // micro_batches):
        per_worker = [[dense_mse_grad(*ref.params, *batch(r, t * micro_batches + m))
                       for m in range(micro_batches)] for r in range(size)]
        samples = micro_batch_samples(per_worker)
        last = gradient_stats(samples) if len(samples) > 1 else None
        ref.step_samples(samples, lr=None if lr_fn is None else lr_fn(t))
    return ref, last


# -- GSNR in front of a plain Keras optimizer (SPEC §7) -------------------------------------
GSNR_HP = {"gamma": 0.3, "momentum": 0.5}


def keras_optimizer(kind):
    """The plain Keras optimizers the GSNR tests wrap (fresh each call, float64 under floatx)."""
    import keras

    if kind == "sgd":
        return keras.optimizers.SGD(learning_rate=0.1, momentum=0.9, nesterov=True)
    return keras.optimizers.AdamW(learning_rate=0.02, weight_decay=0.05)


def replay_gsnr(kind, size, micro_batches, average=False):
    """``keras_optimizer(kind)`` fed the reference's ĝ (SPEC §2) from the per-sample gradients
    each worker sees (SPEC §1), from rank 0's weights: what GSNR(keras_optimizer(kind))
    behind DistributedOptimizer must give, ĝ being independent of the weights.

    ``average``: ``average_aggregated_gradients=True`` (samples x = g, not M·g).
    """
    import keras
    import tensorflow as tf

    from hvd_lb.reference import StepContext, gradient_stats, micro_batch_samples, scale_by_gsnr

    M = micro_batches
    variables = [keras.Variable(w, name=n) for w, n in zip(init_dense(0), ("kernel", "bias"))]
    opt = keras_optimizer(kind)
    transform = scale_by_gsnr(GSNR_HP["gamma"], GSNR_HP["momentum"])
    state = transform.init(init_dense(0))
    for t in range(APPLIES // M):
        params = [v.numpy() for v in variables]
        per_worker = [[dense_mse_grad(*params, *batch(r, t * M + m)) for m in range(M)] for r in range(size)]
        samples = micro_batch_samples(per_worker)
        if average:
            samples = [[x / M for x in s] for s in samples]
        mean, sq = gradient_stats(samples)
        g_hat, state = transform.update(mean, state, params, StepContext(0.0, t + 1, [], [], sq))
        opt.apply([tf.constant(g) for g in g_hat], variables)
    return [v.numpy() for v in variables]
