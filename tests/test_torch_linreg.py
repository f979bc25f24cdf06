"""VRGD §7.2 linear regression through the real optimizers (size-1 Horovod, micro_batches = k = 8).

y = W·x, W_i = i (i = 1..10), w₀ = 0, MSE, 100 steps of batch 256.  Only what must
hold is asserted; the step counts are printed (run with -s) and reported, not tuned.
"""
import json
import subprocess
import sys

import numpy as np
import pytest

from tests.hvdrun import ROOT, horovod_env

WORKER = ROOT / "tests" / "scripts" / "torch_dist_worker.py"
LRS = (0.01, 0.03, 0.1, 0.3, 0.6, 0.9)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    proc = subprocess.run([sys.executable, str(WORKER), "single", str(out)], env=horovod_env(),
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / "rank0.json").read_text())


def test_one_sample_is_refused_at_construction(single):
    msg = single["k1_error"]
    assert msg is not None and "k = 1 × 1 = 1" in msg
    assert "micro_batches=2" in msg and "horovodrun -np 2" in msg


def first_step_at_or_below(losses, target):
    return next((i + 1 for i, x in enumerate(losses) if x <= target), None)


@pytest.mark.parametrize("lr", LRS)
def test_linear_regression(single, lr):
    runs = single["linreg"]
    sgd, vr = runs[f"sgd/{lr}"]["loss"], runs[f"vr-sgd/{lr}"]["loss"]
    start = 385.0  # E[(W·x)²] = Σ i² at w = 0
    for losses in (sgd, vr):
        assert np.all(np.isfinite(losses))
        assert max(losses) < 2 * start                     # stable: no blow-up
        assert losses[-1] < 0.05 * start                   # converging
        assert losses[-1] <= min(losses[:50]) or losses[-1] < 1e-20
    # γ = 1: VR-SGD is SGD, step for step, bit for bit.
    assert runs[f"vr-sgd/{lr}/gamma1.0"] == runs[f"sgd/{lr}"]
    target = sgd[-1]
    print(f"\nlr={lr}: SGD loss@100={sgd[-1]:.3e} (first reached at step {first_step_at_or_below(sgd, target)}), "
          f"VR-SGD loss@100={vr[-1]:.3e}, VR-SGD steps to SGD's loss@100: {first_step_at_or_below(vr, target)}")
