"""Framework-free bookkeeping shared by the demo workers (torch and TF).

Stability criterion (the same in both workers): a run is *unstable* when its
epoch-mean training loss is not finite, rises above 1.5 × the lowest epoch
loss it had reached (a blow-up or a collapse after progress), or ends no better
than chance (≥ ln 10 for 10 classes). An unstable run stops at the end of the
epoch that shows it (every rank sees the same all-reduced loss, so all stop
together).
"""
from __future__ import annotations

import json
import math
import os
import re
import time

from ..schedules import warmup_decay

CHANCE_LOSS = math.log(10)

# The demo models, the same in both frameworks (``--model``).
# mlp: a 784-128-64-10 MLP with ReLU.
HIDDEN = (128, 64)
# cnn: three conv–batch-norm–ReLU blocks and a linear head, 6.3k parameters, sized so that
# the CNN preset's 98 runs fit in about an hour on 2 cores:
# conv 3×3/2 (1→8) BN ReLU · conv 3×3/2 (8→16) BN ReLU · conv 3×3 (16→32) BN ReLU ·
# global average pool · linear 32→10 (stride 2 rather than pooling: a third of the time).
# Convolutions have no bias (batch norm follows); batch norm: ε = 1e-5, running
# statistics updated with weight 0.1.
CNN_CHANNELS = (8, 16, 32)
MODELS = {
    "mlp": "MLP 784-128-64-10 (ReLU)",
    "cnn": "CNN conv8/2-BN-conv16/2-BN-conv32-BN-avgpool-fc10 (6.3k parameters)",
}
BN_EPS, BN_MOMENTUM = 1e-5, 0.1
# Parameter names carry their layer: conv1.weight (torch), .../bn2/gamma (Keras), fc.bias.
LAYER_TYPES = {"conv": "conv", "bn": "batch norm", "fc": "linear"}


def layer_type(name: str) -> str:
    """The layer type of a parameter name in the demo models ("linear" for the MLP's)."""
    for part in re.split(r"[./]", name):
        kind = LAYER_TYPES.get(part.rstrip("0123456789"))
        if kind:
            return kind
    return "linear"


def cnn_weights(seed: int) -> dict:
    """The CNN's initial weights from NumPy, in torch's layouts (conv OIHW, linear out×in).

    Drawn like torch's defaults (U(±1/√fan_in) for conv and linear weights and the
    linear bias; batch norm γ = 1, β = 0), from one NumPy generator so that both
    frameworks start from the same numbers.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    out, c_in = {}, 1
    for i, c in enumerate(CNN_CHANNELS, 1):
        bound = 1 / math.sqrt(c_in * 9)
        out[f"conv{i}.weight"] = rng.uniform(-bound, bound, (c, c_in, 3, 3)).astype(np.float32)
        out[f"bn{i}.weight"], out[f"bn{i}.bias"] = np.ones(c, np.float32), np.zeros(c, np.float32)
        c_in = c
    bound = 1 / math.sqrt(c_in)
    out["fc.weight"] = rng.uniform(-bound, bound, (10, c_in)).astype(np.float32)
    out["fc.bias"] = rng.uniform(-bound, bound, 10).astype(np.float32)
    return out


def standardize(x_train, x_test):
    """Flatten to 784 features and standardize by the training set's mean and std (scalars)."""
    x_train = x_train.reshape(len(x_train), -1)
    x_test = x_test.reshape(len(x_test), -1)
    mean, std = float(x_train.mean()), float(x_train.std())
    return (x_train - mean) / std, (x_test - mean) / std


def run_plan(run: dict, cfg: dict, n_train: int, size: int) -> dict:
    """Batch arithmetic of one run: per-rank share, micro-batch size, steps, warm-up steps."""
    batch, micro = run["batch_size"], run["micro_batches"]
    steps_per_epoch = n_train // batch
    total = steps_per_epoch * cfg["epochs"]
    return {"local": batch // size, "micro": micro, "micro_size": batch // size // micro,
            "steps_per_epoch": steps_per_epoch, "total_steps": total,
            "warmup_steps": min(total - 1, int(round(run["warmup_epochs"] * steps_per_epoch)))}


class Progress:
    """Rank 0 appends one JSON line per epoch and per finished run; the driver draws the bar."""

    def __init__(self, cfg: dict, rank: int):
        self.f = open(cfg["progress_path"], "a") if rank == 0 and cfg.get("progress_path") else None

    def write(self, **ev) -> None:
        if self.f is not None:
            self.f.write(json.dumps(ev) + "\n")
            self.f.flush()


def new_record(run: dict, plan: dict) -> dict:
    return {**run, "steps_per_epoch": plan["steps_per_epoch"], "warmup_steps": plan["warmup_steps"],
            "total_steps": plan["total_steps"], "train_acc": [], "test_acc": [],
            "train_loss": [], "lr_end_of_epoch": [], "stable": True, "gsnr_log10": [], "clipped": [],
            "gsnr_log10_by_type": {}, "clipped_by_type": {},
            "_gsnr_epoch": [], "_clip_epoch": [], "_by_type": {}, "_t0": time.time()}


def end_epoch(rec: dict, run_index: int, epoch: int, train_loss: float, counts, progress: Progress) -> bool:
    """Record one epoch; ``counts`` = summed (test right, test n, train right, train n).

    Returns False when the run became unstable (see the module docstring).
    """
    test_right, test_n, train_right, train_n = (float(c) for c in counts)
    rec["train_loss"].append(train_loss)
    rec["train_acc"].append(train_right / train_n)
    rec["test_acc"].append(test_right / test_n)
    last_step = (epoch + 1) * rec["steps_per_epoch"] - 1
    rec["lr_end_of_epoch"].append(warmup_decay(last_step, rec["lr"], rec["warmup_steps"], rec["total_steps"]))
    rec["gsnr_log10"].append(rec["_gsnr_epoch"])
    rec["clipped"].append(sum(rec["_clip_epoch"]) / len(rec["_clip_epoch"]) if rec["_clip_epoch"] else None)
    rec["_gsnr_epoch"], rec["_clip_epoch"] = [], []
    for kind, (logs, clips) in rec["_by_type"].items():
        rec["gsnr_log10_by_type"].setdefault(kind, []).append(round(sum(logs) / len(logs), 4) if logs else None)
        rec["clipped_by_type"].setdefault(kind, []).append(round(sum(clips) / len(clips), 5) if clips else None)
    rec["_by_type"] = {}
    progress.write(ev="epoch", run=run_index, epoch=epoch, test_acc=rec["test_acc"][-1], loss=train_loss)
    if not math.isfinite(train_loss) or train_loss > 1.5 * min(rec["train_loss"]):
        rec["stable"] = False
    return rec["stable"]


def end_run(rec: dict, run_index: int, progress: Progress) -> dict:
    loss = rec["train_loss"][-1]
    rec["stable"] = rec["stable"] and math.isfinite(loss) and loss < CHANCE_LOSS
    rec["wall_time_s"] = time.time() - rec.pop("_t0")
    for k in ("_gsnr_epoch", "_clip_epoch", "_by_type"):
        rec.pop(k)
    # JSON has no NaN/inf: write them as None.
    rec["train_loss"] = [x if math.isfinite(x) else None for x in rec["train_loss"]]
    progress.write(ev="end", run=run_index, epochs=len(rec["test_acc"]), stable=rec["stable"],
                   best_test_acc=max(rec["test_acc"]))
    return rec


def add_gsnr(rec: dict, diagnostics: dict) -> None:
    """One step's per-tensor mean GSNR (log10) and the mean fraction of elements clipped at γ,
    over all tensors and per layer type (``layer_type``)."""
    vals = list(diagnostics.values())
    for name, d in diagnostics.items():
        logs, clips = rec["_by_type"].setdefault(layer_type(name), ([], []))
        if d["mean_gsnr"] > 0:
            logs.append(math.log10(d["mean_gsnr"]))
        clips.append(d["clipped_fraction"])
    rec["_gsnr_epoch"].extend(round(math.log10(d["mean_gsnr"]), 4) for d in vals if d["mean_gsnr"] > 0)
    if vals:
        rec["_clip_epoch"].append(sum(d["clipped_fraction"] for d in vals) / len(vals))


def write_results(cfg: dict, results: list, rank: int) -> None:
    """Rank 0 rewrites the raw records after every run (atomically): a job stopped after an
    hour keeps the runs it finished (``hvd-lb demo --report <out-dir>/job``)."""
    if rank == 0:
        tmp = cfg["raw_path"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f)
        os.replace(tmp, cfg["raw_path"])
