"""Run a Python script under real ``horovodrun`` (or ``torchrun``, ``mpirun``) in a subprocess, with a timeout."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOROVODRUN = Path(sys.executable).with_name("horovodrun")


def horovod_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.setdefault("TF_NUM_INTRAOP_THREADS", "1")
    env.setdefault("TF_NUM_INTEROP_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # Open MPI refuses to run as root unless told it is fine (containers, CI).
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
    return env


def run_horovod(args, np: int = 2, controller: str = "gloo", timeout: float = 240, out_dir=None):
    """``horovodrun -np N -H localhost:N --gloo|--mpi python ARGS``; returns CompletedProcess.

    Fails the test with the captured output on a non-zero exit or a timeout.
    """
    if not HOROVODRUN.exists():
        pytest.skip("horovodrun not installed in this environment (run scripts/install.sh)")
    cmd = [str(HOROVODRUN), "-np", str(np), "-H", f"localhost:{np}", f"--{controller}"]
    if controller == "mpi":
        cmd += ["--mpi-args=--oversubscribe"]
    cmd += [sys.executable, *map(str, args)]
    return run_command(cmd, timeout, out_dir)


def run_torchrun(args, np: int = 2, timeout: float = 240, out_dir=None):
    """``torchrun --standalone --nproc_per_node N ARGS`` (ARGS: script and its arguments)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(np),
           *map(str, args)]
    return run_command(cmd, timeout, out_dir)


def run_mpirun(args, np: int = 2, timeout: float = 240, out_dir=None):
    """``mpirun -np N python ARGS`` (plain Open MPI, no horovodrun)."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun not installed in this environment (run scripts/install.sh)")
    cmd = [mpirun, "-np", str(np), "--oversubscribe", "--bind-to", "none", sys.executable, *map(str, args)]
    return run_command(cmd, timeout, out_dir)


def run_command(cmd, timeout: float, out_dir=None, env=None):
    """Run ``cmd`` with ``env`` (default ``horovod_env()``); fail the test with its output on an
    error or a timeout."""
    try:
        proc = subprocess.run(cmd, cwd=out_dir or ROOT, env=env or horovod_env(), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{e.stdout}\n{e.stderr}")
    if proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}: {' '.join(cmd)}\nSTDOUT:\n{proc.stdout[-6000:]}\n"
                    f"STDERR:\n{proc.stderr[-6000:]}")
    return proc


def read_rank_json(out_dir: Path, np: int, stem: str = "rank"):
    """Each rank writes ``{stem}{rank}.json``; return the list in rank order."""
    return [json.loads((Path(out_dir) / f"{stem}{r}.json").read_text()) for r in range(np)]


def elastic_horovodrun(tmp_path, args, np: int = 2, max_np: int = 3, **popen):
    """Start elastic ``horovodrun`` on localhost (``--network-interface lo``); the slots come from
    ``tmp_path/hosts`` through a discovery script, so writing that file grows or shrinks the job.

    Returns (the process, the hosts file); ``popen``: stdout, cwd, ... for ``subprocess.Popen``.
    """
    if not HOROVODRUN.exists():
        pytest.skip("horovodrun not installed in this environment (run scripts/install.sh)")
    hosts = tmp_path / "hosts"
    hosts.write_text(f"localhost:{np}\n")
    discover = tmp_path / "discover.sh"
    discover.write_text(f"#!/bin/sh\ncat {hosts}\n")
    discover.chmod(0o755)
    cmd = [str(HOROVODRUN), "-np", str(np), "--min-np", str(np), "--max-np", str(max_np),
           "--host-discovery-script", str(discover), "--network-interface", "lo", sys.executable, *map(str, args)]
    popen.setdefault("cwd", ROOT)
    return subprocess.Popen(cmd, env=horovod_env(), **popen), hosts

