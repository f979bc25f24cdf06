"""Issue 18, item 1: ranks that build different DistributedOptimizers get the same clear error on
every rank within seconds, instead of a hang. torch: when the wrapper is built; Keras 3: at the
first step of ``fit``."""
import pytest

from tests.hvdrun import ROOT, read_rank_json, run_horovod

EXPECT = {
    "torch": {"gsnr_on_one_rank": "GSNR (rank 0: True; rank 1: False)",
              "rule": "optimizer (rank 0: LARS (lars); rank 1: LAMB (lamb))",
              "name_prefix": "#0: rank 0: ['0.weight', [3, 4], 'float32', True]; rank 1: ['module.0.weight'",
              "frozen": "rank 1: ['1.bias', [2], 'float32', False]",
              "micro_batches": "micro_batches (rank 0: 2; rank 1: 4)",
              "square_dtype": "square_dtype (rank 0: None; rank 1: float64)",
              "gsnr_fused": "GSNR maths compiled (rank 0: [True]; rank 1: [False])"},
    "tf": {"gsnr_on_one_rank": "GSNR (rank 0: True; rank 1: False)",
           "frozen": "variables (shape, dtype, trainable) (#2: rank 0: [[3, 2], 'float32', True]; rank 1: (only 2))",
           "micro_batches": "micro_batches (rank 0: 2; rank 1: 4)",
           "rule": "optimizer (rank 0: VRLARS (vr-lars); rank 1: VRLAMB (vr-lamb))",
           "gsnr_fused": "GSNR maths compiled (rank 0: True; rank 1: False)"},
}
pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module", params=["torch", "tf"])
def ranks(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"agreement_{request.param}")
    run_horovod([ROOT / "tests" / "scripts" / f"{request.param}_agreement_worker.py", out], np=2, timeout=300)
    return request.param, read_rank_json(out, 2)


def test_disagreement_is_the_same_error_on_every_rank(ranks):
    backend, results = ranks
    for case, needle in EXPECT[backend].items():
        errors = [r[case]["error"] for r in results]
        assert errors[0] is not None and errors[0] == errors[1], (case, errors)
        assert needle in errors[0] and "every rank must build the same optimizer" in errors[0], case
        assert max(r[case]["seconds"] for r in results) < 10.0, case


def test_identical_ranks_train(ranks):
    assert all(r["same"]["error"] is None for r in ranks[1])
