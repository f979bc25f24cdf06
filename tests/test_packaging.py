"""Docker images, the README commands, CI and the CLI's argument errors (no Docker engine here)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL = (ROOT / "scripts/install.sh").read_text()


def pinned_versions():
    versions = {}
    for var in ("HOROVOD_VERSION", "TORCH_VERSION", "TF_VERSION"):
        m = re.search(rf'^{var}="?(?:\$\{{[A-Z_]+:-)?([0-9.]+)', INSTALL, re.M)
        assert m, var
        versions[var] = m.group(1)
    return versions


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfiles_install_through_the_one_script_and_pin_nothing(name):
    text = (ROOT / "docker" / name).read_text()
    assert "bash scripts/install.sh" in text
    for var, version in pinned_versions().items():
        assert version not in text, f"{name} repeats the {var} pin {version}"
    assert not re.search(r"pip3? install", text), "Python packages come from scripts/install.sh"
    assert "openssh-server" in text
    if name.endswith("gpu"):
        assert "HOROVOD_GPU_OPERATIONS=NCCL" in text and "libnccl-dev" in text


def test_versions_are_pinned_only_in_the_install_script():
    versions = pinned_versions().values()
    for path in ["setup.py", "Makefile", ".ci/run", *map(str, (ROOT / "hvd_lb").rglob("*.py"))]:
        text = (ROOT / path).read_text()
        for v in versions:
            assert f"=={v}" not in text, f"{path} pins {v}"


def test_ci_calls_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```bash", 1)[1].split("```", 1)[0]
    commands = [l.split("#")[0].strip() for l in first_block.strip().splitlines()]
    assert commands[:2] == ["make demo", "make test"]
    ci = (ROOT / ".ci/run").read_text()
    assert re.search(r"^make test$", ci, re.M)


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "hvd_lb.launch", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env=env)


@pytest.mark.parametrize("args,needle", [
    (["demo", "--optimizers", "adamw"], "unknown optimizer 'adamw'"),
    (["demo", "--batch-size", "1000", "--workers", "3"], "divisible by workers × micro-batches"),
    (["demo", "--lr-grid", "0.5,-1"], "--lr-grid"),
    (["demo", "--workers", "1", "--micro-batches", "1", "--optimizers", "vr-sgd"], "k = 1 × 1 = 1"),
    (["run", "-np", "0", "--", "python", "x.py"], "invalid -np 0"),
])
def test_bad_input_is_one_clear_line_and_nonzero_exit(args, needle):
    proc = run_cli(*args)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvd-lb: error:") and needle in lines[0], proc.stderr


def test_missing_dataset_is_reported(tmp_path):
    import os
    env = dict(os.environ, HVD_LB_FASHION_MNIST=str(tmp_path))
    proc = run_cli("demo", env=env)
    assert proc.returncode != 0 and "apt-get install dataset-fashion-mnist" in proc.stderr


def test_run_prints_the_command_with_defaults():
    proc = run_cli("run", "-np", "2", "--gloo", "--dry-run", "--", "python", "train.py")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "OMP_NUM_THREADS=" in out and "-np 2 -H localhost:2 --gloo" in out
    assert "--fusion-threshold-mb 64" in out and out.strip().endswith("python train.py")
    # `python` is the interpreter hvd_lb runs in, not the first one on PATH.
    assert f"{sys.executable} train.py" in out


def test_doctor_without_horovod_says_so_and_how_to_fix(tmp_path):
    # A bare interpreter: an empty venv without site packages.
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    import os
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV",)}
    env["PYTHONPATH"] = str(ROOT)
    env["PATH"] = "/usr/bin:/bin"
    proc = subprocess.run([str(venv / "bin/python"), "-m", "hvd_lb.launch", "doctor"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1
    assert "[MISSING] Horovod: not installed" in proc.stdout
    assert "fix: run `make install`" in proc.stdout
