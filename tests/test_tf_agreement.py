"""Issue 18, item 1 (Keras 3): ranks that build different DistributedOptimizers get the same
clear error on every rank at the first step of ``fit``, within seconds, instead of a hang."""
import pytest

from tests.hvdrun import ROOT, read_rank_json, run_horovod

WORKER = ROOT / "tests" / "scripts" / "tf_agreement_worker.py"
EXPECT = {"gsnr_on_one_rank": "GSNR (rank 0: True; rank 1: False)",
          "frozen": "variables (shape, dtype, trainable) (#2: rank 0: [[3, 2], 'float32', True]; rank 1: (only 2))",
          "micro_batches": "micro_batches (rank 0: 2; rank 1: 4)",
          "rule": "optimizer (rank 0: VRLARS (vr-lars); rank 1: VRLAMB (vr-lamb))"}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("tf_agreement")
    run_horovod([WORKER, out], np=2, timeout=300)
    return read_rank_json(out, 2)


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", sorted(EXPECT))
def test_disagreement_is_the_same_error_on_every_rank(ranks, case):
    errors = [r[case]["error"] for r in ranks]
    assert errors[0] is not None and errors[0] == errors[1], errors
    assert EXPECT[case] in errors[0] and "every rank must build the same optimizer" in errors[0]
    assert max(r[case]["seconds"] for r in ranks) < 10.0


@pytest.mark.multiprocess
def test_identical_ranks_train(ranks):
    assert all(r["same"]["error"] is None for r in ranks)
