"""``hvd-lb run --launcher horovodrun|mpirun|torchrun|tf`` prints the command it runs (dry run)."""
import subprocess
import sys

import pytest

from tests.hvdrun import ROOT


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "hvd_lb.launch", "run", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("launcher,expected", [
    ("mpirun", f"mpirun -np 2 -H localhost:2 --bind-to none -x OMP_NUM_THREADS -x PATH {sys.executable} "
               "train.py --lr 0.1"),
    ("torchrun", "--standalone --nproc-per-node 2 train.py --lr 0.1"),
    ("horovodrun", "horovodrun -np 2 -H localhost:2"),
    ("tf", f"{sys.executable} -m hvd_lb.launch.tfrun -np 2 -- {sys.executable} train.py --lr 0.1"),
])
def test_launcher_prints_its_command(launcher, expected):
    proc = run_cli("--launcher", launcher, "-np", "2", "--threads", "1", "--dry-run", "--",
                   "python", "train.py", "--lr", "0.1")
    if launcher == "horovodrun" and "horovodrun not found" in proc.stderr:
        pytest.skip("horovodrun not installed")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith("OMP_NUM_THREADS=1 ") and expected in line
    if launcher == "torchrun":
        assert "torchrun" in line or "torch.distributed.run" in line


@pytest.mark.parametrize("args,message", [
    (["--launcher", "torchrun", "--gloo", "-np", "2"], "invalid --gloo with --launcher torchrun"),
    (["--launcher", "torchrun", "-H", "a:2,b:2", "-np", "4"], "invalid -H with --launcher torchrun"),
    (["--launcher", "mpirun", "-np", "0"], "invalid -np 0"),
    (["--launcher", "tf", "-H", "a:2,b:2", "-np", "4"], "invalid -H with --launcher tf"),
    (["--launcher", "tf", "--mpi", "-np", "2"], "invalid --mpi with --launcher tf"),
])
def test_launcher_usage_errors(args, message):
    proc = run_cli(*args, "--dry-run", "--", "python", "train.py")
    assert proc.returncode == 2
    assert f"hvd-lb: error: {message}" in proc.stderr
