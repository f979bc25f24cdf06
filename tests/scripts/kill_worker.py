"""A training loop in which rank 1 SIGKILLs itself mid-step (after its first backward of step 3).

``python kill_worker.py OUT_DIR``: rank 0 writes ``OUT_DIR/rank0_started`` when training starts;
the job must end (non-zero) soon after the kill instead of hanging in the all-reduce.
"""
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import hvd_lb.torch as hvd  # noqa: E402

hvd.init()
torch.set_num_threads(1)
model = torch.nn.Linear(64, 64)
opt = hvd.DistributedOptimizer(hvd.create("vr-lamb", model), named_parameters=model.named_parameters(),
                               micro_batches=2)
if hvd.rank() == 0:
    open(os.path.join(sys.argv[1], "rank0_started"), "w").close()
for step in range(1, 1000):
    for m in range(2):
        model(torch.randn(32, 64)).pow(2).mean().backward()
        if step == 3 and m == 0 and hvd.rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
    opt.step()
    opt.zero_grad()
