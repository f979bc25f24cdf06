"""Step-time benchmark of the torch backend on a ~10M-parameter MLP (not a test).

Run:  horovodrun -np 2 -H localhost:2 --gloo .venv/bin/python bench/torch_step.py

Measured side by side in one run (round-robin, medians of wall and of process CPU time):
  * full training step: plain hvd.DistributedOptimizer(torch.optim.SGD(momentum)) vs
    hvd_lb ``momentum`` vs ``vr-momentum`` with the defaults (float32 squares; the GSNR maths
    compiled where a compiler is present, ``gsnr_fused=None``), with ``fused=False``
    (foreach), with bfloat16 squares, and ``momentum``/``vr-momentum`` with ``fused=True``
    (the rule's update compiled too);
  * VR extra = VR step − its non-VR step, divided by one extra all-reduce of every
    gradient timed in the same rounds (issue 20 target: ≤ 1.5);
  * optimizer step alone (no communication): ``lamb``, ``lars``, ``vr-lamb`` (default,
    foreach, GSNR-only compiled, all compiled) vs torch.optim.AdamW(foreach=True); the
    default against ``gsnr_fused=True`` is issue 20's "within 1.1×".
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
from _timing import horovod_torch_rounds  # noqa: E402


def mlp_setup(batch):
    """The benchmark MLP, its parameter count, one batch (x, y) and the loss."""
    base = build_model()
    x, y = torch.randn(batch, 1536), torch.randint(0, 10, (batch,))
    return base, sum(p.numel() for p in base.parameters()), x, y, torch.nn.CrossEntropyLoss()


def build_model(width=1536, depth=4, seed=0):
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()

    import horovod.torch as hvd
    import hvd_lb.torch as lbt
    hvd.init()
    torch.set_num_threads(1)
    base, n_params, x, y, loss_fn = mlp_setup(args.batch)

    def make(kind):
        model = copy.deepcopy(base)
        named = list(model.named_parameters())
        if kind == "horovod":
            opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                                           named_parameters=named)
            return model, opt
        flags = {"fused": True} if kind.endswith("-fused") else {"fused": False} if kind.endswith("-foreach") else {}
        if kind.startswith("momentum"):
            return model, lbt.DistributedOptimizer(lbt.create("momentum", model, lr=0.01, **flags),
                                                   named_parameters=named)
        dt = torch.bfloat16 if "bf16" in kind else torch.float32
        return model, lbt.DistributedOptimizer(lbt.create("vr-momentum", model, lr=0.01, **flags),
                                               named_parameters=named, square_dtype=dt)

    kinds = ["horovod", "momentum", "vr-f32", "vr-f32-foreach", "vr-bf16", "momentum-fused", "vr-f32-fused"]
    setups = {k: make(k) for k in kinds}
    grads = [torch.randn_like(p) for p in base.parameters()]

    def train_step(kind):
        model, opt = setups[kind]
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    med, first = horovod_torch_rounds({k: (lambda k=k: train_step(k)) for k in kinds}, grads,
                                      args.warmup, args.iters)

    # Optimizer step alone, no communication.
    def step_only(name):
        model = copy.deepcopy(base)
        flags = {"-fused": {"fused": True}, "-foreach": {"fused": False}, "-gsnrfused": {"gsnr_fused": True}}
        suffix = next((f for f in flags if name.endswith(f)), "")
        if name == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        else:
            opt = lbt.create(name[:len(name) - len(suffix)], model, **flags.get(suffix, {}))
        params = [p for g in opt.param_groups for p in g["params"]]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        sq = [p.grad * p.grad * 2.0 for p in params]

        def run():
            if name.startswith("vr-"):
                opt.set_grad_sq(sq)
            opt.step()
        return run

    solo = {n: step_only(n) for n in ("adamw", "lamb", "lars", "vr-lamb", "vr-lamb-foreach", "vr-lamb-gsnrfused",
                                      "lamb-fused", "vr-lamb-fused")}
    solo_t = {n: [] for n in solo}
    for it in range(args.warmup + args.iters):
        for n, run in solo.items():
            t0 = time.thread_time()
            run()
            if it >= args.warmup:
                solo_t[n].append(time.thread_time() - t0)
    solo_med = {n: statistics.median(v) for n, v in solo_t.items()}

    if hvd.rank() == 0:
        h, ar, arc = med["horovod"], med["allreduce"], med["allreduce@cpu"]
        print(f"model: {n_params / 1e6:.2f}M parameters, {hvd.size()} workers, batch {args.batch}/worker, "
              f"{args.iters} timed rounds (medians; cpu = CPU time of the process)")
        for k in kinds:
            print(f"  step {k:15s} wall {1e3 * med[k]:8.2f} ms  / plain Horovod {med[k] / h:5.3f}   "
                  f"cpu {1e3 * med[k + '@cpu']:8.2f} ms   first step {first[k]:6.2f} s")
        print(f"  one all-reduce of all gradients: wall {1e3 * ar:8.2f} ms, cpu {1e3 * arc:8.2f} ms")
        print(f"non-VR wrapper / plain Horovod: {med['momentum'] / h:.3f}")
        for k, non in (("vr-f32", "momentum"), ("vr-f32-foreach", "momentum"), ("vr-bf16", "momentum"),
                       ("vr-f32-fused", "momentum-fused")):
            extra, extrac = med[k] - med[non], med[k + "@cpu"] - med[non + "@cpu"]
            print(f"{k:13s} - {non:14s}: VR extra wall {1e3 * extra:7.2f} ms = {extra / ar:.3f} x one all-reduce, "
                  f"cpu {1e3 * extrac:7.2f} ms = {extrac / arc:.3f} x  (target <= 1.5)")
        a = solo_med["adamw"]
        for n in solo:
            if n != "adamw":
                print(f"optimizer step alone: {n:17s} {1e3 * solo_med[n]:7.2f} ms = {solo_med[n] / a:.3f} x "
                      f"AdamW(foreach) {1e3 * a:.2f} ms")
        gs = {n: solo_med[n] - solo_med["lamb"] for n in ("vr-lamb", "vr-lamb-foreach", "vr-lamb-gsnrfused")}
        print(f"GSNR maths (vr-lamb - lamb): default {1e3 * gs['vr-lamb']:.2f} ms, foreach "
              f"{1e3 * gs['vr-lamb-foreach']:.2f} ms, compiled {1e3 * gs['vr-lamb-gsnrfused']:.2f} ms; "
              f"vr-lamb step default / gsnr_fused=True {solo_med['vr-lamb'] / solo_med['vr-lamb-gsnrfused']:.3f} "
              f"(target <= 1.1), foreach / gsnr_fused=True "
              f"{solo_med['vr-lamb-foreach'] / solo_med['vr-lamb-gsnrfused']:.3f}")

if __name__ == "__main__":
    main()
