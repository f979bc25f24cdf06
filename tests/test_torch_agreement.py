"""Issue 18, item 1 (torch): ranks that disagree about what hvd_lb reduces get the same clear
error on every rank when the DistributedOptimizer is built, within a second, instead of a hang."""
import pytest

from tests.hvdrun import ROOT, read_rank_json, run_horovod

WORKER = ROOT / "tests" / "scripts" / "torch_agreement_worker.py"
EXPECT = {"gsnr_on_one_rank": "GSNR (rank 0: True; rank 1: False)",
          "rule": "optimizer (rank 0: LARS (lars); rank 1: LAMB (lamb))",
          "name_prefix": "#0: rank 0: ['0.weight', [3, 4], 'float32', True]; rank 1: ['module.0.weight'",
          "frozen": "rank 1: ['1.bias', [2], 'float32', False]",
          "micro_batches": "micro_batches (rank 0: 2; rank 1: 4)",
          "square_dtype": "square_dtype (rank 0: None; rank 1: float64)"}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("agreement")
    run_horovod([WORKER, out], np=2, timeout=240)
    return read_rank_json(out, 2)


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", sorted(EXPECT))
def test_disagreement_is_the_same_error_on_every_rank(ranks, case):
    errors = [r[case]["error"] for r in ranks]
    assert errors[0] is not None and errors[0] == errors[1], errors
    assert EXPECT[case] in errors[0] and "every rank must build the same optimizer" in errors[0]
    assert max(r[case]["seconds"] for r in ranks) < 5.0


@pytest.mark.multiprocess
def test_identical_ranks_train(ranks):
    assert all(r["same"]["error"] is None for r in ranks)
