"""Worker for the torch Horovod tests: ``python torch_dist_worker.py MODE OUT_DIR [NAMES...]``.

Modes (join with ``+`` to run several in one launch): ``parity`` (every NAME × micro_batches 1, 2), ``compat`` (broadcast, clipping,
GradScaler, checkpoint, bf16 squares, sparse, diagnostics), ``gsnr`` (GSNR in front of
torch.optim.SGD / AdamW, Horovod's arguments, broadcast of lazily built state), ``misuse``
(clear errors, alike on every rank), ``single`` (size-1 Horovod:
k < 2 error, linear regression).  Each rank writes ``OUT_DIR/rank{r}.json``.
Data are seeded per (step, worker, micro-batch) so the test can rebuild every sample.
"""
import io
import json
import os
import sys
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

SHAPES = [(4, 3), (3,)]
STEPS = 5
PARITY_HP = {"weight_decay": 0.01, "gamma": 0.3}


def hp_for(name):
    from hvd_lb import rules
    allowed = {h.name for h in rules.get_rule(name).hypers}
    return {k: v for k, v in PARITY_HP.items() if k in allowed}


def init_params(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in SHAPES]


def micro_grads(step, worker, micro, M, seed=0):
    """g_{w,m} of one micro-batch at ``step`` (1-based): a shared signal plus worker noise."""
    sig = np.random.default_rng((seed, step, 999))
    noise = np.random.default_rng((seed, step, worker, micro, M))
    return [sig.standard_normal(s) / M + noise.standard_normal(s) for s in SHAPES]


def _backward(params, grads, scaler=None):
    """A loss whose gradient is ``grads``: real backward passes fire the hooks."""
    loss = sum((p * torch.tensor(g)).sum() for p, g in zip(params, grads))
    (loss if scaler is None else scaler.scale(loss)).backward()


def _leaves(arrays):
    return [torch.tensor(a).requires_grad_(True) for a in arrays]


def _dump(t):
    return t.detach().double().reshape(-1).tolist()


def mode_parity(hvd, lbt, names):
    rank, W = hvd.rank(), hvd.size()
    out = {}
    for name in names:
        for M in (1, 2):
            params = _leaves(init_params())
            opt = lbt.DistributedOptimizer(lbt.create(name, params, **hp_for(name)),
                                           named_parameters=[(f"p{i}", p) for i, p in enumerate(params)],
                                           micro_batches=M)
            for step in range(1, STEPS + 1):
                for m in range(M):
                    _backward(params, micro_grads(step, rank, m, M))
                opt.step()
                opt.zero_grad()
            out[f"{name}/M{M}"] = [_dump(p) for p in params]
    return out


def _steps(hvd, opt, params, M, first, last, seed=0, scaler=None, clip=None, rank=None):
    rank = hvd.rank() if rank is None else rank
    for step in range(first, last + 1):
        for m in range(M):
            _backward(params, micro_grads(step, rank, m, M, seed), scaler)
        if scaler is not None:
            opt.synchronize()
            scaler.unscale_(opt)
            with opt.skip_synchronize():
                scaler.step(opt)
            scaler.update()
        elif clip is not None:
            opt.synchronize()
            torch.nn.utils.clip_grad_norm_(params, clip)
            with opt.skip_synchronize():
                opt.step()
        else:
            opt.step()
        opt.zero_grad()


def _state(opt):
    return {f"{i}/{k}": (_dump(v) if torch.is_tensor(v) else v)
            for i, p in enumerate(p for g in opt.param_groups for p in g["params"])
            for k, v in opt.state[p].items()}


def mode_compat(hvd, lbt, _names):
    rank = hvd.rank()
    out = {}

    # Broadcast: ranks start from different weights and lrs; rank 0 resumes from 3 local steps.
    params = _leaves(init_params(seed=10 + rank))
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    opt = lbt.DistributedOptimizer(lbt.create("vr-lamb", params, lr=0.01 if rank == 0 else 0.5),
                                   named_parameters=named, micro_batches=1)
    if rank == 0:
        local = lbt.create("vr-lamb", params, lr=0.01)
        for step in range(1, 4):
            from hvd_lb import reference
            samples = [micro_grads(step, w, 0, 1, seed=5) for w in range(4)]
            mean, sq = reference.gradient_stats(samples)
            for p, g in zip(params, mean):
                p.grad = torch.tensor(g)
            local.set_grad_sq([torch.tensor(s) for s in sq])
            local.step()
        opt.load_state_dict(local.state_dict())
        opt.zero_grad()
    hvd.broadcast_parameters(dict(named), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    out["bcast_params"] = [_dump(p) for p in params]
    out["bcast_state"] = _state(opt)
    out["bcast_lr"] = opt.param_groups[0]["lr"]
    _steps(hvd, opt, params, 1, 4, 5)
    out["bcast_after"] = [_dump(p) for p in params]

    # Gradient clipping between synchronize() and step(), VR and non-VR.
    for name in ("vr-momentum", "lamb"):
        params = _leaves(init_params())
        opt = lbt.DistributedOptimizer(lbt.create(name, params), micro_batches=2)
        _steps(hvd, opt, params, 2, 1, STEPS, clip=0.5)
        out[f"clip/{name}"] = [_dump(p) for p in params]

    # fused=True: the rule's update and the GSNR maths torch.compile'd, through Horovod.
    params = _leaves(init_params())
    opt = lbt.DistributedOptimizer(lbt.create("vr-lamb", params, fused=True), micro_batches=2)
    _steps(hvd, opt, params, 2, 1, STEPS)
    out["fused/vr-lamb"] = [_dump(p) for p in params]

    # GradScaler (CPU): scaled backward, synchronize, unscale_, skip_synchronize + scaler.step.
    for name in ("vr-sgd", "momentum"):
        params = _leaves(init_params())
        opt = lbt.DistributedOptimizer(lbt.create(name, params), micro_batches=2)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
        _steps(hvd, opt, params, 2, 1, STEPS, scaler=scaler)
        out[f"scaler/{name}"] = [_dump(p) for p in params]

    # Checkpoint: 3 steps, save, load into fresh objects, 2 more == 5 uninterrupted steps.
    for name in ("vr-tvlars", "vr-adam", "lars"):
        full = _leaves(init_params())
        fopt = lbt.DistributedOptimizer(lbt.create(name, full), micro_batches=2)
        _steps(hvd, fopt, full, 2, 1, STEPS)
        params = _leaves(init_params())
        opt = lbt.DistributedOptimizer(lbt.create(name, params), micro_batches=2)
        _steps(hvd, opt, params, 2, 1, 3)
        buf = io.BytesIO()
        torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
        buf.seek(0)
        ck = torch.load(buf)
        params = [t.clone().requires_grad_(True) for t in ck["params"]]
        opt = lbt.DistributedOptimizer(lbt.create(name, params), micro_batches=2)
        opt.load_state_dict(ck["opt"])
        _steps(hvd, opt, params, 2, 4, STEPS)
        out[f"ckpt/{name}"] = all(torch.equal(a, b) for a, b in zip(full, params))

    # bfloat16 squares.
    params = _leaves(init_params())
    opt = lbt.DistributedOptimizer(lbt.create("vr-sgd", params), micro_batches=2,
                                   square_dtype=torch.bfloat16)
    _steps(hvd, opt, params, 2, 1, STEPS)
    out["bf16/vr-sgd"] = [_dump(p) for p in params]

    # Diagnostics after one step, named by named_parameters.
    params = _leaves(init_params())
    opt = lbt.DistributedOptimizer(lbt.create("vr-sgd", params),
                                   named_parameters=[("weight", params[0]), ("bias", params[1])])
    _steps(hvd, opt, params, 1, 1, 1)
    out["diag"] = opt.gsnr_diagnostics()

    # Sparse embedding gradients: densified (one warning), same result as dense.
    res = {}
    for sparse in (False, True):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(6, 3, sparse=sparse).double()
        opt = lbt.DistributedOptimizer(lbt.create("vr-sgd", emb, lr=0.1),
                                       named_parameters=emb.named_parameters(), micro_batches=2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(3):
                for m in range(2):
                    idx = torch.tensor([(step + m + rank) % 6, (2 * step + m) % 6])
                    emb(idx).pow(2).sum().backward()
                opt.step()
                opt.zero_grad()
        res[sparse] = (_dump(emb.weight), sum("densified" in str(w.message) for w in caught))
    out["sparse"] = res[True][0]
    out["dense"] = res[False][0]
    out["sparse_warnings"] = res[True][1]
    return out


GSNR_CASES = {
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01), 0.0),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.01), 0.9),
}


def mode_gsnr(hvd, lbt, _names):
    """GSNR(torch.optim.X) inside hvd_lb's DistributedOptimizer, given Horovod's own arguments."""
    out = {}
    for case, (make, b3) in GSNR_CASES.items():
        for M in (1, 2):
            params = _leaves(init_params())
            opt = lbt.DistributedOptimizer(
                lbt.GSNR(make(params), gamma=0.3, momentum=b3),
                named_parameters=[(f"p{i}", p) for i, p in enumerate(params)],
                backward_passes_per_step=M, gradient_predivide_factor=2.0 if M == 2 else 1.0)
            # Horovod's broadcast on a fresh torch optimizer: one zero-gradient step builds the state.
            hvd.broadcast_optimizer_state(opt, root_rank=0)
            _steps(hvd, opt, params, M, 1, STEPS)
            out[f"gsnr/{case}/M{M}"] = [_dump(p) for p in params]
            out[f"gsnr/{case}/M{M}/state"] = _state(opt)
    return out


def _error(fn):
    try:
        fn()
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def mode_misuse(hvd, lbt, _names):
    """Misuse is a clear error raised alike on every rank, before any collective (no hang)."""
    rank = hvd.rank()
    out = {}
    params = _leaves(init_params())
    opt = lbt.DistributedOptimizer(lbt.create("vr-sgd", params), micro_batches=1)
    _steps(hvd, opt, params, 1, 1, 1)
    out["step_without_backward"] = _error(opt.step)

    params = _leaves(init_params())
    opt = lbt.DistributedOptimizer(lbt.create("vr-sgd", params), micro_batches=2)
    _backward(params, micro_grads(1, rank, 0, 2))
    out["zero_grad_between_micro_batches"] = _error(opt.zero_grad)

    params = _leaves(init_params())
    opt = lbt.DistributedOptimizer(lbt.create("vr-sgd", params), micro_batches=1)
    out["wrap_twice"] = _error(lambda: lbt.DistributedOptimizer(opt))
    out["compression_string"] = _error(lambda: lbt.DistributedOptimizer(lbt.create("vr-sgd", _leaves(init_params())),
                                                                        compression="fp16"))

    class OneWorker:  # what an elastic shrink to one worker looks like to the wrapper
        def size(self):
            return 1

        def included(self):
            return True

    opt.process_set = OneWorker()
    out["k_after_shrink"] = _error(lambda: _backward(params, micro_grads(1, rank, 0, 1)))

    # A param group added after wrapping is reduced and stepped like the others.
    params = _leaves(init_params())
    extra = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = lbt.DistributedOptimizer(lbt.create("vr-sgd", params[:1]), micro_batches=1)
    opt.add_param_group({"params": [extra], "adapt": False, "decay": False})
    for step in (1, 2):
        _backward(params[:1] + [extra], micro_grads(step, rank, 0, 1)[:1] + [np.arange(3.0) * (rank + 1)])
        opt.step()
        opt.zero_grad()
    out["added_group"] = _dump(extra)

    # skip_nonfinite: an inf on rank 1 at step 3 skips that step on every rank together.
    for name in ("vr-sgd", "sgd"):
        params = _leaves(init_params())
        opt = lbt.DistributedOptimizer(lbt.create(name, params), micro_batches=2, skip_nonfinite=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(1, STEPS + 1):
                for m in range(2):
                    g = micro_grads(step, rank, m, 2)
                    if step == 3 and rank == 1 and m == 0:
                        g[0][0, 0] = np.inf
                    _backward(params, g)
                opt.step()
                opt.zero_grad()
        out[f"skip/{name}"] = [_dump(p) for p in params]
        out[f"skip/{name}/count"] = opt.skipped_steps
        out[f"skip/{name}/warnings"] = sum("skipped" in str(w.message) for w in caught)
    return out


def linreg(lbt, name, lr, gamma=0.1, steps=100, batch=256, k=8, dim=10, seed=0):
    """VRGD §7.2: y = W·x with W_i = i, w₀ = 0, MSE; k micro-batches of batch/k per step."""
    W = torch.arange(1, dim + 1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    x_test = torch.randn(4096, dim, generator=gen, dtype=torch.float64)
    y_test = x_test @ W
    w = torch.zeros(1, dim, dtype=torch.float64, requires_grad=True)
    hp = {"gamma": gamma} if name.startswith("vr-") else {}
    opt = lbt.DistributedOptimizer(lbt.create(name, [w], lr=lr, **hp), micro_batches=k)
    losses, weights = [], []
    for _ in range(steps):
        x = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
        y = x @ W
        for xm, ym in zip(x.chunk(k), y.chunk(k)):
            # Σ_m of these gradients is the full-batch MSE gradient.
            (((xm @ w.reshape(-1)) - ym).pow(2).mean() / k).backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            losses.append(float(((x_test @ w.reshape(-1)) - y_test).pow(2).mean()))
        weights.append(w.detach().reshape(-1).tolist())
    return losses, weights


LINREG_LRS = (0.01, 0.03, 0.1, 0.3, 0.6, 0.9)


def mode_single(hvd, lbt, _names):
    out = {}
    params = _leaves(init_params())
    try:
        lbt.DistributedOptimizer(lbt.create("vr-sgd", params), micro_batches=1)
        out["k1_error"] = None
    except ValueError as e:
        out["k1_error"] = str(e)
    # Non-VR rules are fine with one sample.
    lbt.DistributedOptimizer(lbt.create("sgd", params), micro_batches=1)
    runs = {}
    for lr in LINREG_LRS:
        for name, gamma in (("sgd", None), ("vr-sgd", 0.1), ("vr-sgd", 1.0)):
            key = f"{name}/{lr}" + ("" if gamma in (None, 0.1) else f"/gamma{gamma}")
            losses, weights = linreg(lbt, name, lr, gamma=gamma or 0.1)
            runs[key] = {"loss": losses, "w": weights}
    out["linreg"] = runs
    return out


def main():
    mode, out_dir, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    torch.set_num_threads(1)
    import horovod.torch as hvd
    import hvd_lb.torch as lbt
    hvd.init()
    modes = {"parity": mode_parity, "compat": mode_compat, "gsnr": mode_gsnr, "misuse": mode_misuse,
             "single": mode_single}
    result = {}
    for m in mode.split("+"):
        result.update(modes[m](hvd, lbt, names))
    result["size"] = hvd.size()
    with open(os.path.join(out_dir, f"rank{hvd.rank()}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
