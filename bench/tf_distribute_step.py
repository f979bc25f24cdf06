"""Step time under tf.distribute: vr-lamb and GSNR(AdamW) against plain Keras AdamW, same strategy.

    python bench/tf_distribute_step.py [--steps 20] [--hidden 1024]          # MirroredStrategy, 2 logical CPUs
    python -m hvd_lb.launch.tfrun -np 2 -- python bench/tf_distribute_step.py --mwms   # 2 MWMS workers

Four compiled ``strategy.run`` train steps on the same MLP and data (global batch 64),
timed in interleaved rounds (bench/_timing.py) so load on the machine hits them alike:
  adamw        keras.optimizers.AdamW: Keras's own all-reduce of the gradients, then its step
  lamb         hvd_lb.tf.distribute.DistributedOptimizer(create("lamb")): one all-reduce of ḡ
  vr-lamb      DistributedOptimizer(create("vr-lamb")): [ḡ, s] in one all-reduce, then GSNR + LAMB
  gsnr-adamw   DistributedOptimizer(GSNR(keras AdamW)): the same, GSNR in front of Keras AdamW
Prints (worker 0) median wall and CPU time per step and the ratios to adamw, and the load average.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--mwms", action="store_true")
p.add_argument("--steps", type=int, default=20)
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--hidden", type=int, default=1024)
args = p.parse_args()

if args.mwms:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
else:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    task = 0

import keras  # noqa: E402

import hvd_lb.tf as H  # noqa: E402
import hvd_lb.tf.distribute as D  # noqa: E402
from _timing import time_rounds  # noqa: E402

R, IN, CLASSES, GLOBAL = strategy.num_replicas_in_sync, 784, 10, 64


def optimizer(kind):
    if kind == "adamw":
        return keras.optimizers.AdamW(1e-3, weight_decay=0.01)
    if kind == "gsnr-adamw":
        return D.DistributedOptimizer(H.GSNR(keras.optimizers.AdamW(1e-3, weight_decay=0.01), momentum=0.9))
    return D.DistributedOptimizer(H.create(kind, learning_rate=1e-3, weight_decay=0.01))


def make(kind):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((IN,)), keras.layers.Dense(args.hidden, activation="relu"),
                                  keras.layers.Dense(args.hidden, activation="relu"), keras.layers.Dense(CLASSES)])
        opt = optimizer(kind)
        opt.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    tvs = model.trainable_variables

    @tf.function
    def step(x, y):
        def fn(x, y):
            with tf.GradientTape() as tape:
                loss = tf.nn.compute_average_loss(loss_fn(y, model(x)), global_batch_size=GLOBAL)
            opt.apply(tape.gradient(loss, tvs), tvs)
        strategy.run(fn, args=(x, y))

    data = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices(
        (np.random.default_rng(1).normal(size=(GLOBAL, IN)).astype("float32"),
         np.random.default_rng(2).integers(0, CLASSES, GLOBAL))).batch(GLOBAL).repeat())
    it = iter(data)
    batch = next(it)
    return lambda: step(*batch)


KINDS = ["adamw", "lamb", "vr-lamb", "gsnr-adamw"]
runs = {k: make(k) for k in KINDS}
n_params = 784 * args.hidden + args.hidden * args.hidden + args.hidden * CLASSES + 2 * args.hidden + CLASSES
med, first = time_rounds(runs, lambda: None, args.warmup, args.steps)
if task == 0:
    load = os.getloadavg()
    print(f"{'MultiWorkerMirroredStrategy, 2 workers' if args.mwms else 'MirroredStrategy, 2 logical CPUs'}; "
          f"MLP {n_params / 1e6:.2f}M parameters, global batch {GLOBAL}; load average {load[0]:.1f} {load[1]:.1f} "
          f"{load[2]:.1f} on {os.cpu_count()} cores")
    for k in KINDS:
        print(f"{k:12s} wall {med[k] * 1e3:8.1f} ms  cpu {med[k + '@cpu'] * 1e3:8.1f} ms  "
              f"ratio to adamw: wall {med[k] / med['adamw']:.2f}  cpu {med[k + '@cpu'] / med['adamw@cpu']:.2f}  "
              f"first step {first[k]:.1f} s")
