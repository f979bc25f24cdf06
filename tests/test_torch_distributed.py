"""hvd_lb.torch.DistributedOptimizer under real horovodrun (SPEC §1, §6) and Horovod compatibility."""
import importlib.util
import warnings

import numpy as np
import pytest
import torch

from hvd_lb import reference, rules
from tests.hvdrun import ROOT, read_rank_json, run_horovod

WORKER = ROOT / "tests" / "scripts" / "torch_dist_worker.py"
_spec = importlib.util.spec_from_file_location("torch_dist_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

ADAPT = [True, False]  # (4, 3) weight, (3,) bias as create() groups them


def _ref(name, w0=None, **hp):
    w0 = worker.init_params() if w0 is None else w0
    return reference.ReferenceOptimizer(name, w0, adapt=ADAPT, decay=ADAPT, **hp)


def _samples(step, W, M, seed=0):
    return reference.micro_batch_samples(
        [[worker.micro_grads(step, w, m, M, seed) for m in range(M)] for w in range(W)])


def _flat(arrays):
    return [np.asarray(a, np.float64).reshape(-1) for a in arrays]


def assert_params(actual, expected, tol, what):
    for i, (a, e) in enumerate(zip(actual, _flat(expected))):
        scale = max(float(np.max(np.abs(e))), 1e-300)
        np.testing.assert_allclose(np.asarray(a), e, rtol=tol, atol=tol * scale, err_msg=f"{what} [{i}]")


def launch(tmp_path, mode, np_, controller="gloo", names=()):
    run_horovod([WORKER, mode, tmp_path, *names], np=np_, controller=controller, timeout=300)
    ranks = read_rank_json(tmp_path, np_)
    assert all(r["size"] == np_ for r in ranks)
    return ranks


def check_parity(ranks, names, W):
    for name in names:
        for M in (1, 2):
            key = f"{name}/M{M}"
            for r in ranks[1:]:
                assert r[key] == ranks[0][key], f"{key}: ranks differ"
            ref = _ref(name, **worker.hp_for(name))
            for step in range(1, worker.STEPS + 1):
                ref.step_samples(_samples(step, W, M))
            assert_params(ranks[0][key], ref.params, 1e-10, key)


@pytest.fixture(scope="module")
def compat(tmp_path_factory):
    """One -np 2 Gloo launch runs the parity cases and every compatibility case."""
    out = tmp_path_factory.mktemp("compat")
    return launch(out, "parity+compat+gsnr+misuse", 2, "gloo", rules.NAMES)


@pytest.mark.multiprocess
def test_distributed_equals_reference_np2_gloo(compat):
    """Every name, micro_batches 1 and 2: params after 5 steps = reference on the same samples."""
    check_parity(compat, rules.NAMES, 2)


@pytest.mark.multiprocess
@pytest.mark.parametrize("np_,controller", [(4, "gloo"), (2, "mpi")])
def test_distributed_equals_reference(tmp_path, np_, controller):
    ranks = launch(tmp_path, "parity", np_, controller, rules.NAMES)
    check_parity(ranks, rules.NAMES, np_)


def _same_on_ranks(ranks, key):
    for r in ranks[1:]:
        assert r[key] == ranks[0][key], f"{key}: ranks differ"
    return ranks[0][key]


@pytest.mark.multiprocess
def test_broadcast_parameters_and_optimizer_state(compat):
    """Ranks start apart; rank 0 resumes 3 local steps; broadcast makes everything equal."""
    ref = _ref("vr-lamb", worker.init_params(seed=10), lr=0.01)
    for step in range(1, 4):
        mean, sq = reference.gradient_stats([worker.micro_grads(step, w, 0, 1, seed=5) for w in range(4)])
        ref.step(mean, sq)
    assert_params(_same_on_ranks(compat, "bcast_params"), ref.params, 1e-12, "broadcast params")
    state = _same_on_ranks(compat, "bcast_state")
    assert _same_on_ranks(compat, "bcast_lr") == 0.01
    for i in range(2):
        assert state[f"{i}/step"] == 3
        for slot in rules.get_rule("vr-lamb").slots:
            assert_params([state[f"{i}/{slot}"]], [ref.state[slot][i]], 1e-12, slot)
    for step in (4, 5):
        ref.step_samples(_samples(step, 2, 1))
    assert_params(_same_on_ranks(compat, "bcast_after"), ref.params, 1e-10, "after broadcast")


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["vr-momentum", "lamb"])
def test_gradient_clipping_between_synchronize_and_step(compat, name):
    """clip_grad_norm_ scales ḡ by c; the VR statistics follow: every sample is scaled by c."""
    assert_params(_same_on_ranks(compat, f"clip/{name}"), reference_run(name, clip=0.5).params, 1e-10, name)


def reference_run(name, clip=None, skip=()):
    """The reference fed steps 1..STEPS of 2 workers × 2 micro-batches (steps in ``skip`` left
    out); with ``clip``, every sample scaled by c = min(1, clip/‖ḡ‖) (norm clipping)."""
    ref = _ref(name)
    for step in range(1, worker.STEPS + 1):
        if step in skip:
            continue
        samples = _samples(step, 2, 2)
        if clip is not None:
            mean, _ = reference.gradient_stats(samples)
            c = min(1.0, clip / (np.sqrt(sum(float(np.sum(m * m)) for m in mean)) + 1e-6))
            samples = [[c * x for x in s] for s in samples]
        ref.step_samples(samples)
    return ref


@pytest.mark.multiprocess
def test_fused_vr_lamb_through_horovod(compat):
    """fused=True under horovodrun -np 2: the reference's parameters, the same on both ranks."""
    assert_params(_same_on_ranks(compat, "fused/vr-lamb"), reference_run("vr-lamb").params, 1e-10, "fused")


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["vr-sgd", "momentum"])
def test_grad_scaler(compat, name):
    """torch.amp.GradScaler('cpu'): unscale_ after synchronize() gives the unscaled result."""
    assert_params(_same_on_ranks(compat, f"scaler/{name}"), reference_run(name).params, 1e-10, name)


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["vr-tvlars", "vr-adam", "lars"])
def test_checkpoint_resume_equals_uninterrupted(compat, name):
    assert _same_on_ranks(compat, f"ckpt/{name}") is True


@pytest.mark.multiprocess
def test_bfloat16_squares(compat):
    """s travels as bf16: the reference fed the bf16-rounded local shares of s matches."""
    ref = _ref("vr-sgd")
    for step in range(1, worker.STEPS + 1):
        samples = _samples(step, 2, 2)
        mean, _ = reference.gradient_stats(samples)
        shares = []
        for w in range(2):
            local = [np.mean([np.square(x[i]) for x in samples[2 * w:2 * w + 2]], axis=0) for i in range(2)]
            shares.append([torch.tensor(s).to(torch.bfloat16).double().numpy() for s in local])
        sq = [np.mean([sh[i] for sh in shares], axis=0) for i in range(2)]
        ref.step(mean, sq)
    assert_params(_same_on_ranks(compat, "bf16/vr-sgd"), ref.params, 1e-6, "bf16")


@pytest.mark.multiprocess
def test_gsnr_diagnostics_names_and_values(compat):
    diag = _same_on_ranks(compat, "diag")
    assert list(diag) == ["weight", "bias"]
    mean, sq = reference.gradient_stats(_samples(1, 2, 1))
    for (name, d), g, s in zip(diag.items(), mean, sq):
        _, mu, clipped = reference.gsnr_ratio(g, s, 0.1)
        assert d["mean_gsnr"] == pytest.approx(mu, rel=1e-10)
        assert d["clipped_fraction"] == pytest.approx(clipped, abs=1e-12)


@pytest.mark.multiprocess
def test_sparse_gradients_densified_with_one_warning(compat):
    np.testing.assert_allclose(_same_on_ranks(compat, "sparse"), compat[0]["dense"], rtol=1e-12)
    assert compat[0]["sparse_warnings"] == 1


@pytest.mark.multiprocess
@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("case", ["sgd", "adamw"])
def test_gsnr_of_torch_optimizers_equals_reference(compat, case, M):
    """GSNR(torch.optim.SGD) = reference vr-momentum, GSNR(AdamW) = reference vr-adam, after
    Horovod's broadcast_optimizer_state, whose step on zero gradients (ḡ = s = 0) builds the
    lazy state and is step 1 for the optimizer, as with plain Horovod."""
    key = f"gsnr/{case}/M{M}"
    params = _same_on_ranks(compat, key)
    if case == "sgd":
        ref = reference.ReferenceOptimizer("vr-momentum", worker.init_params(), lr=0.05, momentum=0.9,
                                           weight_decay=0.01, gamma=0.3, gsnr_momentum=0.0)
    else:
        ref = reference.ReferenceOptimizer("vr-adam", worker.init_params(), lr=0.05, weight_decay=0.01,
                                           gamma=0.3, gsnr_momentum=0.9)
    zeros = [np.zeros_like(w) for w in ref.params]
    ref.step(zeros, zeros)
    for step in range(1, worker.STEPS + 1):
        ref.step_samples(_samples(step, 2, M))
    assert_params(params, ref.params, 1e-10, key)


@pytest.mark.multiprocess
@pytest.mark.parametrize("key,needle", [
    ("step_without_backward", "without loss.backward()"),
    ("zero_grad_between_micro_batches", "zero_grad() between micro-batches"),
    ("wrap_twice", "already a DistributedOptimizer"),
    ("compression_string", "invalid compression='fp16'"),
    ("k_after_shrink", "k = 1 × 1 = 1"),
])
def test_misuse_is_a_clear_error_on_every_rank(compat, key, needle):
    message = _same_on_ranks(compat, key)
    assert message is not None and needle in message, message


@pytest.mark.multiprocess
def test_param_group_added_after_wrapping_is_reduced(compat):
    """ḡ of the added tensor is the mean over ranks of [0, 1, 2]·(rank + 1); GSNR scales it."""
    w = _same_on_ranks(compat, "added_group")
    ref = reference.ReferenceOptimizer("vr-sgd", [np.zeros(3)], adapt=[False], decay=[False])
    for _ in range(2):
        ref.step_samples([[np.arange(3.0) * (r + 1)] for r in range(2)])
    assert_params([w], ref.params, 1e-12, "added group")


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["vr-sgd", "sgd"])
def test_skip_nonfinite_skips_together(compat, name):
    """An inf on one rank: every rank skips that step, state untouched, one warning."""
    params = _same_on_ranks(compat, f"skip/{name}")
    assert _same_on_ranks(compat, f"skip/{name}/count") == 1
    assert compat[0][f"skip/{name}/warnings"] == 1
    assert_params(params, reference_run(name, skip={3}).params, 1e-10, name)


def test_statistics_follow_clipping_inside_a_closure():
    """``step(closure)`` whose closure synchronizes and clips: s follows the clipping as it does
    outside the closure (with ``skip_synchronize()``); only step()'s own synchronize takes no norms."""
    hvd = pytest.importorskip("horovod.torch")
    import hvd_lb.torch as lbt
    hvd.init()

    def squares(inside):
        torch.manual_seed(0)
        m = torch.nn.Linear(4, 3)
        opt = lbt.DistributedOptimizer(lbt.create("vr-momentum", m, lr=0.1), named_parameters=m.named_parameters(),
                                       micro_batches=2)
        seen, step = {}, opt._gsnr_step

        def spy():
            seen.update({n: opt._gsnr_sq[p].clone() for n, p in m.named_parameters()})
            step()
        opt._gsnr_step = spy
        x = torch.randn(8, 4)

        def closure():
            opt.zero_grad()
            for c in x.chunk(2):
                m(c).pow(2).sum().mul(100).backward()
            opt.synchronize()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.01)
            return 0
        with warnings.catch_warnings():   # k = 2; step() after the closure's synchronize()
            warnings.simplefilter("ignore", UserWarning)
            if inside:
                opt.step(closure)
            else:
                closure()
                with opt.skip_synchronize():
                    opt.step()
        return seen

    inside, outside = squares(True), squares(False)
    for name in outside:
        torch.testing.assert_close(inside[name], outside[name], rtol=1e-12, atol=0)
    assert float(outside["weight"].sum()) < 1e-3   # clipped: s scaled with ḡ
