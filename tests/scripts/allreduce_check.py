"""Worker script: all-reduce known values with horovod.torch or horovod.tensorflow.

Usage under horovodrun: python allreduce_check.py torch|tensorflow OUT_DIR
Each rank writes OUT_DIR/rank{r}.json with what it received.
"""
import json
import os
import sys

framework, out_dir = sys.argv[1], sys.argv[2]

if framework == "torch":
    import horovod.torch as hvd
    import torch

    hvd.init()
    r = hvd.rank()
    g = torch.tensor([r + 1.0, -2.0 * (r + 1), 0.5], dtype=torch.float64)
    mean = hvd.allreduce(g, op=hvd.Average, name="g")
    total = hvd.allreduce(g, op=hvd.Sum, name="g_sum")
    grouped = hvd.grouped_allreduce([g, g * g], op=hvd.Average, name="stats")
    to_list = lambda t: t.tolist()
else:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import horovod.tensorflow as hvd
    import tensorflow as tf

    hvd.init()
    r = hvd.rank()
    g = tf.constant([r + 1.0, -2.0 * (r + 1), 0.5], dtype=tf.float64)
    mean = hvd.allreduce(g, op=hvd.Average, name="g")
    total = hvd.allreduce(g, op=hvd.Sum, name="g_sum")
    grouped = tf.function(lambda a: hvd.grouped_allreduce([a, a * a], op=hvd.Average))(g)
    to_list = lambda t: t.numpy().tolist()

with open(os.path.join(out_dir, f"rank{r}.json"), "w") as f:
    json.dump({"size": hvd.size(), "mean": to_list(mean), "sum": to_list(total),
               "grouped_mean": to_list(grouped[0]), "grouped_sq": to_list(grouped[1])}, f)
