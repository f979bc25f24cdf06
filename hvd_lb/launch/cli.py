"""``hvd-lb``: the demo, a thin ``horovodrun`` wrapper, and an install doctor.

Bad input ends with one ``hvd-lb: error: …`` line on stderr and exit code 2, before any
process starts.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from typing import List, Optional

from . import demo, options
from .horovodrun import UsageError, build_run_command, horovodrun_path
from .launchers import LAUNCHERS, build_launch_command


# --- run ---------------------------------------------------------------------------

def cmd_run(args) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    np_ = options.integer("-np", args.np)
    options.hosts("-H", args.hosts, np_)
    threads = None if args.threads is None else options.integer("--threads", args.threads)
    fusion_mb = options.integer("--fusion-threshold-mb", args.fusion_threshold_mb, low=0)
    cycle_ms = options.number("--cycle-time-ms", args.cycle_time_ms, low_open=True)
    controller = "gloo" if args.gloo else "mpi" if args.mpi else None
    if args.launcher != "horovodrun":
        if controller:
            raise UsageError(f"invalid --{controller} with --launcher {args.launcher}: it is a horovodrun option")
        cmd, env = build_launch_command(args.launcher, np_, args.hosts, command, threads)
    else:
        cmd, env, threads = build_run_command(np_, args.hosts, controller, command, threads,
                                              fusion_mb, cycle_ms, [])
    print(f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} " + shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    return subprocess.call(cmd, env=env)


# --- doctor ------------------------------------------------------------------------

def _version(dist: str) -> Optional[str]:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def check_build_flags(exe: Optional[str]) -> dict:
    """Parse ``horovodrun --check-build``: {'PyTorch': True, 'MPI': False, ...}."""
    if not exe:
        return {}
    try:
        out = subprocess.run([exe, "--check-build"], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    flags = {}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("[X]") or line.startswith("[ ]"):
            flags[line[3:].strip()] = line.startswith("[X]")
    return flags


def doctor_report():
    """Rows of (ok, what, detail, fix). ``ok`` is True, False or None (optional/info)."""
    from .data import FASHION_MNIST_DIR, fashion_mnist_available

    rows = []
    py_ok = sys.version_info >= (3, 9)
    rows.append((py_ok, "Python", sys.version.split()[0], "use Python 3.9+ (3.11 is tested)"))
    fix_install = "run `make install` (scripts/install.sh) and use .venv/bin/python"
    torch_v, tf_v = _version("torch"), _version("tensorflow") or _version("tensorflow-cpu")
    rows.append((torch_v is not None, "PyTorch", torch_v or "not installed", fix_install))
    rows.append((tf_v is not None if torch_v is None else None, "TensorFlow", tf_v or "not installed",
                 fix_install + " (needed only for hvd_lb.tf)"))
    hvd_v = _version("horovod")
    exe = horovodrun_path()
    rows.append((hvd_v is not None and exe is not None, "Horovod",
                 f"{hvd_v} ({exe})" if hvd_v else "not installed", fix_install))
    flags = check_build_flags(exe) if hvd_v else {}
    for item, fix in (("PyTorch", "rebuild Horovod with HOROVOD_WITH_PYTORCH=1: " + fix_install),
                      ("TensorFlow", "rebuild Horovod with HOROVOD_WITH_TENSORFLOW=1: " + fix_install),
                      ("Gloo", "rebuild Horovod with HOROVOD_WITH_GLOO=1 (needs cmake): " + fix_install),
                      ("MPI", "apt-get install openmpi-bin libopenmpi-dev, then " + fix_install),
                      ("NCCL", "on a GPU machine build with HOROVOD_GPU_OPERATIONS=NCCL (docker/Dockerfile.gpu)")):
        if hvd_v:
            ok = flags.get(item)
            needed = item not in ("NCCL",) and not (item == "TensorFlow" and tf_v is None)
            rows.append((ok if needed else (ok or None), f"Horovod built with {item}",
                         "yes" if ok else "no", fix))
    mpirun = shutil.which("mpirun")
    rows.append((mpirun is not None, "Open MPI (mpirun)", mpirun or "not found",
                 "apt-get install openmpi-bin libopenmpi-dev"))
    smi = shutil.which("nvidia-smi")
    gpus = "none"
    if smi:
        try:
            gpus = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout.strip() or "none"
        except (OSError, subprocess.TimeoutExpired):
            gpus = "nvidia-smi failed"
    rows.append((None, "GPUs", gpus.replace("\n", "; "), "optional: CPU training works; GPUs need the NCCL build"))
    data_ok = fashion_mnist_available()
    rows.append((data_ok, "Fashion-MNIST (demo data)", FASHION_MNIST_DIR if data_ok else "missing",
                 "apt-get install dataset-fashion-mnist"))
    return rows


def cmd_doctor(args) -> int:
    rows = doctor_report()
    bad = 0
    for ok, what, detail, fix in rows:
        mark = {True: "[ok]  ", False: "[MISSING]", None: "[info]"}[ok]
        print(f"{mark:9} {what}: {detail}")
        if ok is False:
            bad += 1
            print(f"{'':9}   fix: {fix}")
    print("everything hvd_lb needs is installed" if not bad else f"{bad} problem(s) found")
    return 0 if not bad else 1


# --- entry point -------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse that reports a mistake as one ``hvd-lb: error: …`` line (no usage block), exit code 2.

    Subcommand parsers are of this class too (``add_subparsers`` uses the parent's).
    """

    def error(self, message):
        self.exit(2, f"hvd-lb: error: {message}\n")


def make_parser() -> argparse.ArgumentParser:
    """Options are parsed as text and checked by ``options`` (range messages) before anything runs."""
    p = _Parser(prog="hvd-lb", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    demo.add_arguments(sub.add_parser("demo", help="large-batch Fashion-MNIST: base vs VR optimizers"))
    r = sub.add_parser("run", help="horovodrun (or mpirun, torchrun, tf) with sensible defaults; prints the command")
    r.add_argument("--launcher", choices=LAUNCHERS, default="horovodrun",
                   help="horovodrun (default), mpirun (Horovod without horovodrun, e.g. with mpi4py) "
                        "torchrun (DDP with hvd_lb.torch.ddp, no Horovod) or tf (tf.distribute "
                        "MultiWorkerMirroredStrategy workers with TF_CONFIG on this host, no Horovod)")
    r.add_argument("-np", "--num-proc", dest="np", required=True, help="number of workers, ≥ 1")
    r.add_argument("-H", "--hosts", default=None, help="host:slots,... (default localhost:NP)")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--gloo", action="store_true")
    g.add_argument("--mpi", action="store_true")
    r.add_argument("--threads", default=None, help="threads per worker (default cores / local workers)")
    r.add_argument("--fusion-threshold-mb", default=64, help="Horovod's tensor fusion buffer, MB (0: off)")
    r.add_argument("--cycle-time-ms", default=1.0, help="Horovod's cycle time, ms (> 0)")
    r.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    r.add_argument("command", nargs=argparse.REMAINDER, help="-- python train.py ...")
    sub.add_parser("doctor", help="what is installed, what is missing, how to fix it")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        if args.cmd == "run":
            return cmd_run(args)
        if args.cmd == "doctor":
            return cmd_doctor(args)
        return demo.main(args)
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"hvd-lb: error: {e}", file=sys.stderr)
        return 2
