"""Run one of Horovod's elastic TF2 examples (hvd_lb copies) and record what each rank holds.

``python tf_elastic_probe.py SCRIPT OUT_DIR [--gsnr] [--pace SECONDS]``: runs SCRIPT unchanged
(``runpy``) and appends to ``OUT_DIR/worker_<pid>.jsonl`` one row per commit — ``{rank, size,
step, gsnr_step, digest}``, step = the base optimizer's steps, gsnr_step = the GSNR's, digest = SHA-256 of every model
and optimizer variable — and a ``final`` row when the script returns. ``--gsnr`` puts
``hvd.GSNR`` in front of the script's optimizer, as the README's one extra line does;
``--pace`` sleeps after each commit so that the test can grow and shrink the job mid-run.
"""
import argparse
import hashlib
import json
import os
import runpy
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import hvd_lb.tf as lb  # noqa: E402
import hvd_lb.tf.keras as lbk  # noqa: E402
from hvd_lb.tf.elastic import TensorFlowKerasState  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("script")
parser.add_argument("out_dir")
parser.add_argument("--gsnr", action="store_true")
parser.add_argument("--pace", type=float, default=0.0)
args = parser.parse_args()
log = open(os.path.join(args.out_dir, f"worker_{os.getpid()}.jsonl"), "a", buffering=1)


def record(state, **extra):
    opt = base = state.optimizer
    gsnr = opt if isinstance(opt, lb.GSNR) else None
    while hasattr(base, "inner_optimizer"):  # DistributedOptimizer, GSNR
        base = base.inner_optimizer
        gsnr = base if isinstance(base, lb.GSNR) else gsnr
    values = [v.numpy().tobytes() for v in list(state.model.variables) + list(opt.variables)]
    log.write(json.dumps({"rank": lb.rank(), "size": lb.size(), "step": int(base.iterations.numpy()),
                          "gsnr_step": None if gsnr is None else int(gsnr.iterations.numpy()),
                          "digest": hashlib.sha256(b"".join(values)).hexdigest(), **extra}) + "\n")


save = TensorFlowKerasState.save


def save_and_record(self):
    save(self)
    record(self)
    time.sleep(args.pace)


TensorFlowKerasState.save = save_and_record
if args.gsnr:
    class GSNRInFront(lbk.DistributedOptimizer):
        def __init__(self, optimizer, *a, **kw):
            super().__init__(lb.GSNR(optimizer), *a, **kw)

    lbk.DistributedOptimizer = GSNRInFront

sys.argv = [args.script]
scope = runpy.run_path(args.script, run_name="__main__")
record(scope["state"], final=True)
