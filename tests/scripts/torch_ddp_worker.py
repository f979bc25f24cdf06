"""Worker for the DDP tests: ``torchrun --nproc_per_node N torch_ddp_worker.py OUT_DIR [NAMES...]``.

Also runs under ``mpirun -np N`` with ``--mpi4py`` first: Horovod is then initialised
from an mpi4py communicator (``hvd.init(comm=MPI.COMM_WORLD)``, a sub-communicator as a
process set) and hvd_lb.torch.DistributedOptimizer runs the same parity cases.

Under torchrun (Gloo, CPU): every NAME × micro_batches 1, 2 through ``hvd_lb.torch.ddp``
(M = 2 with one bucket per parameter, and DDP rebuilds its buckets after step 1);
GSNR(torch.optim.AdamW); GradScaler and clipping; checkpoint/resume; k counted over
the model's process group.  Each rank writes ``OUT_DIR/rank{r}.json``.  Gradients are
seeded per (step, worker, micro-batch) as in torch_dist_worker.py, so the test rebuilds
every sample.
"""
import contextlib
import io
import json
import os
import sys

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from torch_dist_worker import STEPS, hp_for, init_params, micro_grads  # noqa: E402

TINY_BUCKETS = 1e-6  # MB: one parameter per bucket


class Toy(torch.nn.Module):
    """Parameters of the shapes in torch_dist_worker; forward(g) = Σ p·g, so ∂/∂p = g."""

    def __init__(self):
        super().__init__()
        self.weight, self.bias = (torch.nn.Parameter(torch.tensor(a)) for a in init_params())

    def forward(self, grads):
        return sum((p * g).sum() for p, g in zip(self.parameters(), grads))


def _dump(t):
    return t.detach().double().reshape(-1).tolist()


def _ddp(bucket_cap_mb=25.0, group=None):
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(Toy(), bucket_cap_mb=bucket_cap_mb, process_group=group)


def _steps(model, opt, M, first, last, rank, scaler=None, clip=None):
    """Steps first..last: M backward passes (M − 1 under no_sync), then the optimizer step."""
    for step in range(first, last + 1):
        for m in range(M):
            grads = [torch.tensor(g) for g in micro_grads(step, rank, m, M)]
            with model.no_sync() if m < M - 1 else contextlib.nullcontext():
                loss = model(grads)
                (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
        opt.zero_grad()


def _counting(hook, seen):
    """``hook`` that also records the bucket indices of each iteration in ``seen``."""

    def counted(state, bucket):
        seen[-1].append(bucket.index())
        if bucket.is_last():
            seen.append([])
        return hook(state, bucket)

    return counted


def run_ddp(names):
    import torch.distributed as dist
    import hvd_lb.torch as lbt
    from hvd_lb.torch import ddp as lb_ddp

    rank = dist.get_rank()
    out = {}
    seen = [[]]
    lb_ddp._comm_hook = _counting(lb_ddp._comm_hook, seen)
    for name in names:
        for M in (1, 2):
            model = _ddp(TINY_BUCKETS if M == 2 else 25.0)
            opt = lbt.create(name, model.module, **hp_for(name))
            lb_ddp.register(model, opt, micro_batches=M)
            seen[:] = [[]]
            _steps(model, opt, M, 1, STEPS, rank)
            out[f"{name}/M{M}"] = [_dump(p) for p in model.parameters()]
            if name.startswith("vr-"):
                out[f"buckets/{name}/M{M}"] = seen[:-1]

    # GSNR in front of torch.optim.AdamW (lazily built state, no broadcast step under DDP).
    for M in (1, 2):
        model = _ddp()
        opt = lbt.GSNR(torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01),
                       gamma=0.3, momentum=0.9)
        lb_ddp.register(model, opt, micro_batches=M)
        _steps(model, opt, M, 1, STEPS, rank)
        out[f"gsnr/adamw/M{M}"] = [_dump(p) for p in model.parameters()]

    # GradScaler (scale divided out of s) and clipping (s follows ḡ), micro_batches 2.
    for name in ("vr-sgd", "momentum"):
        model = _ddp()
        opt = lbt.create(name, model.module)
        lb_ddp.register(model, opt, micro_batches=2)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
        _steps(model, opt, 2, 1, STEPS, rank, scaler=scaler)
        out[f"scaler/{name}"] = [_dump(p) for p in model.parameters()]
    for name in ("vr-momentum", "lamb"):
        model = _ddp()
        opt = lbt.create(name, model.module)
        lb_ddp.register(model, opt, micro_batches=2)
        _steps(model, opt, 2, 1, STEPS, rank, clip=0.5)
        out[f"clip/{name}"] = [_dump(p) for p in model.parameters()]

    # Checkpoint after 3 steps, resume in fresh DDP objects: equal to 5 uninterrupted steps.
    for name in ("vr-adam", "vr-tvlars"):
        full = _ddp()
        fopt = lbt.create(name, full.module)
        lb_ddp.register(full, fopt, micro_batches=2)
        _steps(full, fopt, 2, 1, STEPS, rank)
        model = _ddp()
        opt = lbt.create(name, model.module)
        lb_ddp.register(model, opt, micro_batches=2)
        _steps(model, opt, 2, 1, 3, rank)
        buf = io.BytesIO()
        torch.save({"model": model.module.state_dict(), "opt": opt.state_dict()}, buf)
        buf.seek(0)
        ck = torch.load(buf)
        model = _ddp()
        model.module.load_state_dict(ck["model"])
        opt = lbt.create(name, model.module)
        opt.load_state_dict(ck["opt"])
        lb_ddp.register(model, opt, micro_batches=2)
        _steps(model, opt, 2, 4, STEPS, rank)
        out[f"ckpt/{name}"] = all(torch.equal(a, b) for a, b in zip(full.parameters(), model.parameters()))

    # micro_batches=1 but two backward passes (one under no_sync): refused on every rank.
    model = _ddp()
    opt = lbt.create("vr-sgd", model.module)
    lb_ddp.register(model, opt, micro_batches=1)
    try:
        _steps(model, opt, 2, 1, 1, rank)
        out["m1_twice_error"] = None
    except RuntimeError as e:
        out["m1_twice_error"] = str(e)

    # k counts the model's process group: a one-process group has k = 1 × 1.
    groups = [dist.new_group([r]) for r in range(dist.get_world_size())]
    model = _ddp(group=groups[rank])
    try:
        lb_ddp.register(model, lbt.create("vr-sgd", model.module), micro_batches=1)
        out["k1_error"] = None
    except ValueError as e:
        out["k1_error"] = str(e)
    return out


def run_mpi4py(names):
    """Horovod from mpi4py: COMM_WORLD, and a sub-communicator (each rank alone) as a process set."""
    from mpi4py import MPI
    import horovod.torch as hvd
    import hvd_lb.torch as lbt
    from torch_dist_worker import _backward, _leaves, mode_parity

    world = MPI.COMM_WORLD
    alone = hvd.ProcessSet(world.Split(color=world.Get_rank(), key=0))
    hvd.init(comm=world, process_sets=[alone])
    out = mode_parity(hvd, lbt, names)
    # k counts the process set: one rank alone has k = 1 × M.
    params = _leaves(init_params())
    try:
        lbt.DistributedOptimizer(lbt.create("vr-sgd", params), micro_batches=1, process_set=alone)
        out["k1_error"] = None
    except ValueError as e:
        out["k1_error"] = str(e)
    opt = lbt.DistributedOptimizer(lbt.create("vr-sgd", params, **hp_for("vr-sgd")), micro_batches=2,
                                   process_set=alone)
    for step in range(1, STEPS + 1):
        for m in range(2):
            _backward(params, micro_grads(step, hvd.rank(), m, 2))
        opt.step()
        opt.zero_grad()
    out["alone/vr-sgd/M2"] = [_dump(p) for p in params]
    # A rank that leaves first shuts Horovod down for the other, still in its own set.
    hvd.barrier()
    out["alone_size"] = alone.size()
    out["size"] = hvd.size()
    return out, hvd.rank()


def main():
    args = sys.argv[1:]
    torch.set_num_threads(1)
    if args[0] == "--mpi4py":
        out, rank = run_mpi4py(args[2:])
        out_dir = args[1]
    else:
        import torch.distributed as dist
        dist.init_process_group("gloo")
        out_dir = args[0]
        out = run_ddp(args[1:])
        out["size"] = dist.get_world_size()
        rank = dist.get_rank()
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
