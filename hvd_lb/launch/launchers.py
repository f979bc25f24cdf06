"""``hvd-lb run --launcher mpirun|torchrun|tf``: the command line and environment (horovodrun: horovodrun.py).

``mpirun`` starts Horovod workers without horovodrun (the script may call
``hvd.init(comm=MPI.COMM_WORLD)`` with mpi4py); ``torchrun`` starts DDP workers for
``hvd_lb.torch.ddp`` (no Horovod at all); ``tf`` starts ``tf.distribute.MultiWorkerMirroredStrategy``
workers with ``TF_CONFIG`` on loopback ports (``tfrun.py``; no Horovod either).
"""
from __future__ import annotations

import os
import shutil
import sys
from typing import List, Optional

from .horovodrun import UsageError, resolve_python

LAUNCHERS = ("horovodrun", "mpirun", "torchrun", "tf")


def _local_workers(np_: int, hosts: Optional[str]) -> int:
    if not hosts:
        return np_
    return sum(int(h.split(":")[1]) if ":" in h else 1 for h in hosts.split(",") if h.startswith("localhost"))


def build_launch_command(launcher: str, np_: int, hosts: Optional[str], command: List[str],
                         threads: Optional[int]) -> tuple:
    """(command line, environment) for ``mpirun``, ``torchrun`` or ``tf`` with ``np_`` workers."""
    if launcher not in LAUNCHERS[1:]:
        raise UsageError(f"invalid --launcher {launcher}: must be one of {', '.join(LAUNCHERS)}")
    if np_ < 1:
        raise UsageError(f"invalid -np {np_}: must be an integer in [1, inf)")
    if not command:
        raise UsageError(f"no training command: use hvd-lb run --launcher {launcher} -np N -- python train.py ...")
    if threads is None:
        # One worker per core share, as for horovodrun: oversubscribed OpenMP threads are slow.
        threads = max(1, (os.cpu_count() or 1) // max(1, _local_workers(np_, hosts) or np_))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    if launcher == "mpirun":
        exe = shutil.which("mpirun")
        if exe is None:
            raise UsageError("mpirun not found: apt-get install openmpi-bin libopenmpi-dev")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # Open MPI refuses root unless told; containers usually run as root.
            env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
            env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        # As for horovodrun: "python" is this installation's interpreter, also on the workers' PATH.
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
        cmd = [exe, "-np", str(np_), "-H", hosts or f"localhost:{np_}", "--bind-to", "none",
               "-x", "OMP_NUM_THREADS", "-x", "PATH", *resolve_python(command)]
        return cmd, env
    if hosts and any(not h.startswith("localhost") for h in hosts.split(",")):
        if launcher == "tf":
            raise UsageError("invalid -H with --launcher tf: it starts the workers of one host; across hosts "
                             "start one worker per host with TF_CONFIG (README, Without Horovod)")
        raise UsageError("invalid -H with --launcher torchrun: torchrun starts the workers of one node; "
                         "on each node run torchrun --nnodes N --node-rank R --rdzv-endpoint HOST:PORT ...")
    if launcher == "tf":
        return [sys.executable, "-m", "hvd_lb.launch.tfrun", "-np", str(np_), "--", *resolve_python(command)], env
    # torchrun runs the script with its own interpreter: drop a leading "python".
    if os.path.basename(command[0]).startswith("python"):
        command = command[1:]
    local = os.path.join(os.path.dirname(sys.executable), "torchrun")
    exe = [local] if os.path.exists(local) else [sys.executable, "-m", "torch.distributed.run"]
    cmd = [*exe, "--standalone", "--nproc-per-node", str(np_), *command]
    return cmd, env


__all__ = ["LAUNCHERS", "build_launch_command"]
