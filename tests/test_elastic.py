"""Elastic Horovod with hvd_lb: grow 2 → 3 and shrink 3 → 2 on localhost (issue: reliability)."""
import collections
import json
import subprocess
import time

import pytest

from tests.hvdrun import ROOT, elastic_horovodrun

WORKER = ROOT / "tests" / "scripts" / "elastic_worker.py"
STEPS = 60


def _rows(out_dir):
    rows = []
    for path in out_dir.glob("worker_*.jsonl"):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def _wait(out_dir, proc, pred, what, timeout=150):
    end = time.time() + timeout
    while time.time() < end:
        if pred(_rows(out_dir)):
            return
        if proc.poll() is not None:
            pytest.fail(f"job ended while waiting for {what}: {proc.stdout.read()[-4000:]}")
        time.sleep(0.5)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.multiprocess
def test_grow_and_shrink_keep_ranks_identical(tmp_path):
    proc, hosts = elastic_horovodrun(tmp_path, [WORKER, tmp_path, STEPS], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
    try:
        _wait(tmp_path, proc, lambda rows: any(r["step"] >= 3 for r in rows), "3 steps on 2 workers")
        hosts.write_text("localhost:3\n")
        _wait(tmp_path, proc, lambda rows: sum(r["size"] == 3 and r["rank"] == 0 for r in rows) >= 5,
              "5 steps on 3 workers")
        hosts.write_text("localhost:2\n")
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    rows = _rows(tmp_path)
    sizes = [r["size"] for r in sorted((r for r in rows if r["rank"] == 0), key=lambda r: r["step"])]
    # 2 → 3 → 2, in that order, and training reached the end.
    transitions = [s for i, s in enumerate(sizes) if i == 0 or s != sizes[i - 1]]
    assert transitions == [2, 3, 2], transitions
    assert max(r["step"] for r in rows) == STEPS
    # Every step's parameters are identical on every rank that ran it (after each reset too).
    by_step = collections.defaultdict(set)
    for r in rows:
        by_step[(r["step"], r["size"])].add(r["digest"])
    assert all(len(d) == 1 for d in by_step.values())
    # The job ends cleanly; the removed worker exits with Horovod's "removed from elastic job".
    assert proc.returncode == 0, out[-4000:]
