"""hvd_lb without Horovod: hvd_lb.torch.ddp under torchrun, and Horovod from mpi4py under mpirun (SPEC §1)."""
import contextlib
import importlib.util

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import hvd_lb.torch as lbt
from hvd_lb import reference, rules
from hvd_lb.torch import ddp as lb_ddp
from tests.hvdrun import ROOT, read_rank_json, run_mpirun, run_torchrun
from tests.test_torch_distributed import (_ref, _same_on_ranks, _samples, assert_params, check_parity,
                                          reference_run, worker)

DDP_WORKER = ROOT / "tests" / "scripts" / "torch_ddp_worker.py"
_spec = importlib.util.spec_from_file_location("torch_ddp_worker", DDP_WORKER)
ddp_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ddp_worker)


@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory):
    """One torchrun --nproc_per_node 2 launch (Gloo, CPU) runs every DDP case."""
    out = tmp_path_factory.mktemp("ddp")
    run_torchrun([DDP_WORKER, out, *rules.NAMES], np=2, timeout=400)
    ranks = read_rank_json(out, 2)
    assert all(r["size"] == 2 for r in ranks)
    return ranks


@pytest.fixture(scope="module")
def mpi4py_ranks(tmp_path_factory):
    """One mpirun -np 2 launch: Horovod initialised from mpi4py's COMM_WORLD and a sub-communicator."""
    pytest.importorskip("mpi4py", reason="mpi4py not installed (run scripts/install.sh)")
    out = tmp_path_factory.mktemp("mpi4py")
    run_mpirun([DDP_WORKER, "--mpi4py", out, *rules.NAMES], np=2, timeout=400)
    ranks = read_rank_json(out, 2)
    assert all(r["size"] == 2 for r in ranks)
    return ranks


# --- torchrun / DDP ---------------------------------------------------------------------

@pytest.mark.multiprocess
def test_ddp_equals_reference_every_rule(ddp_ranks):
    """Every name, micro_batches 1 and 2 (no_sync), identical on both ranks, = reference on k = 2·M samples."""
    check_parity(ddp_ranks, rules.NAMES, 2)


@pytest.mark.multiprocess
def test_ddp_buckets_and_rebuild(ddp_ranks):
    """M = 2 runs with a tiny bucket cap: DDP starts with one bucket (its first-bucket cap) and
    rebuilds to one bucket per parameter after step 1; the parity above holds across it."""
    for name in rules.NAMES:
        if name.startswith("vr-"):
            assert _same_on_ranks(ddp_ranks, f"buckets/{name}/M1") == [[0]] * worker.STEPS
            assert _same_on_ranks(ddp_ranks, f"buckets/{name}/M2") == [[0]] + [[0, 1]] * (worker.STEPS - 1)


@pytest.mark.multiprocess
@pytest.mark.parametrize("M", [1, 2])
def test_ddp_gsnr_adamw_equals_reference(ddp_ranks, M):
    ref = reference.ReferenceOptimizer("vr-adam", worker.init_params(), lr=0.05, weight_decay=0.01,
                                       gamma=0.3, gsnr_momentum=0.9)
    for step in range(1, worker.STEPS + 1):
        ref.step_samples(_samples(step, 2, M))
    assert_params(_same_on_ranks(ddp_ranks, f"gsnr/adamw/M{M}"), ref.params, 1e-10, f"adamw M{M}")


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["vr-sgd", "momentum"])
def test_ddp_grad_scaler(ddp_ranks, name):
    """GradScaler: s is reduced from scaled gradients; the step sees the unscaled statistics."""
    assert_params(_same_on_ranks(ddp_ranks, f"scaler/{name}"), reference_run(name).params, 1e-10, name)


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["vr-momentum", "lamb"])
def test_ddp_gradient_clipping(ddp_ranks, name):
    """clip_grad_norm_ scales ḡ by c; every sample is scaled by c, so s by c²."""
    assert_params(_same_on_ranks(ddp_ranks, f"clip/{name}"), reference_run(name, clip=0.5).params, 1e-10, name)


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["vr-adam", "vr-tvlars"])
def test_ddp_checkpoint_resume_equals_uninterrupted(ddp_ranks, name):
    assert _same_on_ranks(ddp_ranks, f"ckpt/{name}") is True


@pytest.mark.multiprocess
def test_ddp_no_sync_pass_with_micro_batches_1_raises(ddp_ranks):
    """micro_batches=1 and a no_sync() pass: two samples where k counts one."""
    for r in ddp_ranks:
        assert "more than micro_batches=1 backward passes" in r["m1_twice_error"]


@pytest.mark.multiprocess
def test_ddp_k_counts_the_process_group(ddp_ranks):
    for r in ddp_ranks:
        assert "k = 1 × 1 = 1" in r["k1_error"]
        assert "torchrun --nproc_per_node 2" in r["k1_error"] and "micro_batches=2" in r["k1_error"]


# --- mpirun + mpi4py ----------------------------------------------------------------------

@pytest.mark.multiprocess
def test_mpi4py_comm_equals_reference_every_rule(mpi4py_ranks):
    """hvd.init(comm=MPI.COMM_WORLD) under plain mpirun: the Horovod path's numbers."""
    check_parity(mpi4py_ranks, rules.NAMES, 2)


@pytest.mark.multiprocess
def test_mpi4py_sub_communicator_as_process_set(mpi4py_ranks):
    """COMM_WORLD.Split(color=rank) as a process set: k = 1 × M over it; each rank alone = reference (W = 1)."""
    for rank, r in enumerate(mpi4py_ranks):
        assert r["alone_size"] == 1
        assert "k = 1 × 1 = 1" in r["k1_error"]
        ref = _ref("vr-sgd", **worker.hp_for("vr-sgd"))
        for step in range(1, worker.STEPS + 1):
            ref.step_samples(reference.micro_batch_samples(
                [[worker.micro_grads(step, rank, m, 2) for m in range(2)]]))
        assert_params(r["alone/vr-sgd/M2"], ref.params, 1e-10, f"rank {rank} alone")


# --- one process (world size 1), in this process ---------------------------------------------

@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    store = tmp_path_factory.mktemp("store") / "pg"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _steps(model, opt, M, steps=worker.STEPS, sync_every=False):
    for step in range(1, steps + 1):
        for m in range(M):
            grads = [torch.tensor(g) for g in worker.micro_grads(step, 0, m, M)]
            no_sync = m < M - 1 and not sync_every
            with model.no_sync() if no_sync else contextlib.nullcontext():
                model(grads).backward()
        opt.step()
        opt.zero_grad()


def test_register_rejects_bad_arguments(one_process):
    model = DDP(ddp_worker.Toy())
    opt = lbt.create("vr-sgd", model.module)
    with pytest.raises(ValueError, match=r"invalid model=Toy: must be a torch.nn.parallel.DistributedDataParallel"):
        lb_ddp.register(model.module, opt, micro_batches=2)
    with pytest.raises(ValueError, match=r"invalid optimizer=None"):
        lb_ddp.register(model, None, micro_batches=2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=rf"invalid micro_batches={bad!r}: must be an integer in \[1, inf\)"):
            lb_ddp.register(model, opt, micro_batches=bad)
    other = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="1 of its parameter"):
        lb_ddp.register(model, lbt.create("vr-sgd", [*model.parameters(), other]), micro_batches=2)
    lb_ddp.register(model, opt, micro_batches=2)
    with pytest.raises(ValueError, match="already called"):
        lb_ddp.register(model, opt, micro_batches=2)


def test_k_below_two_refuses_with_the_way_out(one_process):
    model = DDP(ddp_worker.Toy())
    with pytest.raises(ValueError) as e:
        lb_ddp.register(model, lbt.create("vr-lamb", model.module), micro_batches=1)
    msg = str(e.value)
    assert "k = 1 × 1 = 1" in msg and "--nproc_per_node 2" in msg and "micro_batches=2" in msg
    # Rules without GSNR need no variance.
    assert lb_ddp.register(model, lbt.create("lamb", model.module)).k == 1


@pytest.mark.parametrize("name,M", [("vr-lamb", 2), ("vr-momentum", 3)])
def test_one_process_micro_batches_equal_reference(one_process, name, M):
    model = DDP(ddp_worker.Toy())
    opt = lbt.create(name, model.module, **worker.hp_for(name))
    assert lb_ddp.register(model, opt, micro_batches=M).k == M
    _steps(model, opt, M)
    ref = _ref(name, **worker.hp_for(name))
    for step in range(1, worker.STEPS + 1):
        ref.step_samples(_samples(step, 1, M))
    assert_params([ddp_worker._dump(p) for p in model.parameters()], ref.params, 1e-10, name)


def test_micro_batches_without_no_sync_raise(one_process):
    model = DDP(ddp_worker.Toy())
    opt = lbt.create("vr-sgd", model.module)
    lb_ddp.register(model, opt, micro_batches=2)
    with pytest.raises(RuntimeError, match=r"DDP synchronised after 1 backward pass\(es\), expected micro_batches=2"):
        _steps(model, opt, 2, steps=1, sync_every=True)


@pytest.mark.parametrize("M", [2, 3])
def test_too_many_backward_passes_raise(one_process, M):
    """M + 1 passes (M under no_sync) would be one sample more than k counts."""
    model = DDP(ddp_worker.Toy())
    opt = lbt.create("vr-sgd", model.module)
    lb_ddp.register(model, opt, micro_batches=M)
    with pytest.raises(RuntimeError, match=f"more than micro_batches={M} backward passes"):
        _steps(model, opt, M + 1, steps=1)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["vr-sgd", "vr-lamb", "lamb"])
def test_16_bit_parameters_match_the_reference(one_process, name, dtype, tol):
    """16-bit gradients (two all-reduces when s is float32), rule state in float32: 3 steps match
    the reference on the rounded samples within a few units of the dtype's rounding."""
    model = DDP(ddp_worker.Toy().to(dtype))
    opt = lbt.create(name, model.module, lr=0.1)
    lb_ddp.register(model, opt, micro_batches=2)
    w0 = [p.detach().double().numpy().copy() for p in model.parameters()]
    ref = reference.ReferenceOptimizer(name, w0, lr=0.1, adapt=[True, False], decay=[True, False])
    for step in range(1, 4):
        grads = [[torch.tensor(g).to(dtype) for g in worker.micro_grads(step, 0, m, 2)] for m in range(2)]
        for m, g in enumerate(grads):
            with model.no_sync() if m == 0 else contextlib.nullcontext():
                model(g).backward()
        opt.step()
        opt.zero_grad()
        ref.step_samples(reference.micro_batch_samples([[[t.double().numpy() for t in g] for g in grads]]))
    assert all(p.dtype == dtype for p in model.parameters())
    assert_params([ddp_worker._dump(p) for p in model.parameters()], ref.params, tol, str(dtype))
