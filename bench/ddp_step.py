"""Step time of DDP + hvd_lb VR vs DDP + plain AdamW (not a test).

Run:  OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 bench/ddp_step.py

The ~10M-parameter MLP of bench/torch_step.py under DistributedDataParallel (Gloo, CPU),
every variant measured side by side in one run (round-robin, barrier before each step,
medians), ratios to DDP + torch.optim.AdamW(foreach), split into forward + backward (with
DDP's all-reduce, where the hook works) and the optimizer step (where the GSNR transform works):
  * ``gsnr-adamw``: GSNR(AdamW) with ``hvd_lb.torch.ddp.register`` (hook sends [g, g²]);
  * ``lamb`` (no hook: DDP's own all-reduce) and ``vr-lamb`` (hook);
  * one all-reduce of every gradient (the size of the extra s traffic).
"""
import argparse
import contextlib
import copy
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from torch_step import mlp_setup  # noqa: E402

KINDS = ("adamw", "gsnr-adamw", "lamb", "vr-lamb")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--micro-batches", type=int, default=1)
    args = ap.parse_args()

    import hvd_lb.torch as lbt
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    M = args.micro_batches
    base, n_params, x, y, loss_fn = mlp_setup(args.batch)

    def make(kind):
        model = DDP(copy.deepcopy(base))
        if kind == "adamw":
            return model, torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        if kind == "gsnr-adamw":
            opt = lbt.GSNR(torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True), momentum=0.9)
        else:
            opt = lbt.create(kind, model.module, lr=1e-3)
        lbt.ddp.register(model, opt, micro_batches=M)
        return model, opt

    setups = {k: make(k) for k in KINDS}
    flat = torch.randn(n_params)

    def train_step(kind):
        """(forward + backward with DDP's all-reduce, optimizer step) in seconds."""
        model, opt = setups[kind]
        t0 = time.perf_counter()
        for xm, ym, m in zip(x.chunk(M), y.chunk(M), range(M)):
            with model.no_sync() if m < M - 1 else contextlib.nullcontext():
                loss_fn(model(xm), ym).backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad()
        return t1 - t0, time.perf_counter() - t1

    times = {k: [] for k in KINDS + ("allreduce",)}
    for it in range(args.warmup + args.iters):
        for k in times:
            dist.barrier()
            t0 = time.perf_counter()
            if k == "allreduce":
                dist.all_reduce(flat)
                parts = (time.perf_counter() - t0, 0.0)
            else:
                parts = train_step(k)
            if it >= args.warmup:
                times[k].append((time.perf_counter() - t0, *parts))
    med = {k: [statistics.median(c) for c in zip(*v)] for k, v in times.items()}

    if dist.get_rank() == 0:
        a = med["adamw"][0]
        ar = med["allreduce"][0]
        print(f"model: {n_params / 1e6:.2f}M parameters, {dist.get_world_size()} workers (Gloo, CPU), "
              f"batch {args.batch}/worker in {M} micro-batch(es), {args.iters} timed iterations (medians)")
        print(f"  {'variant':26s} {'step ms':>8s} {'/ AdamW':>8s} {'fwd+bwd+comm':>13s} {'opt.step':>9s}")
        labels = {"adamw": "DDP + AdamW", "gsnr-adamw": "DDP + GSNR(AdamW)",
                  "lamb": "DDP + hvd_lb lamb", "vr-lamb": "DDP + hvd_lb vr-lamb"}
        for k in KINDS:
            tot, fb, st = med[k]
            print(f"  {labels[k]:26s} {1e3 * tot:8.2f} {tot / a:8.3f} {1e3 * fb:13.2f} {1e3 * st:9.2f}")
        print(f"  {'one all-reduce, all grads':26s} {1e3 * ar:8.2f} {ar / a:8.3f}")
        for k, ref in (("gsnr-adamw", "adamw"), ("vr-lamb", "lamb")):
            hook = med[k][1] - med[ref][1]
            step = med[k][2] - med[ref][2]
            print(f"{k} over {ref}: hook (s in the all-reduce) +{1e3 * hook:.2f} ms = {hook / ar:.2f} x one "
                  f"all-reduce; GSNR transform in the step +{1e3 * step:.2f} ms")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
