"""Step-time benchmark of the torch backend (not a test).

Run:  horovodrun -np 2 -H localhost:2 --gloo .venv/bin/python bench/torch_step.py

On one ~10M-parameter MLP, measured side by side in one run (round-robin, medians):
  * full training step: plain hvd.DistributedOptimizer(torch.optim.SGD(momentum)) vs
    hvd_lb ``momentum`` vs ``vr-momentum`` (float32 and bfloat16 squares);
  * VR extra time / time of one extra all-reduce of every gradient;
  * optimizer step alone (no communication): ``lamb``, ``lars``, ``vr-lamb`` vs
    torch.optim.AdamW(foreach=True).
Targets: non-VR ≤ 1.02× Horovod; VR extra ≤ 1.1× one all-reduce (≤ 0.6× bf16); LAMB ≤ 1.5× AdamW.
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


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
    base = build_model()
    n_params = sum(p.numel() for p in base.parameters())
    x = torch.randn(args.batch, 1536)
    y = torch.randint(0, 10, (args.batch,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def make(kind):
        model = copy.deepcopy(base)
        named = list(model.named_parameters())
        if kind == "horovod":
            opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                                           named_parameters=named)
        elif kind == "momentum":
            opt = lbt.DistributedOptimizer(lbt.create("momentum", model, lr=0.01), named_parameters=named)
        else:
            dt = torch.bfloat16 if kind.endswith("bf16") else torch.float32
            opt = lbt.DistributedOptimizer(lbt.create("vr-momentum", model, lr=0.01), named_parameters=named,
                                           square_dtype=dt)
        return model, opt

    kinds = ["horovod", "momentum", "vr-f32", "vr-bf16"]
    setups = {k: make(k) for k in kinds}
    grads = [torch.randn_like(p) for p in base.parameters()]

    def train_step(kind):
        model, opt = setups[kind]
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    def allreduce_all():
        handles = [hvd.allreduce_async_(g, name=f"bench.ar.{i}", op=hvd.Average) for i, g in enumerate(grads)]
        for h in handles:
            hvd.synchronize(h)

    times = {k: [] for k in kinds + ["allreduce"]}
    for it in range(args.warmup + args.iters):
        for k in kinds + ["allreduce"]:
            hvd.allreduce(torch.zeros(1), name="bench.barrier")
            t0 = time.perf_counter()
            allreduce_all() if k == "allreduce" else train_step(k)
            if it >= args.warmup:
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}

    # Optimizer step alone, no communication.
    def step_only(name):
        model = copy.deepcopy(base)
        if name == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        else:
            opt = lbt.create(name, model, foreach=True)
        params = [p for g in opt.param_groups for p in g["params"]]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        sq = [p.grad * p.grad * 2.0 for p in params]

        def run():
            if name.startswith("vr-"):
                opt.set_grad_sq(sq)
            opt.step()
        return run

    solo = {n: step_only(n) for n in ("adamw", "lamb", "lars", "vr-lamb")}
    solo_t = {n: [] for n in solo}
    for it in range(args.warmup + args.iters):
        for n, run in solo.items():
            t0 = time.perf_counter()
            run()
            if it >= args.warmup:
                solo_t[n].append(time.perf_counter() - t0)
    solo_med = {n: statistics.median(v) for n, v in solo_t.items()}

    if hvd.rank() == 0:
        h = med["horovod"]
        ar = med["allreduce"]
        print(f"model: {n_params / 1e6:.2f}M parameters, {hvd.size()} workers, batch {args.batch}/worker, "
              f"{args.iters} timed iterations (medians)")
        for k in kinds:
            print(f"  step {k:9s} {1e3 * med[k]:8.2f} ms   ratio to plain Horovod {med[k] / h:5.3f}")
        print(f"  one all-reduce of all gradients {1e3 * ar:8.2f} ms")
        print(f"non-VR wrapper / plain Horovod: {med['momentum'] / h:.3f}  (target <= 1.02)")
        for k, target in (("vr-f32", 1.1), ("vr-bf16", 0.6)):
            extra = med[k] - med["momentum"]
            print(f"{k}: extra {1e3 * extra:.2f} ms = {extra / ar:.3f} x one all-reduce  (target <= {target})")
        a = solo_med["adamw"]
        for n in ("lamb", "lars", "vr-lamb"):
            print(f"optimizer step alone: {n:8s} {1e3 * solo_med[n]:7.2f} ms = {solo_med[n] / a:.3f} x "
                  f"AdamW(foreach) {1e3 * a:.2f} ms" + ("  (target <= 1.5)" if n == "lamb" else ""))


if __name__ == "__main__":
    main()
