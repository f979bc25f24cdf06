"""Shared by ``hvd-lb run`` and ``hvd-lb demo``: the ``horovodrun`` command line and its environment."""
from __future__ import annotations

import os
import shutil
import sys
from typing import List, Optional


class UsageError(Exception):
    """A user mistake: printed as one line, exit code 2."""


def horovodrun_path() -> Optional[str]:
    local = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    return local if os.path.exists(local) else shutil.which("horovodrun")


def resolve_python(command: List[str]) -> List[str]:
    """``python``/``python3`` → the interpreter hvd_lb runs in, not whichever is first on PATH."""
    if command and command[0] in ("python", "python3"):
        return [sys.executable] + command[1:]
    return command


def build_run_command(np_: int, hosts: Optional[str], controller: Optional[str], command: List[str],
                      threads: Optional[int], fusion_mb: float, cycle_ms: float,
                      extra: List[str]) -> tuple:
    """The horovodrun command line and the environment it runs with."""
    if np_ < 1:
        raise UsageError(f"invalid -np {np_}: must be an integer in [1, inf)")
    if not command:
        raise UsageError("no training command: use hvd-lb run -np N -- python train.py ...")
    exe = horovodrun_path()
    if exe is None:
        raise UsageError("horovodrun not found: run `make install` (scripts/install.sh) and use .venv/bin/hvd-lb")
    hosts = hosts or f"localhost:{np_}"
    local = sum(int(h.split(":")[1]) if ":" in h else 1 for h in hosts.split(",") if h.startswith("localhost"))
    if threads is None:
        # One worker per core share: oversubscribed BLAS/OpenMP threads are the
        # commonest cause of slow CPU Horovod jobs.
        threads = max(1, (os.cpu_count() or 1) // max(1, local or np_))
    cmd = [exe, "-np", str(np_), "-H", hosts]
    if controller:
        cmd.append(f"--{controller}")
    cmd += ["--fusion-threshold-mb", f"{fusion_mb:g}", "--cycle-time-ms", f"{cycle_ms:g}"]
    cmd += extra + resolve_python(command)
    env = dict(os.environ)
    # Workers (and their own subprocesses) find this installation's python first.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("TF_NUM_INTRAOP_THREADS", str(threads))
    env.setdefault("TF_NUM_INTEROP_THREADS", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # Open MPI refuses root unless told; containers usually run as root.
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return cmd, env, threads
