"""torch.optim's contract through hvd_lb.torch.DistributedOptimizer under real horovodrun.

Issue 17 (items 1, 8–12): hooks once per step, closures, parameters without a gradient,
a second wrapper on the same parameters, ``torch.compile(opt.step)``, bf16/fp16
parameters (Horovod cannot all-reduce bf16) against the float64 reference.
"""
import numpy as np
import pytest

from hvd_lb import reference
from tests.hvdrun import ROOT, read_rank_json, run_horovod
from tests.scripts.torch_contract_worker import STEPS, init_params, micro_grads
from tests.scripts.torch_contract_worker import low_precision_subjects

WORKER = ROOT / "tests" / "scripts" / "torch_contract_worker.py"
NAMES = ["GSNR(AdamW)", "vr-lamb", "lamb"]
pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module", params=[1, 2], ids=["np1", "np2"])
def ranks(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"contract{request.param}")
    run_horovod([WORKER, out], np=request.param, timeout=400)
    return read_rank_json(out, request.param)


def _case(ranks, key):
    for r in ranks:
        assert "error" not in r[key], r[key]["error"]
    return [r[key] for r in ranks]


def test_step_hooks_run_once_per_step(ranks):
    for res in _case(ranks, "hooks"):
        for name in NAMES:
            assert res[name] == sorted(["pre", "post", "gpre", "gpost"] * 2), name


def test_closure_runs_before_the_reduction_and_returns_its_loss(ranks):
    for res in _case(ranks, "closure"):
        for name in NAMES:
            assert res[name]["equal"], name
            assert res[name]["losses"] == [float(s) for s in range(1, STEPS + 1)], name


def test_parameter_without_gradient_is_left_alone(ranks):
    """No gradient on any rank: untouched, as torch does. On some ranks only: reduced as zeros
    there and stepped alike on every rank (Horovod's rule)."""
    res = _case(ranks, "unused_param")
    for r in res:
        assert {k: r[k] for k in ("grad_none", "unchanged", "no_state")} == \
            {"grad_none": True, "unchanged": True, "no_state": True}
        assert r["mixed"] == res[0]["mixed"] and r["mixed"] != [1.0] * 3


def test_second_wrapper_after_the_first_is_deleted(ranks):
    assert all(r["equal"] for r in _case(ranks, "second_wrapper"))


def test_compiled_step_equals_eager(ranks):
    for res in _case(ranks, "compile"):
        for name in NAMES:
            assert res[name] <= 1e-12, name


# Tolerances: |Δw|/max|w| after 5 steps. bf16: ~5 ulps (2⁻⁸); fp16: ~10 ulps (2⁻¹¹). hvd_lb's
# rules keep float32 state for 16-bit parameters; torch.optim.AdamW keeps fp16 state, whose second
# moment underflows below 6e-8 (GSNR(AdamW) in fp16: 7.8e-3 measured), so it is not in the fp16 list.
LOW_PRECISION = [("bfloat16", n, 2e-2) for n in NAMES + ["GSNR(SGD)"]] + \
    [("float16", n, 5e-3) for n in ("GSNR(SGD)", "lamb", "vr-lamb")]


@pytest.mark.parametrize("dtype,name,tol", LOW_PRECISION)
def test_low_precision_parameters_match_the_reference(ranks, dtype, name, tol):
    """bf16/fp16 parameters and gradients, statistics in float32, Horovod's reduction in a dtype it
    supports: the float64 reference fed the same rounded samples, within the dtype's rounding."""
    import torch
    W, M = ranks[0]["size"], ranks[0]["M"]
    res = _case(ranks, "low_precision")
    key = f"{name}/{dtype}"
    assert res[0][key]["dtypes"] == [f"torch.{dtype}"] * 2
    for r in res[1:]:
        assert r[key]["params"] == res[0][key]["params"], f"{key}: ranks differ"
    _, ref_name, hp = low_precision_subjects(None)[name]
    td = getattr(torch, dtype)
    w0 = [torch.tensor(a).to(td).double().numpy() for a in init_params()]
    ref = reference.ReferenceOptimizer(ref_name, w0, **hp)
    for step in range(1, STEPS + 1):
        samples = [[[torch.tensor(g).to(td).double().numpy() for g in micro_grads(step, w, m, M)]
                    for m in range(M)] for w in range(W)]
        ref.step_samples(reference.micro_batch_samples(samples))
    for i, (got, want) in enumerate(zip(res[0][key]["params"], ref.params)):
        want = np.asarray(want).reshape(-1)
        err = np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want))
        moved = np.max(np.abs(want - w0[i].reshape(-1))) / np.max(np.abs(want))
        assert err <= tol < moved, f"{key} [{i}]: error {err:.2e}, moved {moved:.2e}"


def test_rank0_only_resume_is_bitwise_the_uninterrupted_run(ranks):
    """hvd_lb.torch.broadcast_optimizer_state builds missing state without moving a parameter:
    a rank-0-only resume and a fresh start with the broadcast equal the uninterrupted run bit for
    bit (Horovod's own moves the parameters by AdamW's decay on the ranks without state)."""
    res = _case(ranks, "resume")
    for name in ("AdamW", "GSNR(AdamW)"):
        for r in res:
            assert r[f"{name}/resume/hvd_lb"] == 0.0 and r[f"{name}/fresh"] == 0.0, name
        if len(res) > 1:  # the defect hvd_lb's version removes, on the ranks that had no state
            assert max(r[f"{name}/resume/horovod"] for r in res) > 0.0, name


def test_elastic_sync_builds_state_without_counting_a_step(ranks):
    """Issue 18 item 6: after hvd.elastic's sync (every (re)start) the first real step is the
    transform's step 1 and nothing moved; Horovod's TorchState counts its zero-gradient step."""
    for r in _case(ranks, "elastic_sync"):
        assert r["hvd_lb"] == {"max_diff": 0.0, "gsnr_step": 2}
        assert r["horovod"]["gsnr_step"] == 3


def test_step_without_backward_never_hangs(ranks):
    """One rank without a backward takes part with zeros (ranks identical, it warns); no rank with
    one: the same RuntimeError on every rank within a second (alone: at once, as before)."""
    res = _case(ranks, "no_backward")
    for r in res:
        assert r["params"] == res[0]["params"]
        assert r["raised"] is not None and "without loss.backward()" in r["raised"] and r["seconds"] < 1.0
    assert [r["warned"] for r in res] == ([False] if len(res) == 1 else [False, True])

