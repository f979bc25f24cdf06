"""``hvd-lb demo``: option validation, the grid design, the summary's choice of rates, a tiny real run."""
import json
import math
import subprocess
import sys

import pytest

from hvd_lb import rules
from hvd_lb.launch import cli, demo, demo_common, demo_report
from tests.hvdrun import ROOT, horovod_env


def config(*argv):
    args = cli.make_parser().parse_args(["demo", *argv])
    return demo.parse_config(args)


# --- option validation -------------------------------------------------------------

@pytest.mark.parametrize("argv,needle", [
    (["--optimizers", "adamw"], "unknown optimizer 'adamw'"),
    (["--optimizers", "lars:slow"], "the suffix must be one of :no-warmup, :warmup"),
    (["--optimizers", "lars,lars"], "'lars' is listed twice"),
    (["--optimizers", " , "], "name at least one optimizer"),
    (["--batch-size", "1000", "--workers", "3"], "divisible by workers × micro-batches = 3 × 2 = 6"),
    (["--lr-grid", "0.5,-1"], "invalid --lr-grid"),
    (["--lr-grid", "a,b"], "invalid --lr-grid"),
    (["--seeds", "0,0"], "invalid --seeds"),
    (["--seeds", "-1"], "invalid --seeds"),
    (["--epochs", "0"], "invalid --epochs 0"),
    (["--epochs", "4", "--warmup-epochs", "4"], "invalid --warmup-epochs 4"),
    (["--workers", "1", "--micro-batches", "1", "--optimizers", "vr-sgd"], "k = 1 × 1 = 1"),
    (["--workers", "3", "--micro-batches", "1", "--optimizers", "sgd"], "divisible by workers × micro-batches = 3 × 1 = 3"),
    (["--workers", "3", "--batch-size", "8190", "--optimizers", "sgd", "--micro-batches", "2"],
     "batch-256 baseline must split evenly"),
    (["--train-subset", "100"], "invalid --train-subset 100"),
    (["--weight-decay", "-1"], "invalid --weight-decay"),
    (["--optimizers", "vr-lamb@16"], "after @ comes kN"),
    (["--optimizers", "vr-lamb@k0"], "after @ comes kN"),
    (["--optimizers", "lars@k3"], "k = 3 must be a multiple of --workers 2"),
    (["--optimizers", "lars@k16,lars@k16"], "'lars@k16' is listed twice"),
    (["--optimizers", "vr-lars@k1", "--workers", "1"], "k = 1 × 1 = 1 (row vr-lars@k1)"),
    (["--optimizers", "lars@k6", "--batch-size", "8192"], "divisible by workers × micro-batches = 2 × 3 = 6 (row lars@k6)"),
    (["--model", "resnet"], "SystemExit"),
    (["--framework", "tf", "--gsnr-interval", "4"], "with --framework tf"),
])
def test_bad_options_raise_one_clear_value_error(argv, needle, capsys):
    if needle == "SystemExit":  # argparse's choices: usage error naming the allowed values
        with pytest.raises(SystemExit):
            config(*argv)
        assert "invalid choice: 'resnet' (choose from mlp, cnn)" in capsys.readouterr().err.replace("'mlp', 'cnn'", "mlp, cnn")
        return
    with pytest.raises(ValueError) as e:
        config(*argv)
    assert needle in str(e.value)


def test_missing_data_is_a_file_not_found_error(monkeypatch):
    monkeypatch.setattr(demo, "fashion_mnist_available", lambda: False)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        config()


def test_small_k_note_is_collected_not_printed_as_a_warning(recwarn):
    cfg = config("--workers", "2", "--micro-batches", "2")
    assert cfg["k"] == 4 and any("k = 2 × 2 = 4" in n for n in cfg["notes"])
    assert not [w for w in recwarn if "GSNR" in str(w.message)]


# --- the default design -------------------------------------------------------------

def test_default_rows_are_the_ones_the_question_needs():
    cfg = config()
    keys = [r["row"] for r in cfg["rows"]]
    assert keys == ["momentum:no-warmup", "momentum", "lars", "lamb", "tvlars", "sngm",
                    "vr-momentum", "vr-lars", "vr-lamb"]
    assert cfg["baseline"] and cfg["k"] == 8 and cfg["workers"] == 2 and cfg["micro_batches"] == 4
    assert cfg["batch_size"] >= 8192 and len(cfg["seeds"]) >= 2
    base = [r for r in cfg["runs"] if r["row"] == "baseline"]
    assert len(base) == len(cfg["seeds"]) and all(r["batch_size"] == 256 and r["lr"] == 0.1 for r in base)
    warm = {r["row"]: r["warmup_epochs"] for r in cfg["rows"]}
    assert warm["momentum:no-warmup"] == 0 and warm["tvlars"] == 0 and warm["momentum"] > 0
    assert all(w > 0 for k, w in warm.items() if k not in ("momentum:no-warmup", "tvlars"))
    # Every large-batch run has the same epoch budget (one number for the whole job).
    assert isinstance(cfg["epochs"], int)


def test_grids_follow_each_rules_documented_scaling_and_vr_reaches_twice_the_base_top():
    cfg = config()
    grid = {r["row"]: sorted({x["lr"] for x in cfg["runs"] if x["row"] == r["row"]}) for r in cfg["rows"]}
    ratio = cfg["batch_size"] / 256
    assert math.isclose(demo.center_lr("momentum", cfg["batch_size"]), 0.1 * ratio)           # linear
    assert math.isclose(demo.center_lr("lamb", cfg["batch_size"]), 2e-3 * math.sqrt(ratio))   # sqrt
    for row in cfg["rows"]:
        rule = rules.get_rule(row["optimizer"])
        lo, hi = min(cfg["lr_grid"]), max(cfg["lr_grid"])
        assert grid[row["row"]][0] <= row["center_lr"] <= grid[row["row"]][-1]
        assert math.isclose(grid[row["row"]][0], row["center_lr"] * lo)
        assert math.isclose(grid[row["row"]][-1], row["center_lr"] * hi)
        if rule.gsnr and rule.base in grid:
            assert grid[row["row"]][-1] >= 2 * grid[rule.base][-1] * (1 - 1e-12)


def test_full_preset_is_longer_and_wider():
    d, f = config(), config("--preset", "full")
    assert f["epochs"] > d["epochs"] and len(f["seeds"]) > len(d["seeds"]) and len(f["lr_grid"]) > len(d["lr_grid"])
    assert {r["row"] for r in d["rows"]} < {r["row"] for r in f["rows"]}


def test_cnn_preset_runs_the_default_rows_on_the_cnn_and_the_vr_rows_again_at_k16():
    d, c = config(), config("--preset", "cnn")
    assert d["arch"] == "mlp" and c["arch"] == "cnn" and "CNN" in c["model"]
    assert c["seeds"] == d["seeds"] and c["lr_grid"] == d["lr_grid"]
    base_rows = [r["row"] for r in d["rows"]]
    assert [r["row"] for r in c["rows"]] == base_rows + ["vr-momentum@k16", "vr-lars@k16", "vr-lamb@k16"]
    for r in c["rows"]:
        assert (r["k"], r["micro_batches"]) == ((16, 8) if r["row"].endswith("@k16") else (8, 4))
    k16 = [r for r in c["runs"] if r["row"] == "vr-lamb@k16"]
    assert {r["micro_batches"] for r in k16} == {8} and {r["lr"] for r in k16} == \
        {r["lr"] for r in c["runs"] if r["row"] == "vr-lamb"}
    assert len(c["runs"]) == 2 + 12 * 4 * 2
    assert config("--preset", "cnn", "--model", "mlp")["arch"] == "mlp"


def test_layer_types_of_both_frameworks_names():
    lt = demo_common.layer_type
    assert [lt(n) for n in ("conv2.weight", "bn1.bias", "fc.weight", "0.weight")] == \
        ["conv", "batch norm", "linear", "linear"]
    assert [lt(n) for n in ("sequential/conv3/kernel", "sequential_1/bn2/gamma", "fc/bias")] == \
        ["conv", "batch norm", "linear"]


def test_torch_and_tf_cnn_start_from_the_same_numbers():
    """The same NumPy-drawn weights give the same logits in both frameworks (batch statistics
    in training mode, running statistics in eval mode)."""
    pytest.importorskip("tensorflow")
    import keras
    import numpy as np
    import torch

    from hvd_lb.launch import demo_tf, demo_torch

    x = np.random.default_rng(0).standard_normal((64, 28, 28, 1)).astype(np.float32)
    tm = demo_torch.make_model(torch, "cnn", 3)
    km = demo_tf.make_model(keras, "cnn", 3)
    assert sum(p.numel() for p in tm.parameters()) == km.count_params() - 2 * sum(demo_common.CNN_CHANNELS)
    for train in (True, False):
        tm.train(train)
        with torch.no_grad():
            t = tm(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
        k = np.asarray(km(x, training=train))
        np.testing.assert_allclose(k, t, atol=2e-5, rtol=1e-4)


# --- the summary ----------------------------------------------------------------------

def fake_run(row, lr, seed, accs, stable=True, spe=7):
    return {"row": row, "optimizer": row.split(":")[0], "lr": lr, "seed": seed, "stable": stable,
            "test_acc": accs, "train_acc": [a + 0.01 for a in accs], "steps_per_epoch": spe,
            "wall_time_s": 1.0, "gsnr_log10": [[] for _ in accs]}


def small_config():
    return {"baseline": True, "baseline_optimizer": "momentum", "base_batch": 256, "batch_size": 8192,
            "rows": [{"row": "lars", "optimizer": "lars", "warmup_epochs": 1.0, "lr_rule": "linear",
                      "rule_lr": 1.0, "center_lr": 1.0},
                     {"row": "vr-lars", "optimizer": "vr-lars", "warmup_epochs": 1.0, "lr_rule": "linear",
                      "rule_lr": 1.0, "center_lr": 2.0}],
            "seeds": [0, 1], "epochs": 5, "lr_grid": [0.5, 1, 2], "vr_lr_factor": 2.0, "model": "MLP",
            "framework": "torch", "workers": 2, "micro_batches": 4, "k": 8}


def test_summary_picks_the_best_rate_only_among_stable_ones():
    raw = [fake_run("baseline", 0.1, s, [0.80, 0.85, 0.88, 0.89, 0.89], spe=234) for s in (0, 1)]
    # lars: 2.0 scores highest but one seed was unstable -> not eligible; 1.0 beats 0.5.
    raw += [fake_run("lars", 0.5, s, [0.5, 0.6, 0.70, 0.75, 0.76]) for s in (0, 1)]
    raw += [fake_run("lars", 1.0, s, [0.6, 0.7, 0.80, 0.82, 0.82 + 0.01 * s]) for s in (0, 1)]
    raw += [fake_run("lars", 2.0, 0, [0.7, 0.9, 0.95, 0.95, 0.95]),
            fake_run("lars", 2.0, 1, [0.7, 0.9, 0.95], stable=False)]
    # vr-lars: no stable rate at all -> no best rate, no accuracy.
    raw += [fake_run("vr-lars", lr, s, [0.9, 0.95], stable=False) for lr in (1.0, 2.0, 4.0) for s in (0, 1)]
    rows = demo_report.summarize(small_config(), raw)
    base, lars, vr = rows
    assert base["row"] == "baseline" and math.isclose(base["best_test_acc"], 0.89)
    assert lars["best_lr"] == 1.0 and lars["stable_lrs"] == [0.5, 1.0]
    assert math.isclose(lars["best_test_acc"], 0.825) and math.isclose(lars["best_test_acc_std"], 0.005)
    assert math.isclose(lars["gap_to_baseline_pp"], 100 * (0.825 - 0.89))
    assert lars["best_lr_at_grid_edge"] is False
    assert vr["best_lr"] is None and vr["stable_lrs"] == [] and vr["best_test_acc"] != vr["best_test_acc"]
    # steps to 80 % of the baseline (0.712): lars at 1.0 reaches 0.80 in epoch 3 -> 21 steps.
    assert lars["steps_to_target"] == 21 and base["steps_to_target"] == 234
    table = demo_report.format_table(small_config(), rows, wall_s=12.0)
    assert "no stable rate" in table and "none (0/3)" in table and "0.5–1 (2/3)" in table
    assert "Wall time of the whole job: 12 s" in table


def test_layer_type_report_table_and_picture(tmp_path):
    cfg = {**small_config(), "arch": "cnn"}
    cfg["rows"].append({"row": "vr-lars@k16", "optimizer": "vr-lars", "warmup_epochs": 1.0, "lr_rule": "linear",
                        "rule_lr": 1.0, "center_lr": 2.0, "k": 16})

    def with_types(run, g, c):
        run["gsnr_log10_by_type"] = {"conv": [g, g - 0.5], "batch norm": [g + 0.1, None]}
        run["clipped_by_type"] = {"conv": [c, c + 0.1], "batch norm": [c, None]}
        return run

    raw = [fake_run("baseline", 0.1, s, [0.8, 0.85], spe=234) for s in (0, 1)]
    raw += [fake_run("lars", 1.0, s, [0.6, 0.7]) for s in (0, 1)]
    raw += [with_types(fake_run("vr-lars", 2.0, s, [0.6, 0.7]), 1.0 + s, 0.2) for s in (0, 1)]
    raw += [with_types(fake_run("vr-lars@k16", 2.0, s, [0.6, 0.7]), 0.5, 0.4) for s in (0, 1)]
    rows = demo_report.summarize(cfg, raw)
    assert [r.get("k") for r in rows] == [None, 8, 8, 16]
    data = demo_report.by_layer_type(cfg, raw, rows)
    assert set(data) == {"vr-lars", "vr-lars@k16"} and data["vr-lars@k16"]["k"] == 16
    conv = data["vr-lars"]["types"]["conv"]
    assert conv["gsnr_log10_by_type"] == [1.5, 1.0] and math.isclose(conv["clipped_by_type_mean"], 0.25)
    assert data["vr-lars"]["types"]["batch norm"]["gsnr_log10_by_type"] == [1.6]  # None epochs dropped
    table = demo_report.format_layer_types(cfg, raw, rows)
    assert "| vr-lars@k16 | 16 | 2 | 0.60 → 0.60 | 0.50 → 0.00 |" in table
    assert "rows @k16: 8 micro-batches, k = 16" in demo_report.format_table(cfg, rows)
    demo_report.plot(cfg, raw, rows, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 20000


def test_report_of_a_stopped_job_uses_the_runs_it_finished(tmp_path, capsys):
    job = tmp_path / "job"
    job.mkdir()
    cfg = {**small_config(), "arch": "mlp", "train_subset": None,
           "runs": [{"row": "baseline"}] * 2 + [{"row": "lars"}] * 6 + [{"row": "vr-lars"}] * 6}
    raw = [fake_run("baseline", 0.1, s, [0.80, 0.85], spe=234) for s in (0, 1)]
    raw += [fake_run("lars", 1.0, s, [0.6, 0.7]) for s in (0, 1)]
    (job / "config.json").write_text(json.dumps(cfg))
    (job / "raw.json").write_text(json.dumps(raw))
    assert demo.report_only(str(job) + "/") == 0
    out = capsys.readouterr().out
    assert "4 of 14 runs finished" in out and "| lars |" in out and "vr-lars" not in out
    assert (tmp_path / "results.png").exists()
    with pytest.raises(ValueError, match="invalid --report"):
        demo.report_only(str(tmp_path / "nothing"))


def test_late_gain_is_the_flattening_criterion():
    assert math.isclose(demo_report.late_gain([0.5, 0.8, 0.85, 0.86, 0.864]), 100 * (0.864 - 0.86))
    assert demo_report.late_gain([0.5]) != demo_report.late_gain([0.5])  # nan: too short to tell


# --- imports ----------------------------------------------------------------------------

def test_launch_has_no_import_cycle_and_data_lives_in_launch():
    code = ("import sys, hvd_lb.launch.demo; assert 'hvd_lb.launch.cli' not in sys.modules; "
            "import importlib.util as u; assert u.find_spec('hvd_lb.data') is None; "
            "import hvd_lb.launch.data")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --- a tiny real run ----------------------------------------------------------------------

def tiny(tmp_path, *extra):
    cmd = [sys.executable, "-m", "hvd_lb.launch", "demo", "--optimizers", "momentum,vr-momentum",
           "--epochs", "2", "--batch-size", "2048", "--train-subset", "4096", "--lr-grid", "0.5,1",
           "--seeds", "0", "--warmup-epochs", "0.5", "--out-dir", str(tmp_path), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=horovod_env(), capture_output=True, text=True, timeout=400)


@pytest.mark.multiprocess
def test_tiny_run_writes_table_json_png_and_keeps_the_terminal_clean(tmp_path):
    proc = tiny(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "| baseline: momentum, batch 256 |" in proc.stdout and "| vr-momentum |" in proc.stdout
    assert "stable lrs (of grid)" in proc.stdout and "steps to 80 %" in proc.stdout
    # No horovodrun-prefixed worker lines and no TensorFlow/absl log lines on the terminal.
    for noise in ("<stdout>", "<stderr>", "[1,0]", "oneDNN", "absl", "I0000"):
        assert noise not in out, noise
    assert "100%" in proc.stderr  # the progress bar ran to the end
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["row"] for r in res["summary"]] == ["baseline", "momentum", "vr-momentum"]
    assert len(res["runs"]) == 1 + 2 * 2 and all(r["test_acc"] for r in res["runs"])
    vr = [r for r in res["runs"] if r["row"] == "vr-momentum" and r["stable"]]
    assert all(any(r["gsnr_log10"]) for r in vr)
    assert (tmp_path / "results.png").stat().st_size > 20000
    assert (tmp_path / "horovodrun.log").exists()


@pytest.mark.multiprocess
def test_tiny_tf_run(tmp_path):
    pytest.importorskip("tensorflow")
    proc = tiny(tmp_path, "--framework", "tf", "--no-baseline", "--lr-grid", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ", tf;" in proc.stdout and "oneDNN" not in proc.stdout + proc.stderr
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["config"]["framework"] == "tf"
    assert [r["row"] for r in res["summary"]] == ["momentum", "vr-momentum"]
    assert all(len(r["test_acc"]) >= 1 for r in res["runs"])
    assert all(0.0 <= a <= 1.0 for r in res["runs"] for a in r["test_acc"] + r["train_acc"])


@pytest.mark.multiprocess
def test_cnn_tiny_run_torch_and_tf_agree(tmp_path):
    """Same initial weights, same order: the two frameworks' CNN runs (VR at k = 8 and 16) give
    the same accuracies and per-layer-type GSNR up to float32 rounding; --report redraws them."""
    pytest.importorskip("tensorflow")
    res = {}
    for fw in ("torch", "tf"):
        cmd = [sys.executable, "-m", "hvd_lb.launch", "demo", "--framework", fw, "--model", "cnn",
               "--optimizers", "vr-lamb,vr-lamb@k16", "--lr-grid", "1", "--seeds", "0", "--epochs", "2",
               "--no-baseline", "--train-subset", "16384", "--out-dir", str(tmp_path / fw)]
        proc = subprocess.run(cmd, cwd=ROOT, env=horovod_env(), capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "GSNR per layer type" in proc.stdout
        res[fw] = json.loads((tmp_path / fw / "results.json").read_text())
    for t, k in zip(res["torch"]["runs"], res["tf"]["runs"]):
        assert (t["row"], t["micro_batches"]) == (k["row"], k["micro_batches"])
        assert max(abs(a - b) for a, b in zip(t["test_acc"], k["test_acc"])) < 2e-3
        for kind in ("conv", "batch norm", "linear"):
            a, b = t["gsnr_log10_by_type"][kind], k["gsnr_log10_by_type"][kind]
            assert max(abs(x - y) for x, y in zip(a, b)) < 0.01, (kind, a, b)
    (tmp_path / "torch" / "results.png").unlink()
    proc = subprocess.run([sys.executable, "-m", "hvd_lb.launch", "demo", "--report",
                           str(tmp_path / "torch" / "results.json")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "| vr-lamb@k16 |" in proc.stdout, proc.stderr[-2000:]
    assert (tmp_path / "torch" / "results.png").stat().st_size > 20000
