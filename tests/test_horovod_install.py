"""The installed Horovod is real and complete: PyTorch, TensorFlow, MPI and Gloo."""
import subprocess

import numpy as np
import pytest

from tests.hvdrun import HOROVODRUN, ROOT, horovod_env, read_rank_json, run_horovod

pytestmark = pytest.mark.multiprocess


def test_check_build_lists_frameworks_and_controllers():
    if not HOROVODRUN.exists():
        pytest.skip("horovodrun not installed")
    out = subprocess.run([str(HOROVODRUN), "--check-build"], capture_output=True, text=True,
                         env=horovod_env(), timeout=120).stdout
    for item in ("PyTorch", "TensorFlow", "MPI", "Gloo"):
        line = next(l for l in out.splitlines() if l.strip().endswith(item))
        assert "[X]" in line, out


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_two_process_allreduce(framework, controller, tmp_path):
    run_horovod([ROOT / "tests/scripts/allreduce_check.py", framework, tmp_path], np=2,
                controller=controller, timeout=180)
    ranks = read_rank_json(tmp_path, 2)
    g = np.array([[r + 1.0, -2.0 * (r + 1), 0.5] for r in range(2)])
    for res in ranks:
        assert res["size"] == 2
        np.testing.assert_allclose(res["mean"], g.mean(0), rtol=1e-15)
        np.testing.assert_allclose(res["sum"], g.sum(0), rtol=1e-15)
        np.testing.assert_allclose(res["grouped_mean"], g.mean(0), rtol=1e-15)
        np.testing.assert_allclose(res["grouped_sq"], (g * g).mean(0), rtol=1e-15)
