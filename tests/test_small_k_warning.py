"""The k < 8 warning prints once per process and k on every call path (README: "warns once"):
torch ``DistributedOptimizer`` (factory and each step's first backward), ``ddp.register``
and the Keras ``DistributedOptimizer``, here in one process (k = 1 × micro_batches 2).

Recorded under ``simplefilter("always")``, so Python's own once-per-location filter (which any
``catch_warnings`` or ``filterwarnings`` elsewhere re-arms) cannot hide a repeat.
"""
import os
import warnings

import pytest


def weak(caught):
    return [str(w.message) for w in caught if "is weak" in str(w.message)]


def test_torch_distributed_optimizer_warns_once():
    torch = pytest.importorskip("torch")
    hvd = pytest.importorskip("horovod.torch")
    import hvd_lb.torch as lb

    hvd.init()
    model = torch.nn.Linear(3, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("vr-sgd", "vr-momentum"):
            opt = lb.DistributedOptimizer(lb.create(name, model, lr=0.1), micro_batches=2,
                                          named_parameters=model.named_parameters())
            for _ in range(3):
                for _ in range(2):
                    model(torch.ones(2, 3)).sum().backward()
                opt.step()
                opt.zero_grad()
            del opt
    assert len(weak(caught)) == 1 and "k = 1 × 2 = 2" in weak(caught)[0], weak(caught)


def test_ddp_register_warns_once(tmp_path):
    torch = pytest.importorskip("torch")
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import hvd_lb.torch as lb

    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for name in ("vr-sgd", "vr-lamb"):
                model = DDP(torch.nn.Linear(3, 1))
                lb.ddp.register(model, lb.create(name, model.module, lr=0.1), micro_batches=2)
    finally:
        dist.destroy_process_group()
    assert len(weak(caught)) == 1 and "k = 1 × 2 = 2" in weak(caught)[0], weak(caught)


def test_keras_distributed_optimizer_warns_once():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    hvd = pytest.importorskip("horovod.tensorflow")
    import hvd_lb.tf as H

    hvd.init()
    w = keras.Variable([1.0, 2.0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            opt = H.DistributedOptimizer(H.GSNR(keras.optimizers.SGD(0.1)), micro_batches=2)
            for _ in range(4):
                opt.apply([tf.constant([1.0, -1.0])], [w])
    assert len(weak(caught)) == 1 and "k = 1 × 2 = 2" in weak(caught)[0], weak(caught)
