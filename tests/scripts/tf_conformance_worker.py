"""horovodrun worker for tests/test_keras_conformance.py: 16-bit variables and None gradients.

Usage: python tf_conformance_worker.py OUT_DIR; one JSON per rank.
"""
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import horovod.tensorflow as hvd  # noqa: E402

import hvd_lb.tf as H  # noqa: E402
from hvd_lb import rules  # noqa: E402
from tf_common import TEST_HP, init_params, sample_grads  # noqa: E402

LOW_STEPS = 5
warnings.filterwarnings("ignore", message=".*k = .*")
hvd.init()
rank = hvd.rank()
out = {}


def case(key, fn):
    """out[key] = fn(), or the error it raised (raised on every rank alike, before any collective)."""
    try:
        out[key] = fn()
    except Exception as e:  # noqa: BLE001 (reported to the test)
        out[key] = {"error": f"{type(e).__name__}: {e}"[:500]}


def low(name, dtype):
    variables = [keras.Variable(v.astype(dtype), name=n) for n, v in init_params().items()]
    opt = H.DistributedOptimizer(H.create(name, **TEST_HP[name]))
    step = tf.function(lambda grads: opt.apply(grads, variables))
    for t in range(LOW_STEPS):
        step([tf.constant(x, dtype) for x in sample_grads(t, rank, [v.shape for v in variables])])
    return [v.numpy().astype(np.float64).tolist() for v in variables]


def tape_bfloat16():
    w = keras.Variable(np.ones(3, "bfloat16"))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(w * tf.constant([1.0, 2.0, 3.0], tf.bfloat16) * float(rank + 1))
    (g,) = H.DistributedGradientTape(tape).gradient(loss, [w])
    return {"dtype": g.dtype.name, "value": tf.cast(g, tf.float64).numpy().tolist()}

# 16-bit variables and gradients, every rule behind DistributedOptimizer (k = 2).
for dtype in ("bfloat16", "float16"):
    for name in rules.NAMES:
        case(f"low/{name}/{dtype}", lambda: low(name, dtype))
# bfloat16 through DistributedGradientTape (Horovod has no bfloat16 all-reduce: float32 on the wire).
case("tape/bfloat16", tape_bfloat16)


# None gradients: "same" = the same None set on every rank; "mixed" = b is None on rank 0 only.
def none_case(pattern, graph):
    a, b, c = (keras.Variable(np.ones((2, 2), "float32"), name=n) for n in "abc")
    opt = H.DistributedOptimizer(H.create("momentum", learning_rate=0.1, weight_decay=0.1))
    b_grad = None if pattern == "same" or rank == 0 else tf.fill((2, 2), 2.0)

    def apply():
        opt.apply([tf.fill((2, 2), float(rank + 1)), b_grad, None], [a, b, c])

    run = tf.function(apply) if graph else apply
    for _ in range(2):
        run()
    slots = opt.inner_optimizer.slots()["momentum_buffer"]
    return {"weights": [v.numpy().tolist() for v in (a, b, c)], "momentum": [s.numpy().tolist() for s in slots]}


for pattern in ("same", "mixed"):
    for graph in (False, True):
        case(f"none/{pattern}/{'graph' if graph else 'eager'}", lambda: none_case(pattern, graph))

with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump(out, f)
