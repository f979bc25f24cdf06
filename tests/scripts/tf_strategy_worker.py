"""tf.distribute worker: every rule and GSNR(AdamW) under MirroredStrategy or MultiWorkerMirroredStrategy.

Usage: python tf_strategy_worker.py OUT_DIR mirrored|mwms [CASE ...]
  mirrored: one process, 2 logical CPU devices; mwms: one replica per process, TF_CONFIG set.
Each replica r trains on the batches tf_common.batch(r, i) the horovodrun workers use, so the
tests replay the same samples through the float64 reference (tf_common.replay). Writes
OUT_DIR/rank{task}.json: weights per case (every replica's copy), collective counts.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

out_dir, mode, *cases = sys.argv[1:]
if mode == "mirrored":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    task = 0
else:
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(timeout_seconds=60))
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]

import keras  # noqa: E402

import hvd_lb.tf as H  # noqa: E402
import hvd_lb.tf.distribute as D  # noqa: E402
from hvd_lb import rules  # noqa: E402
from tf_common import (APPLIES, BATCH, IN_DIM, OUT_DIM, TEST_HP, batch, init_dense,  # noqa: E402
                       keras_optimizer)

keras.config.set_floatx("float64")
keras.config.disable_traceback_filtering()
R = strategy.num_replicas_in_sync
out = {"replicas": R, "task": task}

# What goes into the collectives, per traced call: the number of tensors (one flat buffer per dtype).
calls = []
_batch_reduce = strategy.extended.batch_reduce_to


def counting(reduce_op, pairs, options=None):
    calls.append(len(pairs))
    return _batch_reduce(reduce_op, pairs, options)


strategy.extended.batch_reduce_to = counting


def replica_ids():
    """The global replica ids this process feeds, in local order."""
    return list(range(R)) if mode == "mirrored" else [task]


def dataset(M, steps, start=0):
    """Per-replica batches of the horovodrun workers' data: replica r gets batch(r, i)."""
    def make(ctx):
        ids = replica_ids()
        xs, ys = [], []
        for i in range(start, start + steps):
            for r in ids:
                x, y = batch(r, i)
                xs.append(x)
                ys.append(y)
        return tf.data.Dataset.from_tensor_slices((np.stack(xs), np.stack(ys)))
    return strategy.distribute_datasets_from_function(make)


def make_model():
    model = keras.Sequential([keras.Input((IN_DIM,)), keras.layers.Dense(OUT_DIM, name="dense")], name="net")
    model.set_weights(init_dense(0))
    return model


def replica_weights(model):
    """Every local replica's copy of every variable."""
    return [[np.asarray(x).tolist() for x in strategy.experimental_local_results(v.value)]
            for v in model.weights]


def build(kind, M):
    if kind == "gsnr-adamw":
        opt = H.GSNR(keras_optimizer("adamw"), gamma=0.3, momentum=0.5)
    else:
        opt = H.create(kind, **TEST_HP[kind])
    return D.DistributedOptimizer(opt, micro_batches=M)


def run_fit(kind, M, wrapped=True):
    with strategy.scope():
        model = make_model()
        opt = build(kind, M) if wrapped else H.create(kind, **TEST_HP[kind])
        model.compile(optimizer=opt, loss="mse")
    n0 = len(calls)
    model.fit(dataset(M, APPLIES), epochs=1, steps_per_epoch=APPLIES, verbose=0)
    inner = opt.inner_optimizer if wrapped else opt
    return {"weights": replica_weights(model), "iterations": int(inner.iterations.numpy()),
            "calls": calls[n0:], "state": [np.asarray(v.numpy()).tolist() for v in inner.variables]}


def run_loop(kind, M, unused=False):
    """A custom loop: strategy.run of a tf.function step, loss scaled by 1/R as compute_average_loss.
    ``unused``: one more variable, outside the loss (a None gradient on every replica)."""
    with strategy.scope():
        model = make_model()
        opt = build(kind, M)
        extra = keras.Variable(np.ones((2, 2)), name="unused") if unused else None
        tvs = model.trainable_variables + ([extra] if unused else [])
        opt.build(tvs)  # in the scope, before the first traced step (as for any optimizer under a strategy)

    @tf.function
    def step(x, y):
        def fn(x, y):
            with tf.GradientTape() as tape:
                per_example = tf.reduce_mean(tf.square(model(x) - y), axis=-1)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=BATCH * R)
            opt.apply(tape.gradient(loss, tvs), tvs)
        strategy.run(fn, args=(x, y))

    for x, y in dataset(M, APPLIES):
        step(x, y)
    out = {"weights": replica_weights(model), "iterations": int(opt.inner_optimizer.iterations.numpy())}
    if unused:
        out["unused"] = [np.asarray(x).tolist() for x in strategy.experimental_local_results(extra.value)]
    return out


def run_sparse(kind, M):
    """An Embedding model: its gradient is a tf.IndexedSlices, reduced dense."""
    import warnings

    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((2,), dtype="int32"), keras.layers.Embedding(10, 3),
                                  keras.layers.Flatten(), keras.layers.Dense(1)])
        opt = build(kind, M)
        model.compile(optimizer=opt, loss="mse")
    before = [w.copy() for w in model.get_weights()]

    def make(ctx):
        rng = np.random.default_rng(ctx.input_pipeline_id)
        n = BATCH * len(replica_ids()) * APPLIES
        return tf.data.Dataset.from_tensor_slices((rng.integers(0, 10, (n, 2)).astype("int32"),
                                                   rng.normal(size=(n, 1)))).batch(BATCH)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(strategy.distribute_datasets_from_function(make), epochs=1, steps_per_epoch=APPLIES, verbose=0)
    return {"weights": replica_weights(model), "moved": [bool(np.any(w != b)) for w, b in
                                                         zip(model.get_weights(), before)],
            "warned": any("sparse gradients are densified" in str(w.message) for w in caught)}


def run_resume(kind, M, how, tmp):
    """Half the micro-batches, save (``.keras`` or ``tf.train.Checkpoint``), a fresh model and
    optimizer in the scope restored from it, the other half: must equal the uninterrupted fit."""
    half = APPLIES // 2
    with strategy.scope():
        model = make_model()
        opt = build(kind, M)
        model.compile(optimizer=opt, loss="mse")
    model.fit(dataset(M, half), epochs=1, steps_per_epoch=half, verbose=0)
    path = os.path.join(tmp, f"{kind}-{M}-{how}-{task}")
    if how == "keras":
        model.save(path + ".keras")
        with strategy.scope():
            model = keras.models.load_model(path + ".keras")
        opt = model.optimizer
    else:
        ckpt = tf.train.Checkpoint(model=model, optimizer=opt)
        saved = ckpt.write(path)
        with strategy.scope():
            model = make_model()
            model.set_weights([np.zeros_like(w) for w in init_dense(0)])
            opt = build(kind, M)
            model.compile(optimizer=opt, loss="mse")
            opt.build(model.trainable_variables)
        tf.train.Checkpoint(model=model, optimizer=opt).read(saved).assert_consumed()
    model.fit(dataset(M, half, half), epochs=1, steps_per_epoch=half, verbose=0)
    return {"weights": replica_weights(model), "iterations": int(opt.inner_optimizer.iterations.numpy()),
            "state": [np.asarray(v.numpy()).tolist() for v in opt.inner_optimizer.variables]}


t0 = time.time()
for case in cases:
    kind, where, M = case.split(":")
    M = int(M)
    if where == "fit":
        out[case] = run_fit(kind, M)
    elif where == "bare":  # built in the scope without the wrapper
        out[case] = run_fit(kind, M, wrapped=False)
    elif where in ("keras", "ckpt"):  # the uninterrupted run is kind:fit:M
        out[case] = run_resume(kind, M, where, out_dir)
    elif where == "sparse":
        out[case] = run_sparse(kind, M)
    else:
        out[case] = run_loop(kind, M, unused=where == "loopnone")
out["seconds"] = time.time() - t0
with open(os.path.join(out_dir, f"rank{task}.json"), "w") as f:
    json.dump(out, f)
