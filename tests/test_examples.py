"""The examples: small diffs between plain Horovod and hvd_lb, and the hvd_lb versions run."""
import difflib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hvdrun import ROOT, horovod_env, run_horovod

EX = ROOT / "examples"
PAIRS = [("torch_horovod.py", "torch_hvd_lb.py", 3), ("keras_horovod.py", "keras_hvd_lb.py", 5)]


def changed_lines(a: Path, b: Path):
    diff = list(difflib.unified_diff(a.read_text().splitlines(), b.read_text().splitlines(), lineterm="", n=0))
    added = [l for l in diff if l.startswith("+") and not l.startswith("+++")]
    removed = [l for l in diff if l.startswith("-") and not l.startswith("---")]
    return added, removed


@pytest.mark.parametrize("plain,lb,limit", PAIRS)
def test_diff_is_within_its_limit(plain, lb, limit):
    added, removed = changed_lines(EX / plain, EX / lb)
    assert 0 < len(added) <= limit and len(removed) <= limit, (added, removed)


@pytest.mark.multiprocess
@pytest.mark.parametrize("script", ["torch_horovod.py", "torch_hvd_lb.py"])
def test_torch_examples_run_under_horovodrun(script):
    proc = run_horovod([EX / script, "--steps", "12"], np=2, timeout=180)
    losses = [float(l.split("loss")[1]) for l in proc.stdout.splitlines() if "loss" in l]
    assert len(losses) >= 2 and losses[-1] < losses[0], proc.stdout


@pytest.mark.multiprocess
def test_keras_hvd_lb_example_runs_under_horovodrun():
    proc = run_horovod([EX / "keras_hvd_lb.py", "--epochs", "2"], np=2, timeout=300)
    assert "loss" in proc.stdout, proc.stdout


@pytest.mark.multiprocess
def test_demo_small_run_writes_table_json_and_png(tmp_path):
    cmd = [sys.executable, "-m", "hvd_lb.launch", "demo", "--optimizers", "momentum,vr-momentum",
           "--epochs", "1", "--batch-size", "2048", "--train-subset", "4096", "--lr-grid", "0.5,1",
           "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=horovod_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "vr-momentum" in proc.stdout and "stable grid rates" in proc.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["optimizer"] for r in res["summary"]] == ["momentum", "vr-momentum"]
    assert len(res["runs"]) == 4 and all(r["test_acc"] for r in res["runs"])
    assert (tmp_path / "results.png").stat().st_size > 10000


@pytest.mark.multiprocess
def test_demo_tf_small_run_writes_table_json_and_png(tmp_path):
    pytest.importorskip("tensorflow")
    cmd = [sys.executable, "-m", "hvd_lb.launch", "demo", "--framework", "tf",
           "--optimizers", "momentum,vr-momentum", "--epochs", "2", "--batch-size", "2048",
           "--train-subset", "4096", "--lr-grid", "1", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=horovod_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "vr-momentum" in proc.stdout and "stable grid rates" in proc.stdout and ", tf" in proc.stdout
    assert "epoch 2/2" in proc.stderr
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["config"]["framework"] == "tf"
    assert [r["optimizer"] for r in res["summary"]] == ["momentum", "vr-momentum"]
    assert len(res["runs"]) == 2 and all(len(r["test_acc"]) == 2 for r in res["runs"])
    assert all(0.0 <= a <= 1.0 for r in res["runs"] for a in r["test_acc"] + r["train_acc"])
    assert res["runs"][1]["gsnr_log10"] and not res["runs"][0]["gsnr_log10"]
    assert (tmp_path / "results.png").stat().st_size > 10000
