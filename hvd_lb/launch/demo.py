"""``hvd-lb demo``: large-batch Fashion-MNIST under real ``horovodrun``.

Trains a small CNN with each optimizer over a small learning-rate grid around
the square-root-rule rate scaled from a batch-256 baseline (Krizhevsky 2014;
Hoffer et al. 2017), at a large batch with k = workers × micro_batches
gradient samples, and reports what it measures: best test accuracy, the
train–test gap, the range of grid rates that trained stably, and wall time.
Nothing here is tuned toward an expected winner.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

from .. import rules
from ..schedules import scaled_lr

DEFAULT_OPTIMIZERS = "momentum,vr-momentum,lars,vr-lars,lamb,vr-lamb"
BASE_BATCH = 256
# Small-batch (256) learning rates per base rule: the usual starting points for
# each family; the demo scales them with the sqrt rule and searches a grid.
BASE_LR = {"sgd": 0.1, "momentum": 0.05, "adam": 1e-3, "lars": 1.0, "lamb": 2e-3,
           "sngm": 0.02, "tvlars": 1.0}


def add_arguments(p):
    p.add_argument("--framework", choices=("torch", "tf"), default="torch")
    p.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS,
                   help=f"comma-separated names (default {DEFAULT_OPTIMIZERS}); any of: {', '.join(rules.NAMES)}")
    p.add_argument("--batch-size", type=int, default=8192, help="global batch (default 8192)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr-grid", default="0.5,1,2",
                   help="multipliers of the sqrt-rule learning rate (default 0.5,1,2)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--micro-batches", type=int, default=None, help="default: 8 / workers, so that k = 8")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--train-subset", type=int, default=None, help="use only the first N training images")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--out-dir", default="out/demo")
    p.add_argument("--controller", choices=("gloo", "mpi"), default="gloo")


def parse_config(args) -> Dict:
    """Validate the demo options; every mistake is one clear ValueError."""
    from ..data import FASHION_MNIST_DIR, fashion_mnist_available

    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    if not names:
        raise ValueError("invalid --optimizers='': name at least one optimizer")
    names = [rules.get_rule(n).name for n in names]
    for arg, v in (("--workers", args.workers), ("--epochs", args.epochs), ("--seeds", args.seeds),
                   ("--batch-size", args.batch_size)):
        if v < 1:
            raise ValueError(f"invalid {arg} {v}: must be an integer in [1, inf)")
    micro = args.micro_batches if args.micro_batches is not None else max(1, 8 // args.workers)
    if micro < 1:
        raise ValueError(f"invalid --micro-batches {micro}: must be an integer in [1, inf)")
    k = args.workers * micro
    if any(rules.get_rule(n).gsnr for n in names):
        rules.check_samples(args.workers, micro)
    if args.batch_size % k:
        raise ValueError(f"invalid --batch-size {args.batch_size}: must be divisible by workers × "
                         f"micro-batches = {args.workers} × {micro} = {k}")
    try:
        grid = sorted({float(x) for x in args.lr_grid.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"invalid --lr-grid {args.lr_grid!r}: must be comma-separated positive numbers") from None
    if not grid or any(not (g > 0 and math.isfinite(g)) for g in grid):
        raise ValueError(f"invalid --lr-grid {args.lr_grid!r}: must be comma-separated positive numbers")
    if args.weight_decay < 0:
        raise ValueError(f"invalid --weight-decay {args.weight_decay}: must be in [0, inf)")
    if not fashion_mnist_available():
        raise FileNotFoundError(f"Fashion-MNIST not found in {FASHION_MNIST_DIR}: "
                                "apt-get install dataset-fashion-mnist")
    if args.train_subset is not None and args.train_subset < args.batch_size:
        raise ValueError(f"invalid --train-subset {args.train_subset}: must be ≥ --batch-size {args.batch_size}")
    runs = []
    for name in names:
        base = rules.get_rule(name).base
        center = scaled_lr(BASE_LR[base], args.batch_size, BASE_BATCH, "sqrt")
        for mult in grid:
            for seed in range(args.seeds):
                runs.append({"optimizer": name, "lr": center * mult, "lr_multiplier": mult, "seed": seed})
    return {
        "framework": args.framework, "optimizers": names, "batch_size": args.batch_size,
        "epochs": args.epochs, "workers": args.workers, "micro_batches": micro, "k": k,
        "seeds": args.seeds, "lr_grid": grid, "train_subset": args.train_subset,
        "weight_decay": args.weight_decay, "base_batch": BASE_BATCH, "runs": runs,
    }


def summarize(config: Dict, raw: List[Dict]) -> List[Dict]:
    """One row per optimizer: best grid rate by mean best test accuracy over seeds."""
    rows = []
    for name in config["optimizers"]:
        runs = [r for r in raw if r["optimizer"] == name]
        by_lr: Dict[float, List[Dict]] = {}
        for r in runs:
            by_lr.setdefault(r["lr"], []).append(r)
        stable = sorted(lr for lr, rs in by_lr.items() if all(x["stable"] for x in rs))
        scored = []
        for lr, rs in by_lr.items():
            accs = [max(x["test_acc"]) if x["test_acc"] else 0.0 for x in rs]
            scored.append((sum(accs) / len(accs), lr, rs, accs))
        # The best rate is chosen among the stable ones (all rates when none is stable).
        candidates = [sc for sc in scored if sc[1] in stable] or scored
        mean_acc, best_lr, best_runs, accs = max(candidates, key=lambda sc: (sc[0], -sc[1]))
        std = (sum((a - mean_acc) ** 2 for a in accs) / len(accs)) ** 0.5
        gaps = []
        for x in best_runs:
            if x["test_acc"]:
                i = max(range(len(x["test_acc"])), key=lambda j: x["test_acc"][j])
                gaps.append(x["train_acc"][i] - x["test_acc"][i])
        rows.append({
            "optimizer": name, "best_lr": best_lr, "best_test_acc": mean_acc, "best_test_acc_std": std,
            "train_test_gap": sum(gaps) / len(gaps) if gaps else float("nan"),
            "best_lr_stable": best_lr in stable, "stable_lrs": stable,
            "largest_stable_lr": stable[-1] if stable else None,
            "wall_time_s": sum(x["wall_time_s"] for x in runs), "runs": len(runs),
        })
    return rows


def format_table(config: Dict, rows: List[Dict]) -> str:
    seeds = config["seeds"]
    head = (f"Fashion-MNIST, small CNN, batch {config['batch_size']}, {config['workers']} workers × "
            f"{config['micro_batches']} micro-batches (k = {config['k']}), {config['epochs']} epochs, "
            f"{seeds} seed(s), {config['framework']}")
    lines = [head, "",
             f"{'optimizer':<13} {'best lr':>9} {'best test acc':>17} {'train-test gap':>15} "
             f"{'stable grid rates':>26} {'wall s':>8}"]
    for r in rows:
        acc = f"{100 * r['best_test_acc']:.2f}%"
        if seeds > 1:
            acc += f" ± {100 * r['best_test_acc_std']:.2f}"
        rng = ", ".join(f"{lr:.3g}" for lr in r["stable_lrs"]) or "none"
        gap = "n/a" if r["train_test_gap"] != r["train_test_gap"] else f"{100 * r['train_test_gap']:+.2f} pp"
        lines.append(f"{r['optimizer']:<13} {r['best_lr']:>9.3g} {acc:>17} {gap:>15} {rng:>26} "
                     f"{r['wall_time_s']:>8.1f}")
    return "\n".join(lines)


def plot(config: Dict, raw: List[Dict], rows: List[Dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in rows:
        runs = [r for r in raw if r["optimizer"] == row["optimizer"] and r["lr"] == row["best_lr"]]
        curves = [r["test_acc"] for r in runs if r["test_acc"]]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        mean = np.mean([c[:n] for c in curves], axis=0)
        style = "-" if row["optimizer"].startswith("vr-") else "--"
        ax1.plot(range(1, n + 1), 100 * mean, style, marker="o",
                 label=f"{row['optimizer']} (lr {row['best_lr']:.3g})")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("test accuracy (%)")
    ax1.set_title(f"best grid rate per optimizer, batch {config['batch_size']}")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    gsnr = [v for r in raw for v in r.get("gsnr_log10", [])]
    if gsnr:
        ax2.hist(gsnr, bins=40, color="tab:blue", alpha=0.8)
        ax2.set_xlabel("log10 mean GSNR per tensor and step (VR runs)")
        ax2.set_ylabel("count")
    else:
        ax2.text(0.5, 0.5, "no VR optimizer run", ha="center", va="center")
    ax2.set_title("GSNR of the gradients (SPEC §2)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args) -> int:
    from .cli import UsageError, build_run_command

    config = parse_config(args)
    out_dir = os.path.abspath(args.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    worker = {"torch": "hvd_lb.launch.demo_torch", "tf": "hvd_lb.launch.demo_tf"}[config["framework"]]
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = os.path.join(tmp, "config.json")
        raw_path = os.path.join(tmp, "raw.json")
        with open(cfg_path, "w") as f:
            json.dump({**config, "raw_path": raw_path}, f)
        cmd, env, _ = build_run_command(config["workers"], None, args.controller,
                                        [sys.executable, "-m", worker, cfg_path], None, 64.0, 1.0, [])
        env["PYTHONPATH"] = os.pathsep.join(
            [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
             env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["PYTHONUNBUFFERED"] = "1"
        print(f"hvd-lb demo: {len(config['runs'])} runs; running: {' '.join(cmd)}", flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd, env=env)
        if rc != 0 or not os.path.exists(raw_path):
            raise UsageError(f"horovodrun exited with code {rc}; see the worker output above")
        with open(raw_path) as f:
            raw = json.load(f)
    rows = summarize(config, raw)
    table = format_table(config, rows)
    print()
    print(table)
    result = {"config": {k: v for k, v in config.items() if k != "runs"}, "summary": rows, "runs": raw,
              "total_wall_time_s": time.time() - t0}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(config, raw, rows, os.path.join(out_dir, "results.png"))
    print(f"\nwrote {os.path.join(out_dir, 'results.json')} and {os.path.join(out_dir, 'results.png')}")
    return 0
