"""Demo worker (TensorFlow / Keras 3): runs every run of the config, one after the other, under Horovod.

Started by ``hvd-lb demo --framework tf`` through horovodrun. It mirrors
``demo_torch.py`` step for step:

* the same MLP, 784-128-64-10 with ReLU, its weights and biases drawn like
  torch's ``nn.Linear`` defaults, U(±1/√fan_in), so a learning rate means
  the same thing in both frameworks; or the same CNN (``--model cnn``) from
  the same NumPy-drawn initial weights, shuffled in the same NumPy order;
* the same data handling: each step's global batch split over ranks, each
  rank's share into M micro-batches whose losses are divided by M (the tape
  sums micro-batch gradients, as Horovod's ``backward_passes_per_step``);
  test accuracy on the test set and train accuracy on a fixed 10k training
  subset, each rank scoring its shard and one all-reduce summing the counts;
* the same schedule (linear warm-up of the run's length, then cosine), the
  same stability criterion and the same progress events.

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
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def make_model(keras, arch: str, seed: int):
    """The demo model: the MLP initialised like torch's ``nn.Linear`` defaults from ``seed``;
    the CNN (NHWC) from ``common.cnn_weights(seed)``, the numbers the torch worker starts from."""
    L = keras.layers
    if arch == "cnn":
        blocks = [keras.Input((28, 28, 1))]
        for i, c in enumerate(common.CNN_CHANNELS, 1):
            # torch's padding=1: symmetric, also for the stride-2 convs ("same" would pad one side).
            blocks += [L.ZeroPadding2D(1), L.Conv2D(c, 3, strides=2 if i < 3 else 1, use_bias=False,
                                                    name=f"conv{i}"),
                       L.BatchNormalization(epsilon=common.BN_EPS, momentum=1 - common.BN_MOMENTUM,
                                            name=f"bn{i}"),
                       L.ReLU()]
        model = keras.Sequential(blocks + [L.GlobalAveragePooling2D(), L.Dense(10, name="fc")])
        w = common.cnn_weights(seed)
        for i in range(1, len(common.CNN_CHANNELS) + 1):
            model.get_layer(f"conv{i}").kernel.assign(w[f"conv{i}.weight"].transpose(2, 3, 1, 0))  # OIHW → HWIO
            bn = model.get_layer(f"bn{i}")
            bn.gamma.assign(w[f"bn{i}.weight"])
            bn.beta.assign(w[f"bn{i}.bias"])
        model.get_layer("fc").kernel.assign(w["fc.weight"].T)
        model.get_layer("fc").bias.assign(w["fc.bias"])
        return model

    def init(fan_in, s):
        bound = 1.0 / math.sqrt(fan_in)
        return keras.initializers.RandomUniform(-bound, bound, seed=seed * 100 + s)

    h1, h2 = common.HIDDEN
    return keras.Sequential([
        keras.Input((784,)),
        L.Dense(h1, activation="relu", kernel_initializer=init(784, 1), bias_initializer=init(784, 2)),
        L.Dense(h2, activation="relu", kernel_initializer=init(h1, 3), bias_initializer=init(h1, 4)),
        L.Dense(10, kernel_initializer=init(h2, 5), bias_initializer=init(h2, 6)),
    ])


def main(cfg_path: str) -> None:
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import horovod.tensorflow as hvd
    import keras

    import hvd_lb.tf as lb
    from hvd_lb import rules
    from hvd_lb.launch.data import load_fashion_mnist

    with open(cfg_path) as f:
        cfg = json.load(f)
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    progress = common.Progress(cfg, rank)
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    if cfg["train_subset"]:
        x_train, y_train = x_train[:cfg["train_subset"]], y_train[:cfg["train_subset"]]
    x_train, x_test = common.standardize(x_train, x_test)
    arch = cfg.get("arch", "mlp")
    if arch == "cnn":  # NHWC images
        x_train, x_test = x_train.reshape(-1, 28, 28, 1), x_test.reshape(-1, 28, 28, 1)
    n_train = len(x_train)
    x_eval, y_eval = x_train[:10000][rank::size], y_train[:10000][rank::size]
    x_test, y_test = x_test[rank::size], y_test[rank::size]
    x_train, y_train = tf.constant(x_train), tf.constant(y_train)
    results = []

    def count_correct(predict, x, y, chunk=5000) -> int:
        return sum(int(predict(tf.constant(x[a:a + chunk]), tf.constant(y[a:a + chunk])))
                   for a in range(0, len(x), chunk))

    for i, run in enumerate(cfg["runs"]):
        plan = common.run_plan(run, cfg, n_train, size)
        local, micro, micro_size = plan["local"], plan["micro"], plan["micro_size"]
        batch = run["batch_size"]
        keras.utils.set_random_seed(run["seed"])
        model = make_model(keras, arch, run["seed"])
        lb.broadcast_variables(model.variables, root_rank=0)
        sched = lb.WarmupDecay(run["lr"], warmup_steps=plan["warmup_steps"], total_steps=plan["total_steps"],
                               decay="cosine")
        opt = lb.create(run["optimizer"], learning_rate=sched, weight_decay=cfg["weight_decay"])
        opt.build(model.trainable_variables)
        is_vr = rules.get_rule(run["optimizer"]).gsnr

        @tf.function(jit_compile=False)
        def train_step(idx):
            # idx: (M, micro_size) row indices of this rank's share of the step's batch.
            with tf.GradientTape(persistent=True) as tape:
                scaled = []
                for m in range(micro):
                    xb, yb = tf.gather(x_train, idx[m]), tf.gather(y_train, idx[m])
                    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                        labels=yb, logits=model(xb, training=True)))
                    scaled.append(loss / micro)
            dtape = lb.DistributedGradientTape(tape, optimizer=opt, micro_batches=micro)
            grads = dtape.gradient(scaled, model.trainable_variables)
            opt.apply(grads, model.trainable_variables)
            return tf.add_n(scaled)

        @tf.function(jit_compile=False, reduce_retracing=True)
        def predict(x, y):
            pred = tf.argmax(model(x, training=False), axis=1, output_type=y.dtype)
            return tf.reduce_sum(tf.cast(tf.equal(pred, y), tf.int64))

        rng = np.random.default_rng(1000 + run["seed"])
        rec = common.new_record(run, plan)
        for epoch in range(cfg["epochs"]):
            perm = rng.permutation(n_train)
            step_losses = []
            for step in range(plan["steps_per_epoch"]):
                idx = perm[step * batch + rank * local: step * batch + (rank + 1) * local]
                idx = idx[:micro * micro_size].reshape(micro, micro_size).astype(np.int32)
                step_losses.append(train_step(tf.constant(idx)))
                if is_vr:
                    common.add_gsnr(rec, opt.gsnr_diagnostics())
            loss_sum = sum(float(v) for v in step_losses)
            train_loss = float(hvd.allreduce(tf.constant(loss_sum / plan["steps_per_epoch"], tf.float64),
                                             op=hvd.Average, name="train_loss"))
            # Batch norm's moving statistics: their mean over ranks, as the torch worker.
            for v in model.non_trainable_variables:
                v.assign(hvd.allreduce(v, op=hvd.Average, name="buffer." + v.path.replace("/", ".")))
            counts = [count_correct(predict, x_test, y_test), len(x_test),
                      count_correct(predict, x_eval, y_eval), len(x_eval)]
            tot = hvd.allreduce(tf.constant(counts, tf.float64), op=hvd.Sum, name="eval").numpy()
            if not common.end_epoch(rec, i, epoch, train_loss, tot, progress):
                break
        results.append(common.end_run(rec, i, progress))
        common.write_results(cfg, results, rank)


if __name__ == "__main__":
    main(sys.argv[1])
