"""Elastic Horovod worker: ``hvd.elastic.run`` + ``TorchState`` with an hvd_lb VR optimizer.

``python elastic_worker.py OUT_DIR STEPS``: trains vr-momentum (micro_batches=2) on seeded
data, commits every step and appends ``{step, size, rank, digest}`` per step to
``OUT_DIR/worker_<pid>.jsonl``, so the test can check that ranks stay identical across
resets (growing and shrinking the job).
"""
import hashlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import hvd_lb.torch as hvd  # noqa: E402

out_dir, total = sys.argv[1], int(sys.argv[2])
hvd.init()
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
opt = hvd.DistributedOptimizer(hvd.create("vr-momentum", model, lr=0.05), named_parameters=model.named_parameters(),
                               micro_batches=2)
state = hvd.elastic.TorchState(model=model, optimizer=opt, step=0)
log = open(os.path.join(out_dir, f"worker_{os.getpid()}.jsonl"), "a", buffering=1)


@hvd.elastic.run
def train(state):
    while state.step < total:
        for m in range(2):
            gen = torch.Generator().manual_seed(1000 * state.step + 10 * hvd.rank() + m)
            x = torch.randn(16, 8, generator=gen, dtype=torch.float64)
            y = x.sum(1, keepdim=True).sin()
            (torch.nn.functional.mse_loss(model(x), y) / 2).backward()
        opt.step()
        opt.zero_grad()
        state.step += 1
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
        log.write(json.dumps({"step": state.step, "size": hvd.size(), "rank": hvd.rank(), "digest": digest}) + "\n")
        time.sleep(0.25)
        state.commit()


train(state)
