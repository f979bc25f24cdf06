"""horovodrun worker for issue 12's TF cases: ranks that differ must not hang or diverge.

Usage: python tf_fault_worker.py OUT_DIR CASE..., CASE in
  restore  rank 0 load_model()s a saved model, the others build a fresh one (other variable
           names), BroadcastGlobalVariablesCallback, model.fit;
  unused   a branch used on rank 0 only (None gradient on the others): model.fit and a
           DistributedGradientTape loop;
  micro    micro_batches 1 on rank 0, 2 elsewhere: must raise, not hang.
Each rank writes rank{r}.json with the weights per case.
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import horovod.tensorflow as hvd  # noqa: E402

import hvd_lb.tf as lb  # noqa: E402

hvd.init()
rank, out_dir, cases = hvd.rank(), sys.argv[1], sys.argv[2:]
out = {}
rng = np.random.default_rng(rank)  # different data per rank
X, y = rng.normal(size=(16, 4)).astype("float32"), rng.normal(size=(16, 2)).astype("float32")


def weights(model):
    return [w.tolist() for w in model.get_weights()]


def dense_model(seed):
    init = keras.initializers.RandomNormal(seed=seed)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, kernel_initializer=init)])


if "restore" in cases:
    path = os.path.join(out_dir, "saved.keras")
    if rank == 0:
        saved = dense_model(seed=1)
        saved.compile(optimizer=lb.DistributedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9)), loss="mse")
        saved.optimizer.build(saved.trainable_variables)
        saved.save(path)
    hvd.allreduce(tf.constant(0.0), name="saved")  # barrier: the file exists
    if rank == 0:
        model = keras.saving.load_model(path)
    else:
        model = dense_model(seed=2)
        model.compile(optimizer=lb.DistributedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9)), loss="mse")
    model.fit(X, y, batch_size=4, epochs=1, verbose=0, callbacks=[lb.BroadcastGlobalVariablesCallback(0)])
    out["restore"] = weights(model)


class TwoBranches(keras.Model):
    """Branch a on rank 0, branch b elsewhere: the other branch's gradient is None."""

    def __init__(self):
        super().__init__()
        init = keras.initializers.Constant(0.5)
        self.a = keras.layers.Dense(2, kernel_initializer=init)
        self.b = keras.layers.Dense(2, kernel_initializer=init, use_bias=False)

    def build(self, shape):
        self.a.build(shape)
        self.b.build(shape)

    def call(self, x):
        return self.a(x) if rank == 0 else self.b(x)


if "unused" in cases:
    model = TwoBranches()
    model.build((None, 4))
    model.compile(optimizer=lb.DistributedOptimizer(keras.optimizers.SGD(0.1)), loss="mse")
    model.fit(X, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    out["unused/fit"] = weights(model)

    model = TwoBranches()
    model.build((None, 4))
    opt = keras.optimizers.SGD(0.1)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(xb) - yb))
        tape = lb.DistributedGradientTape(tape)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return grads

    grads = step(X[:4], y[:4])
    out["unused/tape"] = weights(model)
    out["unused/tape_grads"] = [g.numpy().tolist() for g in grads]

if "micro" in cases:
    model = dense_model(seed=1)
    model.compile(optimizer=lb.DistributedOptimizer(keras.optimizers.SGD(0.1), micro_batches=1 + (rank > 0)),
                  loss="mse")
    model.fit(X, y, batch_size=4, epochs=2, verbose=0)
    out["micro"] = weights(model)

with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(out, f)
