"""A rank killed mid-step ends the job promptly (no hang), torch and the VR wrapper."""
import subprocess
import sys
import time

import pytest

from tests.hvdrun import HOROVODRUN, ROOT, horovod_env

WORKER = ROOT / "tests" / "scripts" / "kill_worker.py"


@pytest.mark.multiprocess
@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_sigkill_of_a_rank_mid_step_ends_the_job(tmp_path, controller):
    if not HOROVODRUN.exists():
        pytest.skip("horovodrun not installed")
    cmd = [str(HOROVODRUN), "-np", "2", "-H", "localhost:2", f"--{controller}"]
    if controller == "mpi":
        cmd += ["--mpi-args=--oversubscribe"]
    proc = subprocess.Popen(cmd + [sys.executable, str(WORKER), str(tmp_path)], cwd=ROOT, env=horovod_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "rank0_started").exists():
            assert proc.poll() is None or (tmp_path / "rank0_started").exists(), proc.stdout.read()[-3000:]
            assert time.time() < deadline, "workers did not start"
            time.sleep(0.2)
        started = time.time()
        proc.wait(timeout=90)  # a hang fails here
        ended = time.time() - started
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    print(f"{controller}: job ended {ended:.1f} s after training started (kill at step 3)")
