"""Framework-free bookkeeping shared by the demo workers (torch and TF)."""
from __future__ import annotations

import json
import math
import sys
import time


def new_record(run: dict) -> dict:
    return {**run, "train_acc": [], "test_acc": [], "train_loss": [], "stable": True, "gsnr_log10": [],
            "_t0": time.time()}


def end_epoch(rec: dict, cfg: dict, run_index: int, epoch: int, train_loss: float, counts, rank: int) -> bool:
    """Record one epoch; ``counts`` = summed (test right, test n, train right, train n).

    Prints progress on rank 0 only. Returns False when the run became unstable:
    the loss is not finite, or rose by half over the first epoch's.
    """
    test_right, test_n, train_right, train_n = (float(c) for c in counts)
    rec["train_loss"].append(train_loss)
    rec["train_acc"].append(train_right / train_n)
    rec["test_acc"].append(test_right / test_n)
    if rank == 0:
        print(f"[{run_index + 1:3d}/{len(cfg['runs'])}] {rec['optimizer']:<12} lr={rec['lr']:<9.4g} "
              f"seed={rec['seed']} epoch {epoch + 1}/{cfg['epochs']}  loss {train_loss:8.4f}  "
              f"test acc {100 * rec['test_acc'][-1]:6.2f}%", file=sys.stderr, flush=True)
    if not math.isfinite(train_loss) or train_loss > 1.5 * rec["train_loss"][0]:
        rec["stable"] = False
    return rec["stable"]


def end_run(rec: dict) -> dict:
    # A run that never got below chance level (ln 10) did not train either.
    rec["stable"] = rec["stable"] and rec["train_loss"][-1] < math.log(10)
    rec["wall_time_s"] = time.time() - rec.pop("_t0")
    return rec


def add_gsnr(rec: dict, diagnostics: dict) -> None:
    for d in diagnostics.values():
        if d["mean_gsnr"] > 0:
            rec["gsnr_log10"].append(math.log10(d["mean_gsnr"]))


def write_results(cfg: dict, results: list, rank: int) -> None:
    if rank == 0:
        with open(cfg["raw_path"], "w") as f:
            json.dump(results, f)
