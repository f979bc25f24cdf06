"""docs/CONTRIBUTING.md's steps alone add a working rule on both backends."""
import json
import subprocess
import sys

import pytest

from tests.hvdrun import ROOT, horovod_env

SCRIPT = ROOT / "tests" / "scripts" / "toy_rule.py"


@pytest.mark.parametrize("backend", ["torch", "tf"])
def test_toy_rule_registered_by_the_documented_steps_matches_reference(backend):
    # A fresh process: registering a rule is global and must not leak into this session.
    proc = subprocess.run([sys.executable, str(SCRIPT), backend], env=horovod_env(), capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    deviations = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {k.split("/")[0] for k in deviations} == {"signsgd", "vr-signsgd"}
    for key, dev in deviations.items():
        assert dev < 1e-12, key


def test_contributing_lists_the_steps_the_toy_rule_takes():
    text = (ROOT / "docs" / "CONTRIBUTING.md").read_text()
    for needle in ("rules.py", "reference.py", "torch/optimizers.py", "tf/optimizers.py", "register("):
        assert needle in text
