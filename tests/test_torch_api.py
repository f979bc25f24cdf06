"""Public API of hvd_lb.torch: classes, create(), validation, schedulers, VR without statistics."""
import math

import numpy as np
import pytest
import torch

import hvd_lb.torch as lbt
from hvd_lb import rules, schedules


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.norm = torch.nn.LayerNorm(3)
        self.head = torch.nn.Linear(3, 2, bias=False)


def test_every_name_has_its_class():
    assert set(lbt.OPTIMIZERS) == set(rules.NAMES)
    assert lbt.OPTIMIZERS["vr-lamb"] is lbt.VRLAMB and lbt.OPTIMIZERS["tvlars"] is lbt.TVLARS
    for name, cls in lbt.OPTIMIZERS.items():
        assert cls.rule_name == name and issubclass(cls, torch.optim.Optimizer)


@pytest.mark.parametrize("name", rules.NAMES)
def test_create_groups_carry_every_hyperparameter(name):
    opt = lbt.create(name, Net())
    assert len(opt.param_groups) == 2
    inc, exc = opt.param_groups
    assert [p.ndim for p in inc["params"]] == [2, 2]
    assert (inc["adapt"], inc["decay"], exc["adapt"], exc["decay"]) == (True, True, False, False)
    for h in rules.get_rule(name).hypers:
        assert inc[h.name] == exc[h.name] == h.default


def test_create_name_patterns_and_names():
    opt = lbt.create("lamb", Net(), lr=0.01, exclude=["head.*"], include=["norm.weight"], weight_decay=0.1)
    names = {opt.param_name(p): g["adapt"] for g in opt.param_groups for p in g["params"]}
    assert names == {"fc.weight": True, "norm.weight": True, "fc.bias": False, "norm.bias": False,
                     "head.weight": False}
    assert all(g["lr"] == 0.01 and g["weight_decay"] == 0.1 for g in opt.param_groups)


def test_create_accepts_param_group_dicts():
    net = Net()
    opt = lbt.create("lars", [{"params": net.fc.parameters(), "lr": 0.5},
                              {"params": net.head.parameters(), "adapt": True, "decay": False}])
    assert [(g["lr"], g["adapt"], g["decay"], len(g["params"])) for g in opt.param_groups] == [
        (0.5, True, True, 1), (0.5, False, False, 1), (1.0, True, False, 1)]


@pytest.mark.parametrize("kwargs,needle", [
    ({"lr": -1.0}, "invalid lr=-1.0"),
    ({"momentum": 1.0}, "invalid momentum=1.0"),
    ({"gamma": 0.0}, "invalid gamma=0.0"),
    ({"betas": (0.9, 1.5)}, "invalid betas"),
    ({"bogus": 1}, "unknown hyperparameter(s) bogus"),
    ({"foreach": 1}, "invalid foreach=1"),
])
def test_invalid_arguments_name_argument_value_range(kwargs, needle):
    name = "vr-lamb" if "betas" in kwargs or "gamma" in kwargs else "vr-momentum"
    with pytest.raises(ValueError) as e:
        lbt.create(name, [torch.zeros(2, 2, requires_grad=True)], **kwargs)
    assert needle in str(e.value)


def test_invalid_group_value_and_inputs():
    with pytest.raises(ValueError, match=r"invalid weight_decay=-0.1 .* must be \[0, inf\)"):
        lbt.LAMB([{"params": [torch.zeros(2, requires_grad=True)], "weight_decay": -0.1}])
    with pytest.raises(ValueError, match="invalid adapt"):
        lbt.LARS([torch.zeros(2, requires_grad=True)], adapt="yes")
    with pytest.raises(ValueError, match="unknown optimizer"):
        lbt.create("nadam", Net())
    with pytest.raises(ValueError, match="invalid model_or_params"):
        lbt.create("sgd", [])
    with pytest.raises(ValueError, match="invalid exclude"):
        lbt.create("sgd", Net(), exclude=[3])


@pytest.mark.parametrize("foreach", [False, True])
def test_vr_without_statistics_says_to_wrap(foreach):
    w = torch.ones(3, 2, requires_grad=True)
    opt = lbt.create("vr-sgd", [w], foreach=foreach)
    w.grad = torch.ones_like(w)
    with pytest.raises(RuntimeError, match="hvd_lb.torch.DistributedOptimizer"):
        opt.step()
    opt.set_grad_sq([torch.full_like(w, 2.0)])
    opt.step()
    with pytest.raises(RuntimeError, match="set_grad_sq"):  # consumed by the step
        opt.step()
    with pytest.raises(ValueError, match="invalid sq"):
        opt.set_grad_sq([torch.ones(2)])


def test_non_vr_ignores_missing_statistics_and_skips_gradless_params():
    a, b = torch.ones(2, 2, requires_grad=True), torch.ones(2, requires_grad=True)
    opt = lbt.create("sgd", [a, b], lr=0.5)
    a.grad = torch.ones_like(a)
    opt.step()
    assert torch.equal(a, torch.full((2, 2), 0.5)) and torch.equal(b, torch.ones(2))
    assert opt.state[b]["step"] == 0 and opt.state[a]["step"] == 1


@pytest.mark.parametrize("decay", ["cosine", "polynomial", "constant"])
def test_warmup_decay_lr_matches_core(decay):
    w = torch.zeros(2, requires_grad=True)
    opt = lbt.create("lamb", [w], lr=0.1)
    sched = lbt.WarmupDecayLR(opt, warmup_steps=3, total_steps=10, final_lr=0.01, decay=decay, power=2.0)
    for step in range(12):
        expect = schedules.warmup_decay(step, 0.1, 3, 10, 0.01, decay, 2.0)
        assert math.isclose(opt.param_groups[0]["lr"], expect, rel_tol=1e-12), step
        w.grad = torch.ones_like(w)
        opt.step()
        sched.step()
    with pytest.raises(ValueError, match="invalid warmup_steps=11"):
        lbt.WarmupDecayLR(opt, warmup_steps=11, total_steps=10)
    assert lbt.scaled_lr(0.1, 1024, 256) == pytest.approx(0.4)
    assert lbt.scaled_lr(0.1, 1024, 256, rule="sqrt") == pytest.approx(0.2)


def test_distributed_optimizer_argument_checks():
    hvd = pytest.importorskip("horovod.torch")
    w = torch.zeros(2, 2, requires_grad=True)
    # Any torch optimizer is accepted (plain ones go to Horovod's wrapper); other objects are not.
    with pytest.raises(ValueError, match="invalid optimizer="):
        lbt.DistributedOptimizer(object())
    with pytest.raises(ValueError, match="invalid micro_batches=0"):
        lbt.DistributedOptimizer(lbt.create("vr-sgd", [w]), micro_batches=0)
    with pytest.raises(ValueError, match="invalid micro_batches=0"):
        lbt.DistributedOptimizer(lbt.create("vr-sgd", [w]), backward_passes_per_step=0)
    with pytest.raises(ValueError, match="same argument"):
        lbt.DistributedOptimizer(lbt.create("vr-sgd", [w]), backward_passes_per_step=2, micro_batches=4)
    with pytest.raises(ValueError, match="invalid gradient_predivide_factor=0"):
        lbt.DistributedOptimizer(torch.optim.SGD([w], lr=0.1), gradient_predivide_factor=0)
    with pytest.raises(ValueError, match="invalid square_dtype="):
        lbt.DistributedOptimizer(lbt.create("vr-sgd", [w]), square_dtype="int8")
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match=f"invalid gsnr_interval={bad!r}"):
            lbt.DistributedOptimizer(lbt.create("vr-sgd", [w]), gsnr_interval=bad)


@pytest.mark.parametrize("lr", [float("nan"), -0.1, float("inf")])
def test_bad_lr_set_after_construction_is_caught_at_step(lr):
    w = torch.ones(2, requires_grad=True)
    opt = lbt.create("momentum", [w])
    opt.param_groups[0]["lr"] = lr
    w.grad = torch.ones_like(w)
    with pytest.raises(ValueError, match=r"invalid lr=.*\[0, inf\)"):
        opt.step()


@pytest.mark.parametrize("lr,needle", [
    (torch.tensor(-0.1), r"invalid lr=-0.1\d* for optimizer 'lamb': must be \[0, inf\)"),
    (torch.tensor(float("nan")), r"invalid lr=nan for optimizer 'lamb': must be \[0, inf\)"),
    (torch.tensor([0.1, 0.2]), r"invalid lr=tensor\(\[0.1000, 0.2000\]\) .* one real floating-point element"),
    (np.float32(-1.0), r"invalid lr=np.float32\(-1.0\) .* must be \[0, inf\)"),
])
def test_tensor_and_numpy_lr_are_checked(lr, needle):
    """Accepted as torch.optim accepts them (a 1-element tensor is kept as given), refused out of range."""
    with pytest.raises(ValueError, match=needle):
        lbt.create("lamb", [torch.zeros(2, 2, requires_grad=True)], lr=lr)
    ok = torch.tensor(0.01)
    assert lbt.create("lamb", [torch.zeros(2, 2, requires_grad=True)], lr=ok).param_groups[0]["lr"] is ok
