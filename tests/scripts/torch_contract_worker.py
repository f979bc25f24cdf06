"""Worker for tests/test_torch_contract.py: torch.optim's contract through hvd_lb's Horovod wrapper.

``horovodrun -np N python torch_contract_worker.py OUT_DIR``; each rank writes
``OUT_DIR/rank{r}.json``. k = N·M = 4 in every case (M = 4 at N = 1, M = 2 at N = 2).
Gradients are seeded per (step, worker, micro-batch) as in torch_dist_worker.py, so the
test rebuilds every sample for the float64 reference.
"""
import copy
import gc
import json
import os
import sys
import time

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
from tests.scripts.torch_dist_worker import STEPS, init_params, micro_grads  # noqa: E402

ADAMW = {"lr": 0.05, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.01}


def subjects(lbt):
    """name → (build(params) → DistributedOptimizer, reference name, reference hyperparameters)."""
    def dist(opt, M):
        return lbt.DistributedOptimizer(opt, named_parameters=[(f"p{i}", p) for i, p in
                                                               enumerate(opt.param_groups[0]["params"])],
                                        micro_batches=M)
    return {
        "GSNR(AdamW)": (lambda ps, M: dist(lbt.GSNR(torch.optim.AdamW(ps, **ADAMW), gamma=0.3, momentum=0.5), M),
                        "vr-adam", dict(ADAMW, gamma=0.3, gsnr_momentum=0.5)),
        "vr-lamb": (lambda ps, M: dist(lbt.OPTIMIZERS["vr-lamb"](ps, lr=0.05, weight_decay=0.01), M),
                    "vr-lamb", {"lr": 0.05, "weight_decay": 0.01}),
        "lamb": (lambda ps, M: dist(lbt.OPTIMIZERS["lamb"](ps, lr=0.05, weight_decay=0.01), M),
                 "lamb", {"lr": 0.05, "weight_decay": 0.01}),
    }


def leaves(dtype=torch.float64, seed=0):
    return [torch.tensor(a).to(dtype).requires_grad_(True) for a in init_params(seed)]


def backward(params, grads):
    """A loss whose gradient is ``grads`` (in the parameters' dtype): real backward passes."""
    sum((p * torch.tensor(g).to(p.dtype)).sum() for p, g in zip(params, grads)).backward()


def run(opt, params, M, rank, steps=STEPS, closure=False):
    losses = []
    for step in range(1, steps + 1):
        def passes():
            for m in range(M):
                backward(params, micro_grads(step, rank, m, M))
            return torch.tensor(float(step))
        if closure:
            losses.append(float(opt.step(passes)))
        else:
            passes()
            opt.step()
        opt.zero_grad()
    return losses


def dump(params):
    return [p.detach().double().reshape(-1).tolist() for p in params]


def case_hooks(lbt, rank, M):
    """Step pre/post hooks (instance and global) run once per step()."""
    out = {}
    for name, (build, _, _) in subjects(lbt).items():
        params = leaves()
        opt = build(params, M)
        calls = []
        handles = [opt.register_step_pre_hook(lambda *a: calls.append("pre")),
                   opt.register_step_post_hook(lambda *a: calls.append("post")),
                   register_optimizer_step_pre_hook(lambda *a: calls.append("gpre")),
                   register_optimizer_step_post_hook(lambda *a: calls.append("gpost"))]
        run(opt, params, M, rank, steps=2)
        for h in handles:
            h.remove()
        out[name] = sorted(calls)
    return out


def case_closure(lbt, rank, M):
    """step(closure) runs the closure once, before the all-reduce, and returns its loss."""
    out = {}
    for name, (build, _, _) in subjects(lbt).items():
        a, b = leaves(), leaves()
        run(build(a, M), a, M, rank)
        losses = run(build(b, M), b, M, rank, closure=True)
        out[name] = {"equal": all(torch.equal(x, y) for x, y in zip(a, b)), "losses": losses}
    return out


def case_unused_param(lbt, rank, M):
    """A parameter no backward reaches keeps grad None and does not move (one process)."""
    params = leaves()
    unused = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = lbt.DistributedOptimizer(
        lbt.GSNR(torch.optim.SGD(params + [unused], lr=0.1, momentum=0.9, weight_decay=0.1)),
        micro_batches=M)
    run(opt, params, M, rank, steps=2)
    out = {"grad_none": unused.grad is None, "unchanged": bool((unused == 1).all()),
           "no_state": "momentum_buffer" not in opt.state[unused]}
    # Used on rank 0 only: reduced as zeros elsewhere, stepped alike on every rank.
    mixed = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = lbt.DistributedOptimizer(lbt.GSNR(torch.optim.SGD(params + [mixed], lr=0.1, weight_decay=0.1)),
                                   micro_batches=M)
    for step in range(1, 3):
        for m in range(M):
            backward(params, micro_grads(step, rank, m, M))
            if rank == 0:
                (mixed * (m + 1.0)).sum().backward()
        opt.step()
        opt.zero_grad()
    out["mixed"] = mixed.detach().tolist()
    return out


def case_second_wrapper(lbt, rank, M):
    """A second DistributedOptimizer on the same parameters works once the first is deleted."""
    build = subjects(lbt)["GSNR(AdamW)"][0]
    a = leaves()
    first = build(a, M)
    run(first, a, M, rank, steps=1)
    del first
    gc.collect()
    b = leaves()
    with torch.no_grad():
        for p, q in zip(a, b):
            p.copy_(q)
    run(build(a, M), a, M, rank)
    run(build(b, M), b, M, rank)
    return {"equal": all(torch.equal(x, y) for x, y in zip(a, b))}


def case_compile(lbt, rank, M):
    """``torch.compile(opt.step)`` steps as the eager step does."""
    out = {}
    for name, (build, _, _) in subjects(lbt).items():
        a, b = leaves(), leaves()
        run(build(a, M), a, M, rank)
        opt = build(b, M)
        opt.step = torch.compile(opt.step)
        run(opt, b, M, rank)
        out[name] = max(float((x - y).abs().max()) for x, y in zip(a, b))
    return out


SGD = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}


def low_precision_subjects(lbt):
    """``subjects`` and GSNR(SGD), whose state has no squares for fp16 to underflow."""
    out = subjects(lbt)
    out["GSNR(SGD)"] = (lambda ps, M: lbt.DistributedOptimizer(lbt.GSNR(torch.optim.SGD(ps, **SGD), gamma=0.3),
                                                               micro_batches=M),
                        "vr-momentum", dict(SGD, gamma=0.3, gsnr_momentum=0.0))
    return out


def case_low_precision(lbt, rank, M):
    """bf16 and fp16 parameters: parameters after STEPS steps, for the float64 reference."""
    out = {}
    for dtype in ("bfloat16", "float16"):
        for name, (build, _, _) in low_precision_subjects(lbt).items():
            params = leaves(getattr(torch, dtype))
            opt = build(params, M)
            run(opt, params, M, rank)
            out[f"{name}/{dtype}"] = {"params": dump(params), "dtypes": [str(p.dtype) for p in params]}
    return out


def case_resume(lbt, rank, M, hvd=None):
    """Rank 0 resumes from a checkpoint, the others start fresh; parameters and optimizer state
    are broadcast; the run continues. Max |Δw| against the uninterrupted run, per broadcast."""
    import horovod.torch as hvd
    out = {}
    makes = {"AdamW": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
             "GSNR(AdamW)": lambda ps: lbt.GSNR(torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1))}
    for name, make in makes.items():
        def wrap(ps):
            return lbt.DistributedOptimizer(make(ps), named_parameters=[(f"p{i}", p) for i, p in enumerate(ps)],
                                            micro_batches=M)
        full = leaves()
        run(wrap(full), full, M, rank, steps=6)
        for how, bcast in (("hvd_lb", lbt.broadcast_optimizer_state), ("horovod", hvd.broadcast_optimizer_state)):
            part = leaves()
            opt = wrap(part)
            run(opt, part, M, rank, steps=3)
            saved = ([p.detach().clone() for p in part], copy.deepcopy(opt.state_dict()))
            resumed = leaves(seed=1 + rank)  # other ranks: different weights, no state
            opt = wrap(resumed)
            if rank == 0:
                with torch.no_grad():
                    for p, w in zip(resumed, saved[0]):
                        p.copy_(w)
                opt.load_state_dict(saved[1])
            hvd.broadcast_parameters([(f"p{i}", p) for i, p in enumerate(resumed)], root_rank=0)
            bcast(opt, root_rank=0)
            for step in range(4, 7):
                for m in range(M):
                    backward(resumed, micro_grads(step, rank, m, M))
                opt.step()
                opt.zero_grad()
            out[f"{name}/resume/{how}"] = max(float((a - b).abs().max()) for a, b in zip(full, resumed))
        fresh = leaves()
        opt = wrap(fresh)
        lbt.broadcast_optimizer_state(opt, root_rank=0)
        run(opt, fresh, M, rank, steps=6)
        out[f"{name}/fresh"] = max(float((a - b).abs().max()) for a, b in zip(full, fresh))
    return out


def case_elastic_sync(lbt, rank, M):
    """``hvd.elastic.TorchState.sync()`` (run at every elastic (re)start) on a fresh GSNR(AdamW):
    no parameter moves and the transform's step count is not advanced."""
    out = {}
    for how, state_cls in (("hvd_lb", lbt.elastic.TorchState), ("horovod", __import__(
            "horovod.torch.elastic", fromlist=["TorchState"]).TorchState)):
        a, b = leaves(), leaves()
        opts = []
        for ps in (a, b):
            opts.append(lbt.DistributedOptimizer(lbt.GSNR(torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1)),
                                                 named_parameters=[(f"p{i}", p) for i, p in enumerate(ps)],
                                                 micro_batches=M))
        state_cls(optimizer=opts[1], step=0).sync()
        run(opts[0], a, M, rank, steps=2)
        run(opts[1], b, M, rank, steps=2)
        out[how] = {"max_diff": max(float((x - y).abs().max()) for x, y in zip(a, b)),
                    "gsnr_step": max(opts[1].state[p]["gsnr_step"] for p in b)}
    return out


def case_no_backward(lbt, rank, M):
    """A step without a backward: on one rank of several it takes part with zeros (no hang, the
    ranks stay identical, that rank warns); on every rank (or alone) the same error everywhere."""
    import warnings
    out = {}
    params = leaves()
    opt = subjects(lbt)["GSNR(AdamW)"][0](params, M)
    skip = 1 if rank == 1 else None  # rank 1 skips step 2's backward (alone: nobody skips here)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 4):
            if not (step == 2 and rank == skip):
                for m in range(M):
                    backward(params, micro_grads(step, rank, m, M))
            opt.step()
            opt.zero_grad()
    out["params"] = dump(params)
    out["warned"] = any("count as zeros" in str(w.message) for w in caught)
    start = time.perf_counter()
    try:
        opt.step()  # no rank had a backward
        out["raised"] = None
    except RuntimeError as e:
        out["raised"] = str(e)
    out["seconds"] = time.perf_counter() - start
    return out


def main():
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    import horovod.torch as hvd
    import hvd_lb.torch as lbt
    hvd.init()
    rank, M = hvd.rank(), 4 // hvd.size()
    result = {"size": hvd.size(), "M": M}
    for case in (case_hooks, case_closure, case_unused_param, case_second_wrapper, case_compile,
                 case_low_precision, case_resume, case_elastic_sync, case_no_backward):
        try:
            result[case.__name__[5:]] = case(lbt, rank, M)
        except Exception as e:  # recorded, so that one failing case names itself
            result[case.__name__[5:]] = {"error": f"{type(e).__name__}: {e}"}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
