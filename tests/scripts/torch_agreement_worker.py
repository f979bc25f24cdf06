"""Worker for tests/test_torch_agreement.py: ranks that build different DistributedOptimizers.

``horovodrun -np 2 python torch_agreement_worker.py OUT_DIR``: each case builds a model and a
DistributedOptimizer that differs on rank 1 (GSNR on rank 0 only, another rule, a ``module.``
name prefix, a frozen parameter, another micro_batches, another square_dtype, another GSNR
path) and records the
error and how long it took; ``same`` builds identical ones and steps. Writes OUT_DIR/rank{r}.json.
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

CASES = ["gsnr_on_one_rank", "rule", "name_prefix", "frozen", "micro_batches", "square_dtype", "gsnr_fused", "same"]


def case(lbt, rank, name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    named = list(model.named_parameters())
    other = rank == 1
    if name == "name_prefix" and other:
        named = [("module." + n, p) for n, p in named]
    if name == "frozen" and other:
        model[1].bias.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    if name == "gsnr_on_one_rank" and not other:
        opt = lbt.GSNR(opt)
    if name == "rule":
        opt = lbt.create("vr-lamb" if other else "vr-lars", model)
    kw = {"micro_batches": 4 if name == "micro_batches" and other else 2}
    if name == "gsnr_fused":   # compiled GSNR maths on rank 0, foreach on rank 1: float32 drift
        opt = lbt.GSNR(opt, fused=False if other else True)
    if name == "square_dtype":
        opt = lbt.GSNR(opt)
        kw["square_dtype"] = "float64" if other else None
    start = time.perf_counter()
    try:
        dist = lbt.DistributedOptimizer(opt, named_parameters=named, **kw)
        for _ in range(kw["micro_batches"]):
            model(torch.randn(5, 4)).sum().backward()
        dist.step()
        return {"error": None}
    except ValueError as e:
        return {"error": str(e), "seconds": time.perf_counter() - start}


def main():
    torch.set_num_threads(1)
    import horovod.torch as hvd
    import hvd_lb.torch as lbt
    hvd.init()
    out = {name: case(lbt, hvd.rank(), name) for name in CASES}
    with open(os.path.join(sys.argv[1], f"rank{hvd.rank()}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
