"""The same seeded gradient sequence through the torch and TF optimizers: equal results (float64)."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
hvd_torch = pytest.importorskip("hvd_lb.torch")

import hvd_lb.tf as H  # noqa: E402
from hvd_lb import rules  # noqa: E402
from hvd_lb.reference import gradient_stats  # noqa: E402
from tests.scripts.tf_common import TEST_HP, init_params, sample_grads  # noqa: E402

STEPS, K, TOL = 20, 3, 1e-10


@pytest.mark.parametrize("name", rules.NAMES)
def test_torch_and_tf_agree(name):
    hp = TEST_HP[name]
    init = init_params()
    shapes = [v.shape for v in init.values()]
    t_params = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in init.values()]
    t_opt = hvd_torch.create(name, t_params, **rules.from_keras(hp))
    k_vars = [keras.Variable(v, dtype="float64", name=n) for n, v in init.items()]
    k_opt = H.create(name, **hp)
    gsnr = rules.get_rule(name).gsnr
    for t in range(STEPS):
        mean, sq = gradient_stats([sample_grads(t, i, shapes) for i in range(K)])
        for p, g in zip(t_params, mean):
            p.grad = torch.tensor(g)
        if gsnr:
            # torch's create puts excluded (1-D) tensors in their own group: param-group order.
            by_id = {id(p): s for p, s in zip(t_params, sq)}
            t_opt.set_grad_sq([torch.tensor(by_id[id(p)]) for g in t_opt.param_groups for p in g["params"]])
            k_opt.set_grad_sq([tf.constant(s) for s in sq])
        t_opt.step()
        k_opt.apply([tf.constant(g) for g in mean], k_vars)
    for p, v in zip(t_params, k_vars):
        want = p.detach().numpy()
        np.testing.assert_allclose(v.numpy(), want, rtol=TOL, atol=TOL * np.abs(want).max(),
                                   err_msg=f"{name} {v.path}")
    for slot, variables in k_opt.slots().items():
        for p, var in zip(t_params, variables):
            want = t_opt.state[p][slot].detach().numpy()
            np.testing.assert_allclose(var.numpy(), want, rtol=TOL, atol=TOL * np.abs(want).max(),
                                       err_msg=f"{name} slot {slot}")


@pytest.mark.parametrize("decay", ["cosine", "polynomial"])
def test_warmup_schedules_agree(decay):
    kw = dict(warmup_steps=4, total_steps=25, final_lr=0.002, decay=decay, power=2.0)
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.3)
    sched = hvd_torch.WarmupDecayLR(opt, **kw)
    torch_lrs = []
    for _ in range(30):
        torch_lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    keras_lrs = H.WarmupDecay(0.3, **kw)(tf.range(30)).numpy()
    np.testing.assert_allclose(keras_lrs, torch_lrs, rtol=1e-15, atol=1e-17)
