"""Demo worker (TensorFlow / Keras 3): runs every (optimizer, lr, seed) of the config under Horovod.

Started by ``hvd-lb demo --framework tf`` through horovodrun; rank 0 prints
progress and writes the raw per-run results for the driver. It mirrors
``demo_torch.py`` step for step:

* the same CNN: Conv 16 5×5/2 + ReLU, Conv 32 3×3/2 + ReLU, average-pool the
  7×7 map to 4×4, Flatten, Dense 10. The pool is ``AdaptiveAvgPool4``, an exact
  copy of torch's ``AdaptiveAvgPool2d(4)`` on a 7×7 map (overlapping windows
  rows/cols [0,2), [1,4), [3,6), [5,7)), done as one einsum with a fixed
  averaging matrix; Keras' ``AveragePooling2D`` has no such window pattern
  (pool 2 / stride 2 / "same" would give windows of 2, 2, 2, 1). Weights and
  biases are drawn like torch's defaults, U(±1/√fan_in), so the learning-rate
  grid means the same thing in both frameworks. Keras flattens (h, w, c)
  where torch flattens (c, h, w); with its own Dense weights that is the
  same model.
* the same data handling: each step's global batch is split over ranks, each
  rank's share into M micro-batches whose losses are divided by M; train
  accuracy on a fixed 10k training subset and test accuracy on the test set,
  each rank scoring its shard and one all-reduce summing the counts.
* the same schedule (one epoch of linear warm-up, then cosine; TVLARS none),
  the same stability criterion and the same progress lines.

The step is one ``tf.function`` (``jit_compile=False``: Horovod's CPU all-reduce
has no XLA kernel) around ``hvd_lb.tf.DistributedGradientTape`` with the M
micro-batch losses on a persistent tape: one grouped all-reduce per step gives
ḡ and, for VR rules, s. The shuffle uses NumPy (the same seed on every rank),
so the batches differ from the torch worker's, not their statistics.
"""
from __future__ import annotations

import json
import math
import os
import sys

from . import demo_common as common

# Before TensorFlow is imported (main imports it): no C++ log noise.
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"


def make_model(keras, tf, seed: int):
    """The demo CNN, initialised like torch's defaults from ``seed``."""

    class AdaptiveAvgPool4(keras.layers.Layer):
        """torch ``AdaptiveAvgPool2d(4)`` for NHWC inputs of a fixed spatial size."""

        def build(self, input_shape):
            h, w = int(input_shape[1]), int(input_shape[2])
            self._ph = tf.constant(self._matrix(h), tf.float32)
            self._pw = tf.constant(self._matrix(w), tf.float32)

        @staticmethod
        def _matrix(n, out=4):
            # Row i averages [floor(i·n/out), ceil((i+1)·n/out)), as torch does.
            rows = []
            for i in range(out):
                a, b = (i * n) // out, -(-((i + 1) * n) // out)
                rows.append([1.0 / (b - a) if a <= j < b else 0.0 for j in range(n)])
            return rows

        def call(self, x):
            return tf.einsum("ih,bhwc,jw->bijc", self._ph, x, self._pw)

        def compute_output_shape(self, input_shape):
            return (input_shape[0], 4, 4, input_shape[3])

    def init(fan_in, s):
        bound = 1.0 / math.sqrt(fan_in)
        return keras.initializers.RandomUniform(-bound, bound, seed=seed * 100 + s)

    L = keras.layers
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        L.Conv2D(16, 5, strides=2, padding="same", activation="relu",
                 kernel_initializer=init(1 * 25, 1), bias_initializer=init(1 * 25, 2)),
        L.Conv2D(32, 3, strides=2, padding="same", activation="relu",
                 kernel_initializer=init(16 * 9, 3), bias_initializer=init(16 * 9, 4)),
        AdaptiveAvgPool4(), L.Flatten(),
        L.Dense(10, kernel_initializer=init(512, 5), bias_initializer=init(512, 6)),
    ])
    return model


def main(cfg_path: str) -> None:
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import horovod.tensorflow as hvd
    import keras

    import hvd_lb.tf as lb
    from hvd_lb import rules
    from hvd_lb.data import load_fashion_mnist

    with open(cfg_path) as f:
        cfg = json.load(f)
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    if cfg["train_subset"]:
        x_train, y_train = x_train[:cfg["train_subset"]], y_train[:cfg["train_subset"]]
    n_train = len(x_train)
    # Each rank scores its share of the test set (and of a fixed 10k training
    # subset, for the train-test gap); one all-reduce sums the counts.
    x_eval, y_eval = x_train[:10000][rank::size, ..., None], y_train[:10000][rank::size]
    x_test, y_test = x_test[rank::size, ..., None], y_test[rank::size]
    x_train = tf.constant(x_train[..., None])
    y_train = tf.constant(y_train)
    batch, micro = cfg["batch_size"], cfg["micro_batches"]
    local = batch // size
    micro_size = local // micro
    steps_per_epoch = n_train // batch
    total_steps = steps_per_epoch * cfg["epochs"]
    results = []

    def count_correct(predict, x, y, chunk=2500) -> int:
        return sum(int(predict(tf.constant(x[a:a + chunk]), tf.constant(y[a:a + chunk])))
                   for a in range(0, len(x), chunk))

    for i, run in enumerate(cfg["runs"]):
        keras.utils.set_random_seed(run["seed"])
        model = make_model(keras, tf, run["seed"])
        lb.broadcast_variables(model.variables, root_rank=0)
        # TVLARS replaces warm-up (its paper); every other rule warms up for one epoch.
        warmup = 0 if run["optimizer"].endswith("tvlars") else min(steps_per_epoch, total_steps)
        sched = lb.WarmupDecay(run["lr"], warmup_steps=warmup, total_steps=total_steps, decay="cosine")
        opt = lb.create(run["optimizer"], learning_rate=sched, weight_decay=cfg["weight_decay"])
        opt.build(model.trainable_variables)
        is_vr = rules.get_rule(run["optimizer"]).gsnr

        @tf.function(jit_compile=False)
        def train_step(idx):
            # idx: (M, micro_size) row indices of this rank's share of the step's batch.
            with tf.GradientTape(persistent=True) as tape:
                losses = []
                for m in range(micro):
                    xb, yb = tf.gather(x_train, idx[m]), tf.gather(y_train, idx[m])
                    out = model(xb, training=True)
                    losses.append(tf.reduce_mean(
                        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=yb, logits=out)))
                # Divide by M: the tape sums micro-batch gradients, as Horovod's
                # backward_passes_per_step does in the torch worker.
                scaled = [l / micro for l in losses]
            dtape = lb.DistributedGradientTape(tape, optimizer=opt, micro_batches=micro)
            grads = dtape.gradient(scaled, model.trainable_variables)
            opt.apply(grads, model.trainable_variables)
            return tf.add_n(scaled)

        @tf.function(jit_compile=False, reduce_retracing=True)
        def predict(x, y):
            pred = tf.argmax(model(x, training=False), axis=1, output_type=y.dtype)
            return tf.reduce_sum(tf.cast(tf.equal(pred, y), tf.int64))

        rng = np.random.default_rng(1000 + run["seed"])
        rec = common.new_record(run)
        for epoch in range(cfg["epochs"]):
            perm = rng.permutation(n_train)
            step_losses = []
            for step in range(steps_per_epoch):
                idx = perm[step * batch + rank * local: step * batch + (rank + 1) * local]
                idx = idx[:micro * micro_size].reshape(micro, micro_size).astype(np.int32)
                step_losses.append(train_step(tf.constant(idx)))
                if is_vr:
                    common.add_gsnr(rec, opt.gsnr_diagnostics())
            loss_sum = sum(float(l) for l in step_losses)
            train_loss = float(hvd.allreduce(tf.constant(loss_sum / steps_per_epoch, tf.float64),
                                             op=hvd.Average, name="train_loss"))
            counts = [count_correct(predict, x_test, y_test), len(x_test),
                      count_correct(predict, x_eval, y_eval), len(x_eval)]
            tot = hvd.allreduce(tf.constant(counts, tf.float64), op=hvd.Sum, name="eval").numpy()
            if not common.end_epoch(rec, cfg, i, epoch, train_loss, tot, rank):
                break
        results.append(common.end_run(rec))
    common.write_results(cfg, results, rank)


if __name__ == "__main__":
    main(sys.argv[1])
