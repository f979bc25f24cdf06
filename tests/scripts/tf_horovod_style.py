"""A custom GradientTape loop written the way Horovod's tensorflow2_mnist.py teaches, with
``import hvd_lb.tf as hvd`` the one changed line (and ``opt.variables``, a property in Keras 3).

tf.function step with DistributedGradientTape(tape, compression=...), opt.apply_gradients, and
broadcast_variables of the model's and optimizer's variables after the first step. Trains twice
in one launch: as written, and with the one line that turns GSNR on. Every rank writes
``OUT/tape_rank{r}.json``.
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

import hvd_lb.tf as hvd  # noqa: E402  (was: import horovod.tensorflow as hvd)
from hvd_lb.launch.data import load_fashion_mnist  # noqa: E402

out_dir = sys.argv[1]
hvd.init()
tf.keras.utils.set_random_seed(7 + hvd.rank())

x, y = load_fashion_mnist("train")
x, y = x[hvd.rank()::hvd.size()][:2048], y[hvd.rank()::hvd.size()][:2048]
dataset = tf.data.Dataset.from_tensor_slices((tf.cast(x[..., None], tf.float32), tf.cast(y, tf.int64)))
dataset = dataset.repeat().shuffle(1024, seed=hvd.rank()).batch(64)


def train(gsnr, steps=40):
    model = tf.keras.Sequential([tf.keras.layers.Flatten(), tf.keras.layers.Dense(64, activation="relu"),
                                 tf.keras.layers.Dense(10, activation="softmax")])
    loss = tf.losses.SparseCategoricalCrossentropy()
    # Horovod: adjust learning rate based on number of workers.
    opt = tf.optimizers.Adam(0.001 * hvd.size())
    if gsnr:
        opt = hvd.GSNR(opt)  # the one line that turns GSNR on

    @tf.function
    def training_step(images, labels, first_batch):
        with tf.GradientTape() as tape:
            probs = model(images, training=True)
            loss_value = loss(labels, probs)
        # Horovod: add Horovod Distributed GradientTape.
        tape = hvd.DistributedGradientTape(tape, compression=hvd.Compression.none)
        grads = tape.gradient(loss_value, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        # Horovod: broadcast initial variable states from rank 0 after the first step.
        if first_batch:
            hvd.broadcast_variables(model.variables, root_rank=0)
            hvd.broadcast_variables(opt.variables, root_rank=0)
        return loss_value

    losses = []
    for batch, (images, labels) in enumerate(dataset.take(steps)):
        losses.append(float(training_step(images, labels, batch == 0)))
    acc = tf.keras.metrics.SparseCategoricalAccuracy()
    acc.update_state(y[:512], model(tf.cast(x[:512, ..., None], tf.float32)))
    mean_acc = float(hvd.allreduce(tf.constant(float(acc.result())), op=hvd.Average))
    return {"weights": [w.tolist() for w in model.get_weights()], "losses": losses, "accuracy": mean_acc,
            "optimizer": type(opt).__name__, "diag": opt.gsnr_diagnostics() if gsnr else {}}


result = {"plain": train(False), "gsnr": train(True)}
with open(os.path.join(out_dir, f"tape_rank{hvd.rank()}.json"), "w") as f:
    json.dump(result, f)
