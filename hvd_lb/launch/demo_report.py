"""``hvd-lb demo``'s summary: one row per configuration, the table, and the picture.

A row's best rate is chosen **only among its stable grid rates** (every seed
stable, docs of the criterion in ``demo_common``); a row with no stable rate
reports none. Accuracies are the best test accuracy over the epochs of a run,
averaged over seeds (± population std). Convergence criterion: a curve has
flattened when its last 20 % of epochs add less than 0.5 pp to the best
accuracy reached before them.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

TARGET_FRACTION = 0.8   # "steps to reach 80 % of the baseline's accuracy"
LATE_FRACTION = 0.2     # the last 20 % of epochs ...
FLAT_PP = 0.5           # ... add less than this many pp: the curve has flattened
NAN = float("nan")


def _mean_std(xs: List[float]):
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / len(xs)) ** 0.5


def _mean_curve(runs: List[Dict]) -> List[float]:
    n = min(len(r["test_acc"]) for r in runs)
    return [sum(r["test_acc"][e] for r in runs) / len(runs) for e in range(n)]


def late_gain(curve: List[float]) -> float:
    """pp that the last 20 % of epochs add to the best accuracy before them."""
    cut = max(1, int(math.ceil(len(curve) * (1 - LATE_FRACTION))))
    if cut >= len(curve):
        return NAN
    return 100 * (max(curve) - max(curve[:cut]))


def steps_to(run: Dict, target: float) -> Optional[int]:
    for e, acc in enumerate(run["test_acc"]):
        if acc >= target:
            return (e + 1) * run["steps_per_epoch"]
    return None


def _rows(config: Dict) -> List[Dict]:
    rows = []
    if config.get("baseline"):
        rows.append({"row": "baseline", "optimizer": config["baseline_optimizer"], "warmup_epochs": 0.0,
                     "batch_size": config["base_batch"], "lr_rule": "fixed"})
    for r in config["rows"]:
        rows.append({**{k: r[k] for k in ("row", "optimizer", "warmup_epochs", "lr_rule")},
                     "batch_size": config["batch_size"], "k": r.get("k", config["k"])})
    return rows


def summarize(config: Dict, raw: List[Dict]) -> List[Dict]:
    """One dict per row (the baseline first): the best stable rate and what it reached."""
    out = []
    for spec in _rows(config):
        runs = [r for r in raw if r["row"] == spec["row"]]
        by_lr: Dict[float, List[Dict]] = {}
        for r in runs:
            by_lr.setdefault(r["lr"], []).append(r)
        grid = sorted(by_lr)
        stable = [lr for lr in grid if all(x["stable"] for x in by_lr[lr])]
        row = {**spec, "grid_lrs": grid, "stable_lrs": stable, "runs": len(runs),
               "wall_time_s": sum(r["wall_time_s"] for r in runs),
               "wall_time_per_run_s": sum(r["wall_time_s"] for r in runs) / len(runs) if runs else NAN,
               "best_lr": None, "best_test_acc": NAN, "best_test_acc_std": NAN, "best_test_accs": [],
               "train_test_gap": NAN, "late_gain_pp": NAN, "flattened": None, "best_lr_at_grid_edge": None,
               "curve": []}
        if stable:
            def score(lr):
                return _mean_std([max(x["test_acc"]) for x in by_lr[lr]])[0]
            # Best mean accuracy among the stable rates only; ties go to the smaller rate.
            best = max(stable, key=lambda lr: (score(lr), -lr))
            best_runs = by_lr[best]
            accs = [max(x["test_acc"]) for x in best_runs]
            gaps = []
            for x in best_runs:
                i = max(range(len(x["test_acc"])), key=lambda j: x["test_acc"][j])
                gaps.append(x["train_acc"][i] - x["test_acc"][i])
            curve = _mean_curve(best_runs)
            lg = late_gain(curve)
            row.update(best_lr=best, best_test_acc=_mean_std(accs)[0], best_test_acc_std=_mean_std(accs)[1],
                       best_test_accs=accs, train_test_gap=sum(gaps) / len(gaps), late_gain_pp=lg,
                       flattened=(lg < FLAT_PP) if lg == lg else None,
                       best_lr_at_grid_edge=len(grid) > 1 and best in (grid[0], grid[-1]), curve=curve,
                       seeds=[x["seed"] for x in best_runs])
        out.append(row)
    base = out[0] if out and out[0]["row"] == "baseline" and out[0]["best_lr"] is not None else None
    target = TARGET_FRACTION * base["best_test_acc"] if base else None
    for row in out:
        row["gap_to_baseline_pp"] = (100 * (row["best_test_acc"] - base["best_test_acc"])
                                     if base and row["best_lr"] is not None else NAN)
        row["target_acc"] = target
        row["steps_to_target"] = None
        row["steps_to_target_reached"] = 0
        if target is not None and row["best_lr"] is not None:
            steps = [steps_to(r, target) for r in raw if r["row"] == row["row"] and r["lr"] == row["best_lr"]]
            reached = [s for s in steps if s is not None]
            row["steps_to_target_reached"] = len(reached)
            row["steps_to_target"] = sum(reached) / len(reached) if len(reached) == len(steps) else None
    return out


def _label(row: Dict) -> str:
    if row["row"] == "baseline":
        return f"baseline: {row['optimizer']}, batch {row['batch_size']}"
    return row["row"]


def _fmt(x: float, spec: str, none: str = "n/a") -> str:
    return none if x is None or x != x else format(x, spec)


def format_table(config: Dict, rows: List[Dict], wall_s: Optional[float] = None) -> str:
    """A Markdown table (readable in a terminal, pasteable into README)."""
    seeds = config["seeds"]
    other_k = sorted({r["k"] for r in rows if r.get("k", config["k"]) != config["k"]})
    head = (f"Fashion-MNIST (60k train / 10k test), {config['model']}, {config['framework']}; "
            f"large batch {config['batch_size']} = {config['workers']} workers × {config['micro_batches']} "
            f"micro-batches (k = {config['k']}"
            + "".join(f"; rows @k{k}: {k // config['workers']} micro-batches, k = {k}" for k in other_k)
            + f"); {config['epochs']} epochs for every row; "
            f"seeds {','.join(map(str, seeds))}; lr grid × {','.join(f'{g:g}' for g in config['lr_grid'])} "
            f"around each rule's scaled rate (VR rules × {config['vr_lr_factor']:g})")
    if config.get("train_subset"):
        head = head.replace("60k train", f"{config['train_subset']} train")
    cols = ["run", "warm-up", "lr rule", "best lr", "best test acc", "vs baseline", "train−test",
            "stable lrs (of grid)", "steps to 80 %", "last 20 %", "s/run"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        if r["best_lr"] is None:
            acc = "no stable rate"
            best = "—"
        else:
            acc = f"{100 * r['best_test_acc']:.2f} %"
            if len(seeds) > 1:
                acc += f" ± {100 * r['best_test_acc_std']:.2f}"
            best = f"{r['best_lr']:.3g}" + (" †" if r["best_lr_at_grid_edge"] else "")
        if r["row"] == "baseline":
            stable = "(fixed rate)" if r["stable_lrs"] else "unstable"
            vs = "—"
        else:
            st = r["stable_lrs"]
            stable = (f"{st[0]:.3g}–{st[-1]:.3g}" if len(st) > 1 else f"{st[0]:.3g}" if st else "none")
            stable += f" ({len(st)}/{len(r['grid_lrs'])})"
            vs = _fmt(r["gap_to_baseline_pp"], "+.2f") + (" pp" if r["gap_to_baseline_pp"] == r["gap_to_baseline_pp"] else "")
        if r["steps_to_target"] is not None:
            steps = f"{r['steps_to_target']:.0f}"
        elif r["best_lr"] is not None and r["target_acc"] is not None:
            steps = f"not reached ({r['steps_to_target_reached']}/{len(r.get('seeds', []))})"
        else:
            steps = "n/a"
        gap = _fmt(100 * r["train_test_gap"] if r["train_test_gap"] == r["train_test_gap"] else NAN, "+.2f")
        late = _fmt(r["late_gain_pp"], "+.2f")
        warm = f"{r['warmup_epochs']:g} ep" if r["warmup_epochs"] else "none"
        lines.append("| " + " | ".join([
            _label(r), warm, r["lr_rule"], best, acc, vs, gap + (" pp" if gap != "n/a" else ""), stable,
            steps, late + (" pp" if late != "n/a" else ""), f"{r['wall_time_per_run_s']:.1f}"]) + " |")
    notes = ["", "best test acc: best epoch of each run, mean ± std over seeds, at the row's best *stable* "
             "grid rate; † = that rate is at the grid's edge.",
             "vs baseline: difference of those means; train−test: train accuracy (fixed 10k training images) "
             "minus test accuracy at the best epoch.",
             "steps to 80 %: optimizer steps until test accuracy first reached 80 % of the baseline's "
             "(scored once per epoch); last 20 %: what the last 20 % of epochs added (< 0.5 pp = flattened)."]
    if rows and rows[0]["row"] == "baseline" and rows[0]["late_gain_pp"] == rows[0]["late_gain_pp"]:
        ok = rows[0]["late_gain_pp"] < FLAT_PP
        notes.append(f"Convergence criterion (baseline's last 20 % of epochs add < {FLAT_PP} pp): "
                     f"{'met' if ok else 'NOT met'} ({rows[0]['late_gain_pp']:+.2f} pp).")
    if wall_s is not None:
        notes.append(f"Wall time of the whole job: {wall_s:.0f} s ({wall_s / 60:.1f} min).")
    return "\n".join(lines + notes)


def plot(config: Dict, raw: List[Dict], rows: List[Dict], path: str) -> None:
    """(a) test accuracy vs epoch, (b) best accuracy vs lr multiplier, (c) GSNR over training;
    for the CNN also (d)–(f): GSNR and the clipped share per layer type (``by_layer_type``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    per_type = config.get("arch") == "cnn"
    if per_type:
        fig, axes = plt.subplots(2, 3, figsize=(18, 12.4))
        (ax1, ax2, ax3), lower = axes
    else:
        fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(18, 6.6))
    colors = plt.get_cmap("tab10")
    bases = []
    for r in rows:
        key = r["optimizer"].replace("vr-", "") + (":nw" if ":no-warmup" in r["row"] else "")
        if r["row"] != "baseline" and key not in bases:
            bases.append(key)

    def style(r):
        if r["row"] == "baseline":
            return {"color": "black", "ls": "--", "lw": 2.2}
        key = r["optimizer"].replace("vr-", "") + (":nw" if ":no-warmup" in r["row"] else "")
        vr = r["optimizer"].startswith("vr-")
        other_k = r.get("k", config["k"]) != config["k"]  # a NAME@kN row: dash-dot, squares
        return {"color": colors(bases.index(key) % 10), "ls": "-." if other_k else ":" if vr else "-",
                "lw": 1.6, "marker": "s" if other_k else "o" if vr else None, "ms": 3}

    # (a) curves at each row's best stable rate
    for r in rows:
        if not r["curve"]:
            continue
        c = 100 * np.array(r["curve"])
        ax1.plot(np.arange(1, len(c) + 1), c, label=f"{_label(r)}: lr {r['best_lr']:.3g}, {c.max():.1f} %",
                 **style(r))
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("test accuracy (%)")
    base = rows[0] if rows and rows[0]["row"] == "baseline" and rows[0]["curve"] else None
    top = 100 * max((max(r["curve"]) for r in rows if r["curve"]), default=1.0)
    ax1.set_ylim(max(0.0, top - 25), top + 1.5)  # rows far below are still in the legend
    ax1.set_title(f"(a) test accuracy, best stable rate; batch {config['batch_size']} vs "
                  f"{config['base_batch']} (dashed)", fontsize=10)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)

    # (b) best accuracy vs learning-rate multiplier (relative to the base rule's scaled rate)
    specs = {r["row"]: r for r in config["rows"]}
    for r in rows:
        if r["row"] == "baseline":
            continue
        spec = specs[r["row"]]
        xs, ys, unstable = [], [], []
        for lr in r["grid_lrs"]:
            runs = [x for x in raw if x["row"] == r["row"] and x["lr"] == lr]
            acc = 100 * sum(max(x["test_acc"]) for x in runs) / len(runs)
            xs.append(lr / spec["rule_lr"])
            ys.append(acc)
            unstable.append(not all(x["stable"] for x in runs))
        st = style(r)
        ax2.plot(xs, ys, color=st["color"], ls=st["ls"], lw=1.4, label=r["row"])
        ax2.scatter([x for x, u in zip(xs, unstable) if not u], [y for y, u in zip(ys, unstable) if not u],
                    color=st["color"], s=22, zorder=3)
        ax2.scatter([x for x, u in zip(xs, unstable) if u], [y for y, u in zip(ys, unstable) if u],
                    color=st["color"], marker="x", s=40, zorder=3)
    if base:
        ax2.axhline(100 * base["best_test_acc"], color="black", ls="--", lw=1.5, label="baseline (batch 256)")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("lr / rule-scaled rate of the base rule (VR grids are × 2)")
    ax2.set_ylabel("best test accuracy (%), mean over seeds")
    ax2.set_title("(b) stability: accuracy vs learning rate (× = unstable)", fontsize=10)
    ax2.grid(alpha=0.3)
    ax2.set_ylim(0, 100)
    ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)

    # (c) GSNR over training: per-tensor mean GSNR of every step, VR rows at their best rate
    any_vr = False
    for r in rows:
        if not r["optimizer"].startswith("vr-") or r["best_lr"] is None:
            continue
        runs = [x for x in raw if x["row"] == r["row"] and x["lr"] == r["best_lr"]]
        n = min(len(x["gsnr_log10"]) for x in runs)
        med, lo, hi = [], [], []
        for e in range(n):
            vals = [v for x in runs for v in x["gsnr_log10"][e]]
            if not vals:
                med.append(np.nan); lo.append(np.nan); hi.append(np.nan)  # noqa: E702
                continue
            q = np.percentile(vals, [10, 50, 90])
            lo.append(q[0]); med.append(q[1]); hi.append(q[2])  # noqa: E702
        ep = np.arange(1, n + 1)
        st = style(r)
        ax3.plot(ep, med, color=st["color"], lw=1.8, label=f"{r['row']} (median)")
        ax3.fill_between(ep, lo, hi, color=st["color"], alpha=0.15)
        any_vr = True
    if any_vr:
        ax3.set_xlabel("epoch")
        ax3.set_ylabel("log10 per-tensor mean GSNR (10–90 % band)")
        ax3.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    else:
        ax3.text(0.5, 0.5, "no VR row run", ha="center", va="center")
    ax3.set_title(f"(c) GSNR over training (k = {config['k']}, docs/SPEC.md §2)", fontsize=10)
    ax3.grid(alpha=0.3)
    if per_type:
        _plot_layer_types(config, raw, rows, lower, np)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def by_layer_type(config: Dict, raw: List[Dict], rows: List[Dict]) -> Dict:
    """Per VR row at its best stable rate: mean log10 GSNR and clipped share per layer type,
    per epoch (mean over seeds) and over the whole run."""
    out = {}
    for r in rows:
        if not r["optimizer"].startswith("vr-") or r["best_lr"] is None:
            continue
        runs = [x for x in raw if x["row"] == r["row"] and x["lr"] == r["best_lr"]]
        entry = {"k": r.get("k", config["k"]), "lr": r["best_lr"], "types": {}}
        for kind in sorted({t for x in runs for t in x.get("gsnr_log10_by_type", {})}):
            per = {}
            for key in ("gsnr_log10_by_type", "clipped_by_type"):
                curves = [[v for v in x[key][kind] if v is not None] for x in runs if kind in x[key]]
                n = min(len(c) for c in curves)
                per[key] = [sum(c[e] for c in curves) / len(curves) for e in range(n)]
                per[key + "_mean"] = (sum(sum(c) for c in curves) / sum(len(c) for c in curves)
                                      if any(curves) else NAN)
            entry["types"][kind] = per
        out[r["row"]] = entry
    return out


def format_layer_types(config: Dict, raw: List[Dict], rows: List[Dict]) -> str:
    """A Markdown table of ``by_layer_type``: first epoch, last epoch and run mean per type."""
    data = by_layer_type(config, raw, rows)
    kinds = sorted({t for e in data.values() for t in e["types"]})
    if not kinds:
        return ""
    cols = ["VR row", "k", "lr"] + [f"{t}: log10 GSNR first→last ep" for t in kinds] + \
        [f"{t}: clipped % (mean, first→last ep)" for t in kinds]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for name, e in data.items():
        cells = [name, str(e["k"]), f"{e['lr']:.3g}"]
        for t in kinds:
            g = e["types"].get(t, {}).get("gsnr_log10_by_type", [])
            cells.append(f"{g[0]:.2f} → {g[-1]:.2f}" if g else "n/a")
        for t in kinds:
            d = e["types"].get(t, {})
            c = d.get("clipped_by_type", [])
            cells.append(f"{100 * d['clipped_by_type_mean']:.1f} ({100 * c[0]:.1f} → {100 * c[-1]:.1f})"
                         if c else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(["GSNR per layer type, VR rows at their best stable rate (mean over seeds):", ""] + lines)


def _plot_layer_types(config: Dict, raw: List[Dict], rows: List[Dict], axes, np) -> None:
    """(d) log10 GSNR and (e) clipped share per layer type over training, mean over the VR rows
    (solid: the job's k, dashed: other k); (f) each VR row's clipped share per layer type."""
    ax4, ax5, ax6 = axes
    data = by_layer_type(config, raw, rows)
    kinds = sorted({t for e in data.values() for t in e["types"]})
    colors = {t: c for t, c in zip(kinds, ("tab:blue", "tab:orange", "tab:green", "tab:red"))}
    ks = sorted({e["k"] for e in data.values()})
    for ax, key, label in ((ax4, "gsnr_log10_by_type", "log10 mean GSNR"),
                           (ax5, "clipped_by_type", "share of elements clipped at γ")):
        for kind in kinds:
            for k in ks:
                curves = [e["types"][kind][key] for e in data.values() if e["k"] == k and kind in e["types"]]
                if not curves:
                    continue
                n = min(len(c) for c in curves)
                mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
                ax.plot(np.arange(1, n + 1), mean, color=colors[kind], ls="-" if k == config["k"] else "--",
                        lw=1.8, label=f"{kind}, k = {k} ({len(curves)} VR rows)")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if kinds:
            ax.legend(fontsize=7)
    ax4.set_title("(d) GSNR per layer type (mean over the VR rows at their best rate)", fontsize=10)
    ax5.set_title("(e) clipped share per layer type (same runs)", fontsize=10)
    names = list(data)
    width = 0.8 / max(1, len(kinds))
    for j, kind in enumerate(kinds):
        vals = [100 * data[n]["types"].get(kind, {}).get("clipped_by_type_mean", NAN) for n in names]
        ax6.bar(np.arange(len(names)) + (j - (len(kinds) - 1) / 2) * width, vals, width, color=colors[kind],
                label=kind)
    ax6.set_xticks(np.arange(len(names)))
    ax6.set_xticklabels(names, rotation=20, fontsize=8)
    ax6.set_ylabel("clipped share over training (%)")
    ax6.set_title("(f) clipped share per VR row and layer type", fontsize=10)
    ax6.grid(alpha=0.3, axis="y")
    if names:
        ax6.legend(fontsize=7)
    else:
        ax6.text(0.5, 0.5, "no VR row with a stable rate", ha="center", va="center")
