"""``hvd-lb``: every bad option is one ``hvd-lb: error:`` line, exit code 2, no traceback, within
seconds, before any process (horovodrun, torchrun, mpirun) starts."""
import subprocess
import sys
import time

import pytest

from hvd_lb.launch.data import fashion_mnist_available
from tests.hvdrun import ROOT

ERROR = "hvd-lb: error: "


def run_cli(*args):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "hvd_lb.launch", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    return proc, time.monotonic() - t0


def assert_one_error_line(proc, seconds, message):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and not proc.stdout, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert lines == [ERROR + message] or (len(lines) == 1 and lines[0].startswith(ERROR + message)), lines
    assert seconds < 5, seconds


@pytest.mark.parametrize("argv,message", [
    (["--weight-decay", "nan"], "invalid --weight-decay nan: must be a finite number in [0, inf)"),
    (["--weight-decay", "inf"], "invalid --weight-decay inf: must be a finite number in [0, inf)"),
    (["--weight-decay", "-0.5"], "invalid --weight-decay -0.5: must be a finite number in [0, inf)"),
    (["--lr-grid", "1e308"], "invalid --lr-grid '1e308': momentum:no-warmup's rates 3.2 × [1e+308, 1e+308] "
                             "= [inf, inf] must be finite and positive"),
    (["--lr-grid", "0.5,inf"], "invalid --lr-grid '0.5,inf': must be comma-separated positive numbers"),
    (["--lr-grid", "1e-400"], "invalid --lr-grid '1e-400': must be comma-separated positive numbers"),
    (["--epochs", "0"], "invalid --epochs 0: must be an integer in [1, inf)"),
    (["--epochs", "2.5"], "invalid --epochs 2.5: must be an integer in [1, inf)"),
    (["--workers", "-2"], "invalid --workers -2: must be an integer in [1, inf)"),
    (["--micro-batches", "0"], "invalid --micro-batches 0: must be an integer in [1, inf)"),
    (["--batch-size", "nan"], "invalid --batch-size nan: must be an integer in [1, inf)"),
    (["--seeds", "0,-1"], "invalid --seeds '0,-1': must be distinct integers in [0, 4294967295]"),
    (["--seeds", "4294967296"], "invalid --seeds '4294967296': must be distinct integers in [0, 4294967295]"),
    (["--warmup-epochs", "nan"], "invalid --warmup-epochs nan: must be a finite number in [0, inf)"),
    (["--warmup-epochs", "16"], "invalid --warmup-epochs 16: must be in [0, --epochs=16)"),
    (["--optimizers", "adamw"], "invalid --optimizers 'adamw': unknown optimizer 'adamw': valid names are sgd,"),
    (["--workers", "1", "--micro-batches", "1", "--optimizers", "vr-sgd"],
     "invalid --micro-batches 1 with --workers 1: VR rows need k = workers × micro-batches ≥ 2"),
    (["--framework", "jax"], "argument --framework: invalid choice: 'jax'"),
    (["--epochs"], "argument --epochs: expected one argument"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
])
def test_demo_refuses_bad_options_before_starting(tmp_path, argv, message):
    out = tmp_path / "out"
    proc, seconds = run_cli("demo", "--out-dir", str(out), *argv)
    assert_one_error_line(proc, seconds, message)
    assert not out.exists()  # nothing ran: the job directory is made first


@pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST not installed")
@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "65536"], "invalid --batch-size 65536: must be at most the 60000 training images"),
    (["--train-subset", "1000000"], "invalid --train-subset 1000000: must be an integer in [8192, 60000]"),
    (["--batch-size", "64", "--micro-batches", "1", "--train-subset", "100"],
     "invalid --train-subset 100: must be an integer in [256, 60000]"),  # the batch-256 baseline's epoch
])
def test_demo_refuses_sizes_the_data_cannot_fill(argv, message):
    proc, seconds = run_cli("demo", *argv)
    assert_one_error_line(proc, seconds, message)


@pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST not installed")
@pytest.mark.parametrize("out_dir,reason", [
    ("/dev/null/x", "cannot write there (Not a directory)"),
    ("/proc/hvd_lb", "cannot write there ("),
])
def test_demo_refuses_an_unwritable_out_dir(out_dir, reason):
    proc, seconds = run_cli("demo", "--out-dir", out_dir)
    assert_one_error_line(proc, seconds, f"invalid --out-dir {out_dir}: {reason}")


@pytest.mark.parametrize("argv,message", [
    (["-np", "0"], "invalid -np 0: must be an integer in [1, inf)"),
    (["-np", "two"], "invalid -np two: must be an integer in [1, inf)"),
    (["-np", "2", "--threads", "0"], "invalid --threads 0: must be an integer in [1, inf)"),
    (["-np", "2", "--fusion-threshold-mb", "1.5"], "invalid --fusion-threshold-mb 1.5: must be an integer in [0, inf)"),
    (["-np", "2", "--cycle-time-ms", "nan"], "invalid --cycle-time-ms nan: must be a finite number in (0, inf)"),
    (["-np", "2", "--cycle-time-ms", "0"], "invalid --cycle-time-ms 0: must be a finite number in (0, inf)"),
    (["-np", "4", "-H", "localhost:2"], "invalid -H localhost:2: 2 slot(s) for -np 4; give at least 4"),
    (["-np", "2", "-H", "localhost:x"], "invalid -H localhost:x: each entry must be HOST or HOST:SLOTS"),
    (["-np", "2", "--launcher", "mpirun", "-H", ":2"], "invalid -H :2: each entry must be HOST or HOST:SLOTS"),
    (["-np", "2", "--launcher", "slurm"], "argument --launcher: invalid choice: 'slurm'"),
    (["-np", "2", "--gloo", "--mpi"], "argument --mpi: not allowed with argument --gloo"),
])
def test_run_refuses_bad_options_before_starting(argv, message):
    # No --dry-run: a valid command would start the launcher.
    proc, seconds = run_cli("run", *argv, "--", "python", "-c", "raise SystemExit(3)")
    assert_one_error_line(proc, seconds, message)


def test_doctor_and_no_subcommand_are_one_line_too():
    for argv, message in ((["doctor", "--fix"], "unrecognized arguments: --fix"),
                          ([], "the following arguments are required: cmd")):
        proc, seconds = run_cli(*argv)
        assert_one_error_line(proc, seconds, message)
