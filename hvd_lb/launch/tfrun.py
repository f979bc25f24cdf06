"""``hvd-lb run --launcher tf``: N local workers for ``tf.distribute.MultiWorkerMirroredStrategy``.

``python -m hvd_lb.launch.tfrun -np N [--grace S] -- python train.py ...`` picks N free
loopback ports, starts worker i with ``TF_CONFIG = {"cluster": {"worker": [...]},
"task": {"type": "worker", "index": i}}`` (and ``HVD_LB_TF_WORKER=i``), and waits. When a
worker ends with an error (or is killed), the others are stopped (SIGTERM, SIGKILL after
``--grace`` seconds) and the launcher exits with that worker's code: a job never waits on a
dead worker (MultiWorkerMirroredStrategy alone would wait for its collective timeout).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import List


def free_ports(n: int) -> List[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together while chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tf_config(ports: List[int], index: int) -> str:
    return json.dumps({"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def worker_envs(n: int, env=None) -> List[dict]:
    """One environment per worker: the caller's, plus TF_CONFIG on fresh loopback ports."""
    ports = free_ports(n)
    base = dict(os.environ if env is None else env)
    return [dict(base, TF_CONFIG=tf_config(ports, i), HVD_LB_TF_WORKER=str(i)) for i in range(n)]


def run(command: List[str], n: int, grace: float = 10.0, env=None) -> int:
    procs = [subprocess.Popen(command, env=e) for e in worker_envs(n, env)]
    failed = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [c for c in codes if c not in (None, 0)]
            if bad:
                failed = bad[0]
                break
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.1)
    except KeyboardInterrupt:
        failed = 130
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + grace
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    print(f"hvd-lb: a worker ended with exit code {failed}: stopped the others", file=sys.stderr, flush=True)
    return failed if failed > 0 else 128 - failed  # a signal -N as the shell's 128+N


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hvd_lb.launch.tfrun", description=__doc__.splitlines()[0])
    p.add_argument("-np", dest="np", type=int, required=True)
    p.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.np < 1 or not command or not args.grace >= 0:
        p.error("need -np ≥ 1, --grace ≥ 0 and a command after --")
    return run(command, args.np, args.grace)


if __name__ == "__main__":
    sys.exit(main())
