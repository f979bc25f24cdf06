"""horovodrun worker: model.fit and custom loops with hvd_lb.tf, one JSON per rank.

Usage: python tf_dist_worker.py OUT_DIR. Each case starts from rank-dependent
weights and broadcasts rank 0's, so the test can replay it with the reference.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
import horovod.tensorflow as hvd  # noqa: E402

import hvd_lb.tf as H  # noqa: E402
from tf_common import (APPLIES, BATCH, EPOCHS, GSNR_HP, IN_DIM, OUT_DIM, TEST_HP, batch,  # noqa: E402
                       init_dense, keras_optimizer, shard)

keras.config.set_floatx("float64")
hvd.init()
rank, size = hvd.rank(), hvd.size()
out = {"size": size}

# Count what goes to Horovod, per call: the number of tensors.
calls = []
_grouped = hvd.grouped_allreduce


def counting_grouped(tensors, *a, **kw):
    calls.append(len(tensors))
    return _grouped(tensors, *a, **kw)


hvd.grouped_allreduce = counting_grouped
gathers = []
_allgather = hvd.allgather


def counting_allgather(tensor, *a, **kw):
    gathers.append(tensor.dtype.name)
    return _allgather(tensor, *a, **kw)


hvd.allgather = counting_allgather


def make_model():
    model = keras.Sequential([keras.Input((IN_DIM,)), keras.layers.Dense(OUT_DIM, name="dense")], name="net")
    model.set_weights(init_dense(rank))  # differs per rank until broadcast
    return model


def weights(model):
    return [w.tolist() for w in model.get_weights()]


# -- model.fit ---------------------------------------------------------------------------
FIT_CASES = [("vr-lamb", 1, False), ("vr-lamb", 2, False), ("lars", 2, True), ("vr-sgd", 1, False)]
for name, M, warm in FIT_CASES:
    model = make_model()
    opt = H.DistributedOptimizer(H.create(name, **TEST_HP[name]), micro_batches=M)
    model.compile(optimizer=opt, loss="mse")
    cbs = [H.BroadcastGlobalVariablesCallback(0), H.MetricAverageCallback()]
    if warm:
        # Horovod's warm-up over the first epoch (6 batches = 3 steps); the reference has no
        # momentum correction.
        cbs.append(H.LearningRateWarmupCallback(TEST_HP[name].get("learning_rate", 1.0), warmup_epochs=1,
                                                momentum_correction=False))
    X, y = shard(rank)
    hist = model.fit(X, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=cbs)
    out[f"fit/{name}/{M}"] = {"weights": weights(model), "loss": hist.history["loss"],
                              "diag": opt.gsnr_diagnostics(),
                              "iterations": int(opt.iterations.numpy())}

# Mixed-precision recipe: the loss-scale optimizer inside, so its finite check sees ḡ.
model = make_model()
lso = keras.optimizers.LossScaleOptimizer(H.create("vr-lamb", **TEST_HP["vr-lamb"]))
model.compile(optimizer=H.DistributedOptimizer(lso), loss="mse", auto_scale_loss=False)
X, y = shard(rank)
model.fit(X, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
          callbacks=[H.BroadcastGlobalVariablesCallback(0)])
out["fit-lso/vr-lamb/1"] = {"weights": weights(model)}

# fused=True: the rule and the GSNR maths of each variable as XLA programs, under a real all-reduce.
model = make_model()
model.compile(optimizer=H.DistributedOptimizer(H.create("vr-lamb", fused=True, **TEST_HP["vr-lamb"]),
                                               micro_batches=2), loss="mse")
X, y = shard(rank)
model.fit(X, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
          callbacks=[H.BroadcastGlobalVariablesCallback(0)])
out["fit-fused/vr-lamb/2"] = {"weights": weights(model)}


# -- custom loops ------------------------------------------------------------------------
def mse(model, X, y):
    return tf.reduce_mean(tf.square(model(X) - y))


def custom_tape(name, M, opt=None):
    model = make_model()
    opt = opt or H.create(name, **TEST_HP[name])
    H.broadcast_variables(model.variables, root_rank=0)
    tvs = model.trainable_variables

    @tf.function
    def step(Xs, ys):
        with tf.GradientTape(persistent=M > 1) as tape:
            losses = [mse(model, X, y) for X, y in zip(Xs, ys)]
        tape = H.DistributedGradientTape(tape, optimizer=opt, micro_batches=M,
                                         process_set=hvd.global_process_set)
        grads = tape.gradient(losses if M > 1 else losses[0], tvs)
        opt.apply(grads, tvs)

    for t in range(APPLIES // M):
        bs = [batch(rank, t * M + m) for m in range(M)]
        step([tf.constant(b[0]) for b in bs], [tf.constant(b[1]) for b in bs])
    return weights(model)


def custom_optimizer(name, M):
    model = make_model()
    opt = H.DistributedOptimizer(H.create(name, **TEST_HP[name]), micro_batches=M)
    H.broadcast_variables(model.variables, root_rank=0)
    tvs = model.trainable_variables

    @tf.function
    def step(X, y):
        with tf.GradientTape() as tape:
            loss = mse(model, X, y)
        opt.apply(tape.gradient(loss, tvs), tvs)

    for i in range(APPLIES):
        X, y = batch(rank, i)
        step(tf.constant(X), tf.constant(y))
    return weights(model)


for name, M in [("vr-momentum", 1), ("vr-adam", 2), ("sngm", 1)]:
    out[f"tape/{name}/{M}"] = {"weights": custom_tape(name, M)}
for name, M in [("vr-tvlars", 2)]:
    out[f"apply/{name}/{M}"] = {"weights": custom_optimizer(name, M)}

# -- GSNR in front of Keras' own optimizers (SPEC §7) -----------------------------------------
model = make_model()
opt = H.DistributedOptimizer(H.GSNR(keras_optimizer("adamw"), **GSNR_HP), micro_batches=2)
model.compile(optimizer=opt, loss="mse")
X, y = shard(rank)
model.fit(X, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
          callbacks=[H.BroadcastGlobalVariablesCallback(0)])
out["fit/gsnr-adamw/2"] = {"weights": weights(model), "iterations": int(opt.iterations.numpy())}
out["tape/gsnr-sgd/1"] = {"weights": custom_tape("gsnr-sgd", 1, H.GSNR(keras_optimizer("sgd"), **GSNR_HP))}

# -- all-reduce count per step (eager, one apply) ------------------------------------------
for name in ("momentum", "vr-momentum"):
    model = make_model()
    opt = H.DistributedOptimizer(H.create(name))
    calls.clear()
    opt.apply([tf.ones((IN_DIM, OUT_DIM), tf.float64), tf.ones(OUT_DIM, tf.float64)],
              model.trainable_variables)
    out[f"calls/{name}"] = list(calls)

# -- fp16 compression of ḡ; s stays float32 -------------------------------------------------
g = tf.constant([1.0 + rank, -0.5, 0.25 * (rank + 1)], tf.float32)
calls.clear()
mean, sq = H.reduce_statistics([g], [tf.square(g)], compression="fp16")
out["compressed_calls"] = list(calls)
out["compressed"] = {"mean": mean[0].numpy().tolist(), "sq": sq[0].numpy().tolist(),
                     "mean_dtype": mean[0].dtype.name, "sq_dtype": sq[0].dtype.name}

# -- bfloat16 s: one all-gather of the 16-bit patterns beside the all-reduce of ḡ ------------
g = tf.constant([[0.5 + rank, -1.0], [0.25, 2.0 * rank]], tf.float32)
s = tf.constant([[1.0 + rank / 3, 0.1 * (rank + 1)], [3.14159, 7.0]], tf.float32)
calls.clear()
gathers.clear()
mean, sq = H.reduce_statistics([g], [s], square_dtype="bfloat16", process_set=hvd.global_process_set)
out["bf16"] = {"mean": mean[0].numpy().tolist(), "sq": sq[0].numpy().tolist(), "sq_dtype": sq[0].dtype.name,
               "calls": list(calls), "gathers": list(gathers)}

with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump(out, f)
