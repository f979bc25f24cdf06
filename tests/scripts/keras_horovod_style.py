"""A Keras 3 model.fit script written the way Horovod's examples teach (tensorflow2_keras_mnist.py),
with ``import hvd_lb.tf.keras as hvd`` the one changed line (horovod.tensorflow.keras is broken
on Keras 3, horovod#4290).

A Sequential model without an Input layer (unbuilt until its first batch), lr scaled by size,
DistributedOptimizer with Horovod's arguments, compile(experimental_run_tf_function=False), and
every Horovod callback: BroadcastGlobalVariablesCallback, MetricAverageCallback,
LearningRateWarmupCallback, LearningRateScheduleCallback, BestModelCheckpoint on rank 0.
Trains twice in one launch: as written, and with the one line that turns GSNR on.
Every rank writes ``OUT/keras_rank{r}.json``.
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

import hvd_lb.tf.keras as hvd  # noqa: E402  (was: import horovod.tensorflow.keras as hvd)
from hvd_lb.launch.data import load_fashion_mnist  # noqa: E402

out_dir = sys.argv[1]
hvd.init()
tf.keras.utils.set_random_seed(42 + hvd.rank())  # different initial weights: the broadcast must fix them


def shard(split, n):
    x, y = load_fashion_mnist(split)
    x, y = x[hvd.rank()::hvd.size()][:n], y[hvd.rank()::hvd.size()][:n]
    return tf.cast(x[..., None], tf.float32), tf.cast(y, tf.int64)


(x_train, y_train), (x_test, y_test) = shard("train", 1024), shard("test", 256)


def train(gsnr):
    model = tf.keras.Sequential([
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(64, activation="relu"),
        tf.keras.layers.Dropout(0.25),
        tf.keras.layers.Dense(10, activation="softmax"),
    ])
    # Horovod: adjust learning rate based on number of workers.
    scaled_lr = 0.01 * hvd.size()
    opt = tf.keras.optimizers.SGD(scaled_lr, momentum=0.9)
    if gsnr:
        opt = hvd.GSNR(opt)  # the one line that turns GSNR on
    # Horovod: add Horovod DistributedOptimizer.
    opt = hvd.DistributedOptimizer(opt, backward_passes_per_step=2, average_aggregated_gradients=True,
                                   compression=hvd.Compression.none, op=hvd.Average)
    model.compile(loss=tf.losses.SparseCategoricalCrossentropy(), optimizer=opt, metrics=["accuracy"],
                  experimental_run_tf_function=False)
    history = tf.keras.callbacks.History()
    callbacks = [
        hvd.callbacks.BroadcastGlobalVariablesCallback(0),
        hvd.callbacks.MetricAverageCallback(),
        hvd.callbacks.LearningRateWarmupCallback(initial_lr=scaled_lr, warmup_epochs=1, verbose=1),
        hvd.callbacks.LearningRateScheduleCallback(initial_lr=scaled_lr, multiplier=lambda epoch: 0.5,
                                                   start_epoch=1),
        history,
    ]
    best = os.path.join(out_dir, f"best-{int(gsnr)}.keras")
    if hvd.rank() == 0:
        checkpoint = hvd.callbacks.BestModelCheckpoint(monitor="val_loss")
        checkpoint.filepath = best
        callbacks.append(checkpoint)
    model.fit(x_train, y_train, batch_size=32, epochs=2, callbacks=callbacks, shuffle=True,
              validation_data=(x_test, y_test), verbose=2 if hvd.rank() == 0 else 0)
    return {"weights": [w.tolist() for w in model.get_weights()], "history": history.history,
            "optimizer": type(opt.inner_optimizer).__name__, "iterations": int(opt.iterations.numpy()),
            "best_saved": os.path.exists(best)}


result = {"plain": train(False), "gsnr": train(True)}
with open(os.path.join(out_dir, f"keras_rank{hvd.rank()}.json"), "w") as f:
    json.dump(result, f)
