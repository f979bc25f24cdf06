"""Worker for tests/test_tf_agreement.py: ranks that build different Keras DistributedOptimizers.

``horovodrun -np 2 python tf_agreement_worker.py OUT_DIR``: each case compiles a model whose
optimizer differs on rank 1 (GSNR on rank 0 only, a frozen layer without the broadcast
callback, another micro_batches, another rule, another GSNR path) and fits it; ``same`` builds identical ones.
Records the error and the seconds until it. Writes OUT_DIR/rank{r}.json.
"""
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import numpy as np  # noqa: E402
import keras  # noqa: E402

CASES = ["gsnr_on_one_rank", "frozen", "micro_batches", "rule", "gsnr_fused", "same"]


def case(lb, rank, name):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)])
    other = rank == 1
    if name == "frozen" and other:
        model.layers[1].trainable = False
    opt = keras.optimizers.SGD(0.1)
    if name == "gsnr_on_one_rank" and not other:
        opt = lb.GSNR(opt)
    if name == "rule":
        opt = lb.create("vr-lamb" if other else "vr-lars")
    if name == "gsnr_fused":   # XLA GSNR maths on rank 0, plain ops on rank 1: float32 drift
        opt = lb.GSNR(opt, fused=not other)
    M = 4 if name == "micro_batches" and other else 2
    model.compile(optimizer=lb.DistributedOptimizer(opt, backward_passes_per_step=M), loss="mse")
    start = time.perf_counter()
    try:
        model.fit(np.ones((16, 4)), np.ones((16, 2)), batch_size=4, epochs=1, verbose=0)
        return {"error": None}
    except ValueError as e:
        return {"error": str(e), "seconds": time.perf_counter() - start}


def main():
    import hvd_lb.tf.keras as lb
    lb.init()
    out = {name: case(lb, lb.rank(), name) for name in CASES}
    with open(os.path.join(sys.argv[1], f"rank{lb.rank()}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
