"""Step time of hvd_lb.tf against plain Keras SGD + a Horovod all-reduce, side by side.

    horovodrun -np 2 -H localhost:2 --gloo python bench/tf_step.py [--steps 60] [--hidden 512]

Three compiled train steps on the same MLP and data, timed in interleaved
rounds so machine noise hits them alike:
  baseline     keras.optimizers.SGD(momentum=0.9), grads averaged with one
               hvd.grouped_allreduce (what horovod.tensorflow.keras did on Keras 2)
  momentum     hvd_lb DistributedOptimizer(create("momentum"))
  vr-momentum  hvd_lb DistributedOptimizer(create("vr-momentum")): ḡ and s in one call
Rank 0 prints median step times and the ratios to the baseline.
"""
import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import horovod.tensorflow as hvd  # noqa: E402

import hvd_lb.tf as H  # noqa: E402


def make_model(in_dim, hidden, classes, seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((in_dim,)), keras.layers.Dense(hidden, activation="relu"),
                             keras.layers.Dense(hidden, activation="relu"),
                             keras.layers.Dense(classes)])


def make_step(model, apply_fn):
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    tvs = model.trainable_variables

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        apply_fn(tape.gradient(loss, tvs), tvs)
        return loss

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--in-dim", type=int, default=784)
    args = ap.parse_args()
    for arg in ("steps", "warmup", "rounds", "batch", "hidden", "in_dim"):
        if getattr(args, arg) < 1:
            raise ValueError(f"invalid --{arg.replace('_', '-')}={getattr(args, arg)}: must be ≥ 1")

    hvd.init()
    rng = np.random.default_rng(hvd.rank())
    x = tf.constant(rng.normal(size=(args.batch, args.in_dim)), tf.float32)
    y = tf.constant(rng.integers(0, 10, size=args.batch))

    variants = {}
    base_model = make_model(args.in_dim, args.hidden, 10, 0)
    base_opt = keras.optimizers.SGD(0.01, momentum=0.9)

    def base_apply(grads, tvs):
        base_opt.apply(hvd.grouped_allreduce(grads, op=hvd.Average), tvs)

    variants["baseline"] = make_step(base_model, base_apply)
    for name in ("momentum", "vr-momentum"):
        model = make_model(args.in_dim, args.hidden, 10, 0)
        opt = H.DistributedOptimizer(H.create(name, learning_rate=0.01))
        variants[name] = make_step(model, opt.apply)

    for step in variants.values():  # trace and warm up
        for _ in range(args.warmup):
            step(x, y).numpy()
    times = {k: [] for k in variants}
    per_round = max(1, args.steps // args.rounds)
    for _ in range(args.rounds):
        for name, step in variants.items():
            hvd.allreduce(tf.constant(0.0), name="bench.barrier").numpy()
            t0 = time.perf_counter()
            for _ in range(per_round):
                loss = step(x, y)
            loss.numpy()
            times[name].append((time.perf_counter() - t0) / per_round)
    if hvd.rank() == 0:
        med = {k: float(np.median(v)) for k, v in times.items()}
        print(f"hvd_lb TF step benchmark: {hvd.size()} workers, batch {args.batch}/worker, "
              f"MLP {args.in_dim}-{args.hidden}-{args.hidden}-10, {args.rounds}×{per_round} steps")
        for k, v in med.items():
            print(f"  {k:12s} {v * 1e3:8.2f} ms/step   ratio to baseline {v / med['baseline']:.3f}")


if __name__ == "__main__":
    main()
