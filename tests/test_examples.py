"""The examples: small diffs between plain Horovod and hvd_lb, and the hvd_lb versions run."""
import difflib
from pathlib import Path

import pytest

from tests.hvdrun import ROOT, horovod_env, run_horovod

EX = ROOT / "examples"
PAIRS = [("torch_horovod.py", "torch_hvd_lb.py", 2), ("keras_horovod.py", "keras_hvd_lb.py", 5)]


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
