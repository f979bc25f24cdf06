"""Peak RSS of an optimizer step: plain Horovod + SGD vs hvd_lb non-VR vs VR, in one run.

Each configuration runs in its own process under ``horovodrun -np 2`` on one 50M-element
float32 parameter (as in issue 12's probe) for 3 steps; rank 0 reports ``ru_maxrss``. Ratios
are against plain Horovod + ``torch.optim.SGD(momentum=0.9)`` measured in the same run.

    .venv/bin/python bench/memory.py [--numel 50000000]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["horovod-sgd", "momentum", "vr-momentum", "vr-momentum-foreach", "vr-momentum-M2", "vr-momentum-bf16",
           "gsnr-adamw"]


def worker(config, numel, out):
    import resource

    import torch

    import hvd_lb.torch as hvd

    hvd.init()
    torch.set_num_threads(1)
    w = torch.nn.Parameter(torch.zeros(numel))
    M = 2 if config.endswith("M2") else 1
    if config == "horovod-sgd":
        import horovod.torch as horovod
        opt = horovod.DistributedOptimizer(torch.optim.SGD([w], lr=0.01, momentum=0.9), named_parameters=[("w", w)])
    elif config == "gsnr-adamw":
        opt = hvd.DistributedOptimizer(hvd.GSNR(torch.optim.AdamW([w], lr=0.01)), named_parameters=[("w", w)])
    else:
        name = config.replace("-M2", "").replace("-bf16", "").replace("-foreach", "")
        flags = {"fused": False} if config.endswith("-foreach") else {}   # default: GSNR compiled (CPU)
        opt = hvd.DistributedOptimizer(hvd.create(name, [w], lr=0.01, **flags), named_parameters=[("w", w)],
                                       micro_batches=M, square_dtype="bfloat16" if "bf16" in config else None)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gen = torch.Generator().manual_seed(hvd.rank())
    for _ in range(3):
        for _ in range(M):
            (w * torch.randn(numel, generator=gen)).sum().backward()
        opt.step()
        opt.zero_grad()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if hvd.rank() == 0:
        with open(out, "w") as f:
            json.dump({"before_kb": before, "peak_kb": peak}, f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--numel", type=int, default=50_000_000)
    ap.add_argument("--worker", nargs=2)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker[0], args.numel, args.worker[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONWARNINGS="ignore")
    hvdrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    mb = args.numel * 4 / 2 ** 20
    print(f"one float32 parameter of {args.numel / 1e6:.0f}M elements = {mb:.0f} MiB; peak RSS of rank 0")
    print(f"{'config':<18} {'peak MiB':>9} {'above start MiB':>16} {'× param':>8} {'ratio':>6}")
    base = None
    for config in CONFIGS:
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            subprocess.run([hvdrun, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, __file__,
                            "--numel", str(args.numel), "--worker", config, tmp.name], env=env, check=True,
                           capture_output=True)
            res = json.load(open(tmp.name))
        peak = res["peak_kb"] / 1024
        extra = (res["peak_kb"] - res["before_kb"]) / 1024
        base = base or peak
        print(f"{config:<18} {peak:>9.0f} {extra:>16.0f} {extra / mb:>8.1f} {peak / base:>6.2f}")


if __name__ == "__main__":
    main()
