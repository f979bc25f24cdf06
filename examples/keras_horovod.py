"""Horovod Keras training with model.fit, before and after hvd_lb.

keras_horovod.py is written the way Horovod's docs teach (horovod.tensorflow.keras);
on Keras 3 (TF >= 2.16) its DistributedOptimizer and callbacks no longer work.
keras_hvd_lb.py is the same script on hvd_lb, which runs on Keras 3: four lines differ.
Run either with:  horovodrun -np 2 -H localhost:2 python examples/<file> --epochs 2
"""
import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import tensorflow as tf
import horovod.tensorflow.keras as hvd

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--batch-size", type=int, default=256, help="per worker")
parser.add_argument("--lr", type=float, default=0.05)
args = parser.parse_args()

hvd.init()
tf.keras.utils.set_random_seed(0)

# Synthetic 10-class data: each worker draws its own shard.
centers = np.random.default_rng(0).normal(size=(10, 64)).astype("float32") * 2
rng = np.random.default_rng(1 + hvd.rank())
y = rng.integers(0, 10, size=4096)
x = centers[y] + rng.normal(size=(4096, 64)).astype("float32")

model = tf.keras.Sequential([
    tf.keras.Input((64,)),
    tf.keras.layers.Dense(128, activation="relu"),
    tf.keras.layers.LayerNormalization(),
    tf.keras.layers.Dense(10),
])
opt = tf.keras.optimizers.SGD(learning_rate=args.lr * hvd.size(), momentum=0.9)
opt = hvd.DistributedOptimizer(opt)
model.compile(optimizer=opt, metrics=["accuracy"],
              loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
callbacks = [hvd.callbacks.BroadcastGlobalVariablesCallback(0), hvd.callbacks.MetricAverageCallback()]
model.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, callbacks=callbacks,
          verbose=2 if hvd.rank() == 0 else 0)
