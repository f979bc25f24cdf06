"""Worker for tests/test_squares16.py: ``python squares16_worker.py ENGINE OUT_DIR``.

ENGINE: ``torch`` (hvd_lb.torch.DistributedOptimizer; under horovodrun or alone, size 1),
``ddp`` (hvd_lb.torch.ddp under torchrun) or ``tf`` (hvd_lb.tf.DistributedOptimizer).
Every CASE (rule, square_dtype, gsnr_interval, micro_batches) runs STEPS steps on gradients
seeded per (step, worker, micro-batch) whose magnitudes need the float16 scale (|x| ≈ 300:
squares overflow float16 unscaled; |x| ≈ 1e-4: they underflow), and which jump at step 4
(×2⁶ and ×2⁻¹⁶) so that one tensor overflows and one underflows its scale: both redone.
Each rank writes OUT_DIR/rank{r}.json: per case the final parameters and, per step, the
reduced float16 squares and their exponents (the test feeds the reference the same ones).
"""
import contextlib
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

SHAPES = [(4, 3), (3,), (), (1,)]
SCALES = [300.0, 1e-4, 1.0, 1.0]
STEPS = 6
JUMP_STEP, JUMPS = 4, [2.0 ** 6, 2.0 ** -16, 1.0, 1.0]
HP = {"weight_decay": 0.01, "gamma": 0.3, "lr": 0.01}
CASES = [(name, dtype, n) for name in ("vr-sgd", "vr-momentum", "vr-lamb")
         for dtype, n in (("float16", 1), ("float16", 3), (None, 3))]


def init_params():
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s) for s in SHAPES]


def micro_grads(step, worker, micro, M):
    sig = np.random.default_rng((step, 999))
    noise = np.random.default_rng((step, worker, micro, M))
    out = []
    for s, scale, jump in zip(SHAPES, SCALES, JUMPS):
        g = sig.standard_normal(s) / M + noise.standard_normal(s)
        out.append(np.asarray(g * scale * (jump if step == JUMP_STEP else 1.0), np.float64))
    return out


def hp_for(name):
    from hvd_lb import rules
    allowed = {h.name for h in rules.get_rule(name).hypers}
    return {k: v for k, v in HP.items() if k in allowed}


def cases(W):
    M = 1 if W > 1 else 2
    return [(n, d, i, M) for n, d, i in CASES] + ([("vr-lamb", "float16", 1, 2)] if W > 1 else [])


def key(case):
    return "/".join(map(str, case))


# --- torch: Horovod and DDP ----------------------------------------------------------------

def run_torch(engine, out_dir):
    import torch
    import hvd_lb.torch as lbt

    if engine == "ddp":
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP
        from hvd_lb.torch import ddp as lb_ddp
        dist.init_process_group("gloo")
        rank, W = dist.get_rank(), dist.get_world_size()
        record = []
        orig = lb_ddp.DDPStatistics._finish16

        def finish16(self):
            names = {p: i for i, p in enumerate(p for g in self.optimizer.param_groups for p in g["params"])}
            rec = [None] * len(names)
            for p, (half, _, e, _) in self._pending16.items():
                rec[names[p]] = [half.double().tolist(), e]
            record.append(rec)
            return orig(self)
        lb_ddp.DDPStatistics._finish16 = finish16
    else:
        import horovod.torch as hvd
        from hvd_lb.torch import distributed as D
        hvd.init()
        rank, W = hvd.rank(), hvd.size()
        record = []
        orig = D._DistributedGSNR._float16_stats

        def float16_stats(self, half):
            index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
            rec = [None] * len(index)
            for p, h in half.items():
                rec[index[p]] = [h.double().reshape(-1).tolist(), self._exponents[p]]
            record.append(rec)
            return orig(self, half)
        D._DistributedGSNR._float16_stats = float16_stats

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.tensor(a)) for a in init_params()])

        def forward(self, grads):
            return sum((p * g).sum() for p, g in zip(self.ps, grads))

    out = {}
    for case in cases(W):
        name, dtype, n, M = case
        model = Toy()
        opt = lbt.create(name, model, **hp_for(name))
        if engine == "ddp":
            model = DDP(model, bucket_cap_mb=1e-6 if M == 2 else 25.0)
            lb_ddp.register(model, opt, micro_batches=M, square_dtype=dtype, gsnr_interval=n)
        else:
            opt = lbt.DistributedOptimizer(opt, named_parameters=model.named_parameters(), micro_batches=M,
                                           square_dtype=dtype, gsnr_interval=n)
        steps = []
        for step in range(1, STEPS + 1):
            record.clear()
            for m in range(M):
                grads = [torch.tensor(g) for g in micro_grads(step, rank, m, M)]
                sync = model.no_sync() if engine == "ddp" and m < M - 1 else contextlib.nullcontext()
                with sync:
                    model(grads).backward()
            opt.step()
            opt.zero_grad()
            steps.append(record[0] if record else None)
        params = model.module.ps if engine == "ddp" else model.ps
        out[key(case)] = {"params": [p.detach().double().reshape(-1).tolist() for p in params], "steps": steps}
    extras = torch_extras(lbt, torch, Toy, rank, W) if engine == "torch" else ddp_extras(lbt, torch, Toy, rank)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"W": W, "cases": out, "extras": extras}, f)
    if engine == "ddp":
        dist.destroy_process_group()


def ddp_extras(lbt, torch, Toy, rank):
    """DDP, float16 squares: gradients ×8 unscaled in place before the step (GradScaler's
    unscale_) step as the unscaled ones: the floor s ≥ ḡ² + a takes ḡ as reduced."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    from hvd_lb.torch import ddp as lb_ddp
    out = {}
    for tag, scale in (("plain", 1.0), ("unscaled", 8.0)):
        model = Toy()
        opt = lbt.create("vr-sgd", model, **hp_for("vr-sgd"))
        model = DDP(model)
        lb_ddp.register(model, opt, square_dtype="float16")
        for step in range(1, STEPS + 1):
            # the same gradients on every rank: s = ḡ² exactly, so the floor decides half the elements
            model([torch.tensor(g * scale) for g in micro_grads(step, 0, 0, 1)]).backward()
            for p in model.parameters():
                p.grad.mul_(1.0 / scale)
            opt.step()
            opt.zero_grad()
        out[tag] = [p.detach().double().reshape(-1).tolist() for p in model.module.ps]
    # Settings that differ between ranks: the same ValueError on every rank, nothing reduced.
    module = Toy()
    model = DDP(module)
    try:
        lb_ddp.register(model, lbt.create("vr-sgd", module, **hp_for("vr-sgd")), gsnr_interval=1 + rank)
        out["disagree"] = ""
    except ValueError as e:
        out["disagree"] = str(e)
    return out


def torch_extras(lbt, torch, Toy, rank, W):
    """Horovod torch, float16 squares with gsnr_interval=3: the kept s and the counters."""
    M = 1 if W > 1 else 2

    def make(skip=False):
        model = Toy()
        opt = lbt.DistributedOptimizer(lbt.create("vr-sgd", model, **hp_for("vr-sgd")),
                                       named_parameters=model.named_parameters(), micro_batches=M,
                                       square_dtype="float16", gsnr_interval=3, skip_nonfinite=skip)
        return model, opt

    def run(model, opt, t, bad=False, step=True):
        for m in range(M):
            grads = [torch.tensor(g) for g in micro_grads(t, rank, m, M)]
            if bad:
                grads[0][0, 0] = float("nan")
            model(grads).backward()
        opt.step() if step else opt.synchronize()
        opt.zero_grad()

    res = {}
    # A non-finite statistics step (skipped) keeps the previous kept s, unchanged (a copy, not
    # the squares buffer that step overwrote), for the reuse steps after it.
    model, opt = make(skip=True)
    for t in (1, 2, 3):
        run(model, opt, t)
    kept = {p: s.clone() for p, s in opt._kept.items()}
    run(model, opt, 4, bad=True)
    res["kept_unchanged"] = len(kept) == 4 and all(torch.equal(kept[p], opt._kept[p]) for p in kept)
    run(model, opt, 5)
    run(model, opt, 6)
    res["skipped"] = opt.skipped_steps
    # A synchronize() whose step never came (GradScaler's inf skip) leaves no s for the next step.
    run(model, opt, 7, step=False)
    for m in range(M):
        model([torch.tensor(g) for g in micro_grads(8, rank, m, M)]).backward()
    opt.synchronize()
    res["stale"] = len(opt._stats)
    with opt.skip_synchronize():
        opt.step()
    opt.zero_grad()
    # A rank-0-only state load, then the broadcast: every rank starts over (same layout).
    model, opt = make()
    for t in (1, 2):
        run(model, opt, t)
    if rank == 0:
        opt.load_state_dict(opt.state_dict())
    lbt.broadcast_optimizer_state(opt, root_rank=0)
    res["reset"] = [opt._stat_count, len(opt._kept), len(opt._exponents)]
    for t in (3, 4, 5):
        run(model, opt, t)
    res["params"] = [p.detach().double().reshape(-1).tolist() for p in model.ps]
    return res


# --- TF / Keras 3 -----------------------------------------------------------------------------

def run_tf(out_dir):
    import keras
    import tensorflow as tf
    import horovod.tensorflow as hvd
    import hvd_lb.tf as lbtf
    from hvd_lb import rules
    from hvd_lb.tf import _squares16 as S

    hvd.init()
    rank, W = hvd.rank(), hvd.size()
    record = []
    orig = S.record

    def rec(half, exps):
        record.append([[np.asarray(h, np.float64).reshape(-1).tolist(), int(e)] for h, e in zip(half, exps)])
    S.record = rec
    out = {}
    for case in cases(W):
        name, dtype, n, M = case
        vs = [keras.Variable(a, dtype="float64", name=f"v{i}") for i, a in enumerate(init_params())]
        opt = lbtf.DistributedOptimizer(lbtf.create(name, **rules.to_keras(hp_for(name))), micro_batches=M,
                                        square_dtype=dtype, gsnr_interval=n)
        steps = []
        for step in range(1, STEPS + 1):
            record.clear()
            for m in range(M):
                opt.apply([tf.constant(g, tf.float64) for g in micro_grads(step, rank, m, M)], vs)
            steps.append(record[0] if record else None)
        out[key(case)] = {"params": [np.asarray(v.numpy(), np.float64).reshape(-1).tolist() for v in vs],
                          "steps": steps}
        if dtype == "float16" and n > 1:
            # The same case traced (model.fit's path: tf.cond around the collectives): equal.
            vs = [keras.Variable(a, dtype="float64", name=f"g{i}") for i, a in enumerate(init_params())]
            opt = lbtf.DistributedOptimizer(lbtf.create(name, **rules.to_keras(hp_for(name))), micro_batches=M,
                                            square_dtype=dtype, gsnr_interval=n)
            traced = tf.function(lambda gs: opt.apply(gs, vs))
            for step in range(1, STEPS + 1):
                for m in range(M):
                    traced([tf.constant(g, tf.float64) for g in micro_grads(step, rank, m, M)])
            out[key(case) + "/traced"] = [np.asarray(v.numpy(), np.float64).reshape(-1).tolist() for v in vs]
    S.record = orig
    extras = tf_extras(keras, tf, lbtf, rules, rank, W)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"W": W, "cases": out, "extras": extras}, f)


def tf_extras(keras, tf, lbtf, rules, rank, W):
    """Keras, float16 squares: a non-finite statistics step keeps the kept s (gsnr_interval=3),
    and a LossScaleOptimizer inside steps as without it on gradients times its scale."""
    M = 1 if W > 1 else 2
    res = {}

    def run(tag, wrap=None, scale=1.0, n=1, skip=False, bad_step=None, steps=STEPS):
        vs = [keras.Variable(a, dtype="float64", name=f"{tag}{i}") for i, a in enumerate(init_params())]
        inner = lbtf.create("vr-sgd", **rules.to_keras(hp_for("vr-sgd")))
        opt = lbtf.DistributedOptimizer(wrap(inner) if wrap else inner, micro_batches=M, square_dtype="float16",
                                        gsnr_interval=n, skip_nonfinite=skip)
        for step in range(1, steps + 1):
            for m in range(M):
                gs = [g * scale for g in micro_grads(step, rank, m, M)]
                if step == bad_step:
                    gs[0][0, 0] = np.nan
                opt.apply([tf.constant(g, tf.float64) for g in gs], vs)
        return opt, [np.asarray(v.numpy(), np.float64).reshape(-1).tolist() for v in vs]

    opt, _ = run("k", n=3, skip=True, bad_step=4)
    res["skipped"] = int(opt.skipped_steps)
    # A non-finite first statistics step leaves no kept s: the next step is a statistics step.
    opt, _ = run("f", n=3, skip=True, bad_step=1, steps=2)
    res["kept_after_bad_first"] = [bool(np.any(np.asarray(k.numpy()) != 0)) for k in opt._s16_kept]
    _, res["plain"] = run("p")
    _, res["loss_scaled"] = run("l", wrap=lambda o: keras.optimizers.LossScaleOptimizer(o, initial_scale=2.0 ** 15),
                                scale=2.0 ** 15)
    return res


if __name__ == "__main__":
    engine, out_dir = sys.argv[1], sys.argv[2]
    if engine == "tf":
        run_tf(out_dir)
    else:
        run_torch(engine, out_dir)
