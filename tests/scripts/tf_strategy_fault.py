"""MultiWorkerMirroredStrategy worker that loses a peer: worker 1 kills itself (SIGKILL) after
3 steps of a vr-lamb custom loop; worker 0 goes on stepping and must end.

Usage: python tf_strategy_fault.py OUT_DIR TIMEOUT_SECONDS. Writes OUT_DIR/killed (the time of
the kill) and OUT_DIR/survivor (the time worker 0 saw the error, and the error's type).
"""
import json
import os
import signal
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf  # noqa: E402

out_dir, timeout = sys.argv[1], float(sys.argv[2])
strategy = tf.distribute.MultiWorkerMirroredStrategy(
    communication_options=tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout))
task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]

import keras  # noqa: E402

import hvd_lb.tf as H  # noqa: E402
import hvd_lb.tf.distribute as D  # noqa: E402

with strategy.scope():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    opt = D.DistributedOptimizer(H.create("vr-lamb", learning_rate=0.01), micro_batches=4)
    opt.build(model.trainable_variables)


@tf.function
def step(x):
    def fn(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x))) / strategy.num_replicas_in_sync
        opt.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    strategy.run(fn, args=(x,))


x = tf.random.stateless_normal([16, 8], seed=[task, 0])
try:
    for i in range(100000):
        if task == 1 and i == 3 * 4 + 2:  # in the middle of the 4th step's micro-batches
            with open(os.path.join(out_dir, "killed"), "w") as f:
                f.write(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        step(x)
except Exception as e:  # noqa: BLE001 - what the survivor sees is the measurement
    with open(os.path.join(out_dir, "survivor"), "w") as f:
        json.dump({"time": time.time(), "error": type(e).__name__, "step": i}, f)
    sys.exit(1)
