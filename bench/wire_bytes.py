"""Bytes on the wire per step, measured (not a test): plain Horovod vs VR with each square option.

Run:  horovodrun -np 2 -H localhost:2 --gloo .venv/bin/python bench/wire_bytes.py
      .venv/bin/python bench/wire_bytes.py --table      # the analytic table alone (W to 768)

Each worker reads its own /proc/self/io (``wchar``/``rchar``: bytes passed to write/read
system calls by every thread of the process, Gloo's TCP sockets included) around ``--steps``
training steps of each kind, after ``--warmup`` steps (the first float16 step is float32,
SPEC §1). Nothing else writes in the timed loop, so the difference is the collectives'
traffic plus Horovod's small negotiation messages. Reported: MB per step per worker and
the ratio to plain ``hvd.DistributedOptimizer``.
"""
import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

KINDS = {  # name → DistributedOptimizer keywords for vr-momentum (None: plain Horovod + SGD)
    "horovod": None,
    "vr float32 s": {},
    "vr float16 s": {"square_dtype": "float16"},
    "vr float32 s, N=4": {"gsnr_interval": 4},
    "vr float16 s, N=4": {"square_dtype": "float16", "gsnr_interval": 4},
}


def io_bytes():
    with open("/proc/self/io") as f:
        d = dict(line.split(": ") for line in f.read().splitlines())
    return int(d["wchar"]), int(d["rchar"])


def table(workers=(2, 4, 8, 64, 768)):
    from hvd_lb import squares16
    opts = [(None, 1), ("bfloat16", 1), ("float16", 1), (None, 4), ("float16", 4)]
    head = ["W", "float32 s", "bfloat16 s (wire)", "float16 s", "float32 s, N = 4", "float16 s, N = 4"]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for row in squares16.bytes_table(workers, opts):
        print("| " + " | ".join(row[:1] + [x + "×" for x in row[1:]]) + " |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if args.table:
        table()
        return
    import horovod.torch as hvd
    import hvd_lb.torch as lbt
    hvd.init()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(args.width, args.width), torch.nn.ReLU(),
                               torch.nn.Linear(args.width, args.width), torch.nn.ReLU(),
                               torch.nn.Linear(args.width, 10))
    n = sum(p.numel() for p in base.parameters())
    x, y = torch.randn(8, args.width), torch.randint(0, 10, (8,))
    per_step = {}
    for name, kw in KINDS.items():
        model = copy.deepcopy(base)
        named = list(model.named_parameters())
        if kw is None:
            opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                                           named_parameters=named)
        else:
            opt = lbt.DistributedOptimizer(lbt.create("vr-momentum", model, lr=0.01), named_parameters=named,
                                           micro_batches=2, **kw)

        def step():
            opt.zero_grad()
            for _ in range(1 if kw is None else 2):
                torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        for _ in range(args.warmup):
            step()
        hvd.allreduce(torch.zeros(1), name=f"fence.{name}")
        w0, r0 = io_bytes()
        for _ in range(args.steps):
            step()
        w1, r1 = io_bytes()
        hvd.allreduce(torch.zeros(1), name=f"fence2.{name}")
        per_step[name] = ((w1 - w0) / args.steps, (r1 - r0) / args.steps)
    every = hvd.allgather_object(per_step)
    if hvd.rank() == 0:
        W = hvd.size()
        ring = 2 * (W - 1) / W * 4 * n
        print(f"{n / 1e6:.2f}M parameters, -np {W}; analytic ring all-reduce of the float32 gradients: "
              f"{ring / 1e6:.2f} MB sent per worker per step")
        print("| kind | sent MB/step (per rank) | received MB/step (per rank) | sent / plain Horovod |")
        print("| --- | --- | --- | --- |")
        h = sum(r["horovod"][0] for r in every) / W
        for name in KINDS:
            sent = [r[name][0] / 1e6 for r in every]
            got = [r[name][1] / 1e6 for r in every]
            mean = sum(r[name][0] for r in every) / W
            print(f"| {name} | {', '.join(f'{v:.2f}' for v in sent)} | {', '.join(f'{v:.2f}' for v in got)} "
                  f"| {mean / h:.3f}× |")


if __name__ == "__main__":
    main()
