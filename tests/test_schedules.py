"""LR scaling and warm-up + decay schedules (SPEC §5), and parameter grouping."""
import math

import pytest

from hvd_lb import grouping, schedules as S


def test_scaled_lr_rules():
    assert S.scaled_lr(0.1, 8192, 256) == pytest.approx(3.2)
    assert S.scaled_lr(0.1, 8192, 256, "sqrt") == pytest.approx(0.1 * math.sqrt(32))
    for bad in [dict(base_lr=-1), dict(batch=0), dict(base_batch=2.5), dict(rule="cube")]:
        kw = dict(base_lr=0.1, batch=512, base_batch=256, rule="linear")
        kw.update(bad)
        arg = next(iter(bad))
        with pytest.raises(ValueError, match=f"invalid {arg}="):
            S.scaled_lr(**kw)


def test_warmup_then_cosine_and_polynomial():
    f = lambda t, **kw: S.warmup_decay(t, 1.0, 4, 14, **kw)
    assert [f(t) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0
    assert f(9) == pytest.approx(0.5)
    assert f(14) == pytest.approx(0.0) and f(100) == pytest.approx(0.0)
    assert f(9, final_lr=0.2) == pytest.approx(0.6)
    assert f(9, decay="polynomial", power=2.0) == pytest.approx(0.25)
    assert f(9, decay="polynomial", power=1.0, final_lr=0.1) == pytest.approx(0.55)
    assert f(9, decay="constant") == 1.0
    assert S.warmup_decay(0, 2.0, 0, 10) == 2.0


def test_schedule_validation():
    S.check_schedule(1.0, 2, 10)
    for kw, arg in [(dict(warmup_steps=11), "warmup_steps"), (dict(total_steps=0), "total_steps"),
                    (dict(final_lr=2.0), "final_lr"), (dict(decay="step"), "decay"),
                    (dict(power=0.0), "power"), (dict(base_lr=-1.0), "base_lr")]:
        args = dict(base_lr=1.0, warmup_steps=2, total_steps=10)
        args.update(kw)
        with pytest.raises(ValueError, match=f"invalid {arg}="):
            S.check_schedule(**args)


def test_tvlars_delay_in_epochs():
    assert S.tvlars_delay_steps(10, 37) == 370
    with pytest.raises(ValueError, match="steps_per_epoch"):
        S.tvlars_delay_steps(10, 0)


def test_grouping_excludes_biases_and_norms_by_rank_and_pattern():
    assert grouping.is_excluded("fc.bias", 1)
    assert grouping.is_excluded("bn.weight", 1)
    assert not grouping.is_excluded("fc.weight", 2)
    assert grouping.is_excluded("embed.weight", 2, exclude=["embed*"])
    assert not grouping.is_excluded("head.bias", 1, include=["head.*"])
    with pytest.raises(ValueError, match="exclude"):
        grouping.is_excluded("x", 2, exclude=[3])
