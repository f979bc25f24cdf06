"""``hvd-lb demo``: large-batch Fashion-MNIST against a small-batch baseline, under real ``horovodrun``.

One ``horovodrun`` job (2 Gloo workers by default) trains an MLP on the real
Fashion-MNIST IDX files, run after run:

* the **baseline**: batch 256, momentum at its usual rate (0.1 per 256,
  Goyal et al. 2017), no warm-up: the accuracy a large batch should get back;
* each large-batch **row** (batch 8192, k = workers × micro-batches = 8
  gradient samples) at every rate of a small grid, for every seed. A row's
  grid is centred on its rule's batch-256 rate scaled by the rule its paper
  documents (``LR_RULES``); a VR rule's grid is its base rule's grid × 2,
  because GSNR scaling shrinks the mean step (mean r ≈ 0.49 at k = 8,
  docs/SPEC.md §2), so a grid that stopped at the base rule's top rate would
  only compare a smaller step.

Every row trains for the same number of epochs with the same schedule
(linear warm-up, then cosine decay to 0); the rows marked ``:no-warmup`` and
TVLARS (whose paper replaces warm-up) start at the full rate. The summary
picks each row's best rate among the *stable* ones only and reports what it
measured; nothing is tuned toward an expected winner. Rank 0 writes its
progress to a file; this driver shows it as one progress bar and keeps the
workers' output (Horovod, TensorFlow) in ``<out-dir>/horovodrun.log``.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List

from .. import rules, squares16
from ..schedules import scaled_lr
from . import options
from .demo_common import MODELS
from .data import FASHION_MNIST_DIR, fashion_mnist_available, fashion_mnist_size
from .horovodrun import UsageError, build_run_command

BASE_BATCH = 256
# The small-batch baseline: momentum at Goyal et al.'s 0.1 per 256 images.
BASELINE_OPTIMIZER, BASELINE_LR = "momentum", 0.1
# Per base rule: its batch-256 starting rate and the learning-rate scaling rule
# its paper documents for larger batches.
LR_RULES = {
    "sgd": (0.1, "linear", "Goyal et al. 2017"),
    "momentum": (0.1, "linear", "Goyal et al. 2017"),
    "lars": (1.0, "linear", "You et al. 2017"),
    "tvlars": (1.0, "linear", "Do et al. 2023 (LARS's rule)"),
    "lamb": (2e-3, "sqrt", "You et al. 2020"),
    "adam": (1e-3, "sqrt", "Hoffer et al. 2017"),
    "sngm": (0.02, "sqrt", "Zhao et al. 2020, Corollary 1: lr = sqrt(B/C)"),
}
# GSNR scaling shrinks the mean step about 2x at k >= 8 (docs/SPEC.md §2 note).
VR_LR_FACTOR = 2.0
# --seeds: NumPy's and Keras's seed range.
MAX_SEED = 2 ** 32 - 1
# Rules whose papers train without warm-up by design.
NO_WARMUP_RULES = ("tvlars",)
WARMUP_EPOCHS = 5.0  # Goyal et al. 2017 (capped at a quarter of the epochs)

PRESETS = {
    # ≤ 10 minutes on 2 cores: the rows the question needs, 2 seeds.
    "default": {
        "model": "mlp",
        "optimizers": "momentum:no-warmup,momentum,lars,lamb,tvlars,sngm,vr-momentum,vr-lars,vr-lamb",
        "epochs": 16, "seeds": "0,1", "lr_grid": "0.25,0.5,1,2",
    },
    # A fuller study (hours on 2 cores): every base rule and VR variant, a wider grid,
    # longer training, 3 seeds.
    "full": {
        "model": "mlp",
        "optimizers": ("momentum:no-warmup,momentum,adam,lars,lamb,tvlars,sngm,"
                       "vr-momentum,vr-adam,vr-lars,vr-lamb,vr-tvlars,vr-sngm"),
        "epochs": 40, "seeds": "0,1,2", "lr_grid": "0.0625,0.125,0.25,0.5,1,2,4",
    },
    # The default rows on the CNN (about an hour on 2 cores), and the VR rows again at
    # k = 16 (the same batch in twice the micro-batches): does GSNR clip differently?
    "cnn": {
        "model": "cnn",
        "optimizers": ("momentum:no-warmup,momentum,lars,lamb,tvlars,sngm,vr-momentum,vr-lars,vr-lamb,"
                       "vr-momentum@k16,vr-lars@k16,vr-lamb@k16"),
        "epochs": 10, "seeds": "0,1", "lr_grid": "0.25,0.5,1,2",
    },
}
ROW_SUFFIXES = ("no-warmup", "warmup")


def add_arguments(p):
    p.add_argument("--preset", choices=tuple(PRESETS), default="default",
                   help="default: the 10-minute comparison; full: every rule, wider grid, 40 epochs, 3 seeds; "
                        "cnn: the default rows on a small CNN with batch norm, VR rows also at k = 16 (~1 h)")
    p.add_argument("--framework", choices=("torch", "tf"), default="torch")
    p.add_argument("--model", choices=tuple(MODELS), default=None,
                   help="mlp (784-128-64-10) or cnn (3 conv-BN blocks); default: the preset's")
    p.add_argument("--optimizers", default=None,
                   help="comma-separated large-batch rows, NAME or NAME:no-warmup / NAME:warmup, each "
                        "optionally @kN for k = N gradient samples (N / workers micro-batches) instead of "
                        f"the job's (default: the preset's); NAME is any of: {', '.join(rules.NAMES)}")
    p.add_argument("--batch-size", default=8192, help="large global batch (default 8192)")
    p.add_argument("--epochs", default=None, help="epochs for every row (default: the preset's)")
    p.add_argument("--lr-grid", default=None,
                   help="multipliers of each rule's scaled rate (default: the preset's; VR rules × 2)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the preset's, 0,1)")
    p.add_argument("--warmup-epochs", default=None,
                   help=f"linear warm-up length (default {WARMUP_EPOCHS:g}, at most a quarter of --epochs)")
    p.add_argument("--workers", default=2, help="horovodrun -np (default 2)")
    p.add_argument("--micro-batches", default=None, help="default: 8 / workers, so that k = 8")
    p.add_argument("--no-baseline", action="store_true", help="skip the batch-256 baseline")
    p.add_argument("--train-subset", default=None, help="use only the first N training images")
    p.add_argument("--weight-decay", default=5e-4, help="λ of every row (default 5e-4)")
    p.add_argument("--out-dir", default="out/demo", help="created if missing; must be writable")
    p.add_argument("--controller", choices=("gloo", "mpi"), default="gloo")
    p.add_argument("--report", default=None, metavar="PATH",
                   help="train nothing: print the table and redraw the picture (next to PATH) of a finished "
                        "job's results.json, or of the runs a stopped job finished (its <out-dir>/job folder)")
    p.add_argument("--square-dtype", choices=("float32", "float16"), default=None,
                   help="VR rows: the dtype s travels in (default float32; float16: scaled, SPEC §1)")
    p.add_argument("--gsnr-interval", default=1, help="VR rows: reduce s every N-th step (default 1)")


def parse_rows(text: str) -> List[Dict]:
    """``"momentum:no-warmup,lars,vr-lamb@k16"`` → row specs (key, optimizer, warm-up or not, k or None)."""
    rows, seen = [], set()
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        spec, at, k_text = item.partition("@")
        k = None
        if at:
            if not (k_text[:1] == "k" and k_text[1:].isdigit() and int(k_text[1:]) >= 1):
                raise ValueError(f"invalid --optimizers entry {item!r}: after @ comes kN, N ≥ 1 gradient "
                                 "samples per step, e.g. vr-lamb@k16")
            k = int(k_text[1:])
        name, _, suffix = spec.partition(":")
        if suffix and suffix not in ROW_SUFFIXES:
            raise ValueError(f"invalid --optimizers entry {item!r}: the suffix must be one of "
                             f"{', '.join(':' + s for s in ROW_SUFFIXES)}")
        try:
            rule = rules.get_rule(name.strip())
        except ValueError as e:
            raise ValueError(f"invalid --optimizers {text!r}: {e}") from None
        if rule.base not in LR_RULES:
            raise ValueError(f"invalid --optimizers {text!r}: the demo has no batch-256 rate for {rule.name!r} "
                             f"(it has them for {', '.join(LR_RULES)} and their vr- twins)")
        warmup = (suffix == "warmup") if suffix else rule.base not in NO_WARMUP_RULES
        key = rule.name + (":" + suffix if suffix else "") + (f"@k{k}" if k else "")
        if key in seen:
            raise ValueError(f"invalid --optimizers {text!r}: {key!r} is listed twice")
        seen.add(key)
        rows.append({"row": key, "optimizer": rule.name, "warmup": warmup, "k": k})
    if not rows:
        raise ValueError(f"invalid --optimizers {text!r}: name at least one optimizer")
    return rows


def parse_floats(arg: str, text: str) -> List[float]:
    try:
        vals = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError:
        vals = []
    if not vals or any(not (v > 0 and math.isfinite(v)) for v in vals):
        raise ValueError(f"invalid {arg} {text!r}: must be comma-separated positive numbers")
    return vals


def parse_seeds(text: str) -> List[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        seeds = []
    if not seeds or any(not 0 <= s <= MAX_SEED for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"invalid --seeds {text!r}: must be distinct integers in [0, {MAX_SEED}], e.g. 0,1")
    return seeds


def center_lr(optimizer: str, batch: int) -> float:
    """The rule's batch-256 rate scaled to ``batch`` by its documented rule (× 2 for VR rules).

    The grid is ``--lr-grid`` × this rate, so a VR rule's grid is its base rule's × 2.
    """
    rule = rules.get_rule(optimizer)
    base_lr, how, _ = LR_RULES[rule.base]
    return scaled_lr(base_lr, batch, BASE_BATCH, how) * (VR_LR_FACTOR if rule.gsnr else 1.0)


def parse_config(args) -> Dict:
    """Validate the demo options; every mistake is one clear ValueError."""
    preset = PRESETS[args.preset]
    pick = lambda v, key: preset[key] if v is None else v  # noqa: E731
    rows = parse_rows(pick(args.optimizers, "optimizers"))
    arch = pick(args.model, "model")
    epochs = options.integer("--epochs", pick(args.epochs, "epochs"))
    workers = options.integer("--workers", args.workers)
    batch = options.integer("--batch-size", args.batch_size)
    seeds = parse_seeds(str(pick(args.seeds, "seeds")))
    grid = parse_floats("--lr-grid", pick(args.lr_grid, "lr_grid"))
    micro = options.integer("--micro-batches", max(1, 8 // workers) if args.micro_batches is None
                            else args.micro_batches)
    k = workers * micro
    for row in rows:
        if row["k"] is None:
            row["k"], row["micro_batches"] = k, micro
        elif row["k"] % workers:
            raise ValueError(f"invalid --optimizers entry {row['row']!r}: k = {row['k']} must be a multiple of "
                             f"--workers {workers} (k = workers × micro-batches)")
        else:
            row["micro_batches"] = row["k"] // workers
        if batch % row["k"]:
            raise ValueError(f"invalid --batch-size {batch}: must be divisible by workers × micro-batches = "
                             f"{workers} × {row['micro_batches']} = {row['k']}" +
                             (f" (row {row['row']})" if row["k"] != k else ""))
    for row in rows:
        center = center_lr(row["optimizer"], batch)
        if not (math.isfinite(center * grid[-1]) and center * grid[0] > 0):
            raise ValueError(f"invalid --lr-grid {pick(args.lr_grid, 'lr_grid')!r}: {row['row']}'s rates "
                             f"{center:g} × [{grid[0]:g}, {grid[-1]:g}] = [{center * grid[0]:g}, "
                             f"{center * grid[-1]:g}] must be finite and positive")
    notes = []  # printed once the options are all valid
    for row in (r for r in rows if rules.get_rule(r["optimizer"]).gsnr):
        m = row["micro_batches"]
        if row["k"] < 2:
            raise ValueError(f"invalid --micro-batches {m} with --workers {workers}: VR rows need "
                             f"k = workers × micro-batches ≥ 2 gradient samples, got k = {workers} × {m} = "
                             f"{row['k']} (row {row['row']})")
        notes += [n for n in [rules.small_k_note(workers, m)] if n and n not in notes]
    baseline = not args.no_baseline
    if baseline and BASE_BATCH % workers:
        raise ValueError(f"invalid --workers {workers}: the batch-{BASE_BATCH} baseline must split evenly "
                         "over the workers (or pass --no-baseline)")
    warmup = (min(WARMUP_EPOCHS, epochs / 4) if args.warmup_epochs is None
              else options.number("--warmup-epochs", args.warmup_epochs))
    if not warmup < epochs:
        raise ValueError(f"invalid --warmup-epochs {warmup:g}: must be in [0, --epochs={epochs})")
    weight_decay = options.number("--weight-decay", args.weight_decay)
    square_dtype = args.square_dtype
    interval = options.integer("--gsnr-interval", args.gsnr_interval, high=squares16.MAX_INTERVAL)
    if args.framework == "tf" and (square_dtype == "float16" or interval != 1):
        # The TF worker reduces through DistributedGradientTape, which keeps no state across steps.
        raise ValueError(f"invalid --square-dtype {square_dtype} / --gsnr-interval {interval} with --framework tf: "
                         "the TF demo worker runs float32 squares every step (use --framework torch)")
    if args.framework == "tf" and importlib.util.find_spec("tensorflow") is None:
        raise ValueError("invalid --framework tf: TensorFlow is not installed (make install)")
    if args.controller == "mpi" and shutil.which("mpirun") is None:
        raise ValueError("invalid --controller mpi: mpirun not found (apt-get install openmpi-bin libopenmpi-dev)")
    if not fashion_mnist_available():
        raise FileNotFoundError(f"Fashion-MNIST not found in {FASHION_MNIST_DIR}: "
                                "apt-get install dataset-fashion-mnist (or set HVD_LB_FASHION_MNIST)")
    n_total = fashion_mnist_size("train")
    if batch > n_total:
        raise ValueError(f"invalid --batch-size {batch}: must be at most the {n_total} training images")
    # Every run needs a full batch per epoch, the baseline's included.
    subset = None if args.train_subset is None else options.integer(
        "--train-subset", args.train_subset, low=max(batch, BASE_BATCH if baseline else 1), high=n_total)
    runs = []
    if baseline:
        for seed in seeds:
            runs.append({"row": "baseline", "optimizer": BASELINE_OPTIMIZER, "lr": BASELINE_LR,
                         "lr_multiplier": 1.0, "seed": seed, "batch_size": BASE_BATCH, "micro_batches": 1,
                         "warmup_epochs": 0.0})
    for row in rows:
        row["center_lr"] = center_lr(row["optimizer"], batch)
        row["rule_lr"] = center_lr(rules.get_rule(row["optimizer"]).base, batch)  # without the VR factor
        row["lr_rule"] = LR_RULES[rules.get_rule(row["optimizer"]).base][1]
        row["warmup_epochs"] = warmup if row["warmup"] else 0.0
        for m in grid:
            for seed in seeds:
                runs.append({"row": row["row"], "optimizer": row["optimizer"], "lr": row["center_lr"] * m,
                             "lr_multiplier": m, "seed": seed, "batch_size": batch,
                             "micro_batches": row["micro_batches"],
                             "warmup_epochs": row["warmup_epochs"]})
    return {
        "preset": args.preset, "framework": args.framework, "rows": rows, "baseline": baseline,
        "base_batch": BASE_BATCH, "baseline_optimizer": BASELINE_OPTIMIZER, "baseline_lr": BASELINE_LR,
        "batch_size": batch, "epochs": epochs, "workers": workers, "micro_batches": micro, "k": k,
        "seeds": seeds, "lr_grid": grid, "vr_lr_factor": VR_LR_FACTOR, "warmup_epochs": warmup,
        "train_subset": subset, "weight_decay": weight_decay,
        "arch": arch, "model": MODELS[arch], "n_train": subset or n_total,
        "notes": notes, "runs": runs,
        "square_dtype": square_dtype, "gsnr_interval": interval,
    }


# --- running the job ------------------------------------------------------------------

class _Progress:
    """One bar for the whole job, fed by the JSON lines rank 0 appends to a file."""

    def __init__(self, config: Dict, stream=None):
        self.config, self.epochs = config, config["epochs"]
        # The bar counts work, not epochs: an epoch costs its images plus a per-step
        # overhead (a batch-256 epoch has 234 steps, a batch-8192 one 7), so the ETA holds.
        self.cost = [self.epoch_cost(config, r) for r in config["runs"]]
        self.done = 0
        self.stream = stream or sys.stderr
        try:
            from tqdm import tqdm
        except ImportError:  # plain lines, one per finished run
            self.bar = None
        else:
            self.bar = tqdm(total=sum(c * self.epochs for c in self.cost), file=self.stream,
                            dynamic_ncols=True, mininterval=0.5, smoothing=0.1,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
            self.bar.set_description(f"run 1/{len(config['runs'])} starting horovodrun")

    @staticmethod
    def epoch_cost(config: Dict, run: Dict) -> int:
        steps = max(1, config["n_train"] // run["batch_size"])
        return 20 + steps // 3

    def event(self, ev: Dict) -> None:
        runs = self.config["runs"]
        run = runs[ev["run"]]
        what = f"run {ev['run'] + 1}/{len(runs)} {run['row']} lr={run['lr']:.3g} seed={run['seed']}"
        if ev["ev"] == "epoch":
            self._advance(self.cost[ev["run"]])
            if self.bar is not None:
                self.bar.set_description(f"{what} epoch {ev['epoch'] + 1}/{self.epochs}", refresh=False)
                self.bar.set_postfix_str(f"test {100 * ev['test_acc']:.1f}%", refresh=False)
        elif ev["ev"] == "end":
            self._advance(self.cost[ev["run"]] * (self.epochs - ev["epochs"]))
            if self.bar is None:
                print(f"[{ev['run'] + 1}/{len(runs)}] {what}: best test {100 * ev['best_test_acc']:.2f}% "
                      f"{'' if ev['stable'] else '(unstable)'}", file=self.stream, flush=True)

    def _advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None and n:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_job(config: Dict, out_dir: str, controller: str) -> List[Dict]:
    """Run every configured run in one horovodrun job; return rank 0's raw records."""
    worker = {"torch": "hvd_lb.launch.demo_torch", "tf": "hvd_lb.launch.demo_tf"}[config["framework"]]
    job = os.path.join(out_dir, "job")
    os.makedirs(job, exist_ok=True)
    cfg_path, raw_path = os.path.join(job, "config.json"), os.path.join(job, "raw.json")
    progress_path, log_path = os.path.join(job, "progress.jsonl"), os.path.join(out_dir, "horovodrun.log")
    for p in (raw_path, progress_path):
        if os.path.exists(p):
            os.remove(p)
    with open(cfg_path, "w") as f:
        json.dump({**config, "raw_path": raw_path, "progress_path": progress_path}, f)
    cmd, env, _ = build_run_command(config["workers"], None, controller,
                                    [sys.executable, "-m", worker, cfg_path], None, 64.0, 1.0, [])
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    # The workers' output goes to the log; keep TensorFlow's C++ and absl logs out of it too.
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env.setdefault("GRPC_VERBOSITY", "ERROR")
    env.setdefault("ABSL_MIN_LOG_LEVEL", "3")
    progress = _Progress(config)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        offset, buf = 0, ""
        try:
            while True:
                rc = proc.poll()
                if os.path.exists(progress_path):
                    with open(progress_path) as f:
                        f.seek(offset)
                        chunk = f.read()
                        offset = f.tell()
                    buf += chunk
                    *lines, buf = buf.split("\n")
                    for line in lines:
                        if line.strip():
                            progress.event(json.loads(line))
                if rc is not None:
                    break
                time.sleep(0.25)
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            if os.path.exists(raw_path):
                print(f"\nthe runs it finished: hvd-lb demo --report {job}", file=sys.stderr)
            raise
        finally:
            progress.close()
    if rc != 0 or not os.path.exists(raw_path):
        with open(log_path, errors="replace") as f:
            tail = f.read().splitlines()[-60:]
        print("\n".join(tail), file=sys.stderr)
        kept = (f"; the runs it finished: hvd-lb demo --report {job}" if os.path.exists(raw_path) else "")
        raise UsageError(f"horovodrun exited with code {rc}; the last lines of {log_path} are above{kept}")
    with open(raw_path) as f:
        return json.load(f)


def report_only(path: str) -> int:
    """``--report``: the table and picture of a finished job from its results.json."""
    from . import demo_report as report

    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "raw.json")):
        # A stopped job's folder (<out-dir>/job): its config and the runs it finished.
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(path, "raw.json")) as f:
            raw = json.load(f)
        result = {}
        print(f"{len(raw)} of {len(config['runs'])} runs finished", flush=True)
        config["rows"] = [r for r in config["rows"] if any(x["row"] == r["row"] for x in raw)]
        config["baseline"] = config["baseline"] and any(x["row"] == "baseline" for x in raw)
    elif os.path.isfile(path):
        with open(path) as f:
            result = json.load(f)
        config, raw = result["config"], result["runs"]
    else:
        raise ValueError(f"invalid --report {path!r}: not a results.json that hvd-lb demo wrote, nor a job "
                         "folder (<out-dir>/job) with config.json and raw.json")
    png = os.path.join(os.path.dirname(os.path.normpath(path)), "results.png")
    _report(config, raw, result.get("total_wall_time_s"), png)
    print(f"\nwrote {png}")
    return 0


def _report(config, raw, wall, png):
    """Print the table (and the per-layer-type one), draw ``png``; returns the summary."""
    from . import demo_report as report

    summary = report.summarize(config, raw)
    print(report.format_table(config, summary, wall))
    layers = report.format_layer_types(config, raw, summary)
    if layers:
        print("\n" + layers)
    report.plot(config, raw, summary, png)
    return summary


def main(args) -> int:
    from . import demo_report as report

    if args.report:
        return report_only(args.report)
    t0 = time.time()
    config = parse_config(args)
    out_dir = options.writable_dir("--out-dir", args.out_dir)
    n_rows = len(config["rows"])
    print(f"hvd-lb demo: {len(config['runs'])} runs ({'baseline + ' if config['baseline'] else ''}{n_rows} "
          f"large-batch rows × {len(config['lr_grid'])} rates × {len(config['seeds'])} seeds, "
          f"{config['epochs']} epochs each) in one horovodrun -np {config['workers']} job; "
          f"worker log: {os.path.join(out_dir, 'horovodrun.log')}", flush=True)
    for note in config["notes"]:
        print(f"note: {note}", flush=True)
    raw = run_job(config, out_dir, args.controller)
    wall = time.time() - t0
    json_path, png_path = os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.png")
    print()
    summary = _report(config, raw, wall, png_path)
    result = {"config": {k: v for k, v in config.items() if k != "runs"}, "summary": summary, "runs": raw,
              "by_layer_type": report.by_layer_type(config, raw, summary), "total_wall_time_s": wall}
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {json_path} and {png_path}")
    return 0
