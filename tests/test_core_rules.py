"""The rule table and argument validation (SPEC §4)."""
import math

import pytest

from hvd_lb import rules

SPEC_NAMES = ["sgd", "momentum", "adam", "lars", "lamb", "sngm", "tvlars"]


def test_table_has_exactly_the_spec_names():
    assert set(rules.NAMES) == set(SPEC_NAMES) | {"vr-" + n for n in SPEC_NAMES}
    for n in rules.NAMES:
        r = rules.RULES[n]
        assert r.gsnr == n.startswith("vr-")
        assert r.base == n.removeprefix("vr-")


@pytest.mark.parametrize("name", rules.NAMES)
def test_capabilities_and_slots(name):
    r = rules.get_rule(name)
    base = r.base
    names = [h.name for h in r.hypers]
    assert ("momentum" in names) == (base in ("momentum", "lars", "sngm", "tvlars"))
    assert ("betas" in names) == (base in ("adam", "lamb"))
    assert ("eps" in names) == (base in ("adam", "lamb", "lars", "tvlars"))
    assert ("gsnr_avg" in r.slots) == r.gsnr
    assert len(names) == len(set(names))
    assert {"lr", "weight_decay"} <= set(names)
    assert (("gamma" in names) and ("gsnr_momentum" in names)) == r.gsnr


def test_spec_defaults():
    d = rules.get_rule("vr-adam").defaults
    assert d["betas"] == (0.9, 0.999) and d["eps"] == 1e-8 and d["weight_decay"] == 0.0
    assert d["gamma"] == 0.1 and d["gsnr_momentum"] == 0.9
    assert rules.get_rule("vr-lamb").defaults["gsnr_momentum"] == 0.9
    for n in ("vr-sgd", "vr-momentum", "vr-lars", "vr-sngm", "vr-tvlars"):
        assert rules.get_rule(n).defaults["gsnr_momentum"] == 0.0
    lars = rules.get_rule("lars").defaults
    assert (lars["trust_coefficient"], lars["momentum"], lars["eps"], lars["trust_clip"]) == (0.001, 0.9, 1e-9, False)
    lamb = rules.get_rule("lamb").defaults
    assert lamb["eps"] == 1e-6 and lamb["max_trust"] is None
    assert rules.get_rule("sngm").defaults["momentum"] == 0.9
    tv = rules.get_rule("tvlars").defaults
    assert (tv["alpha"], tv["decay_coefficient"], tv["min_ratio"], tv["trust_coefficient"], tv["momentum"]) == (
        1.0, 1e-4, 0.0, 0.001, 0.9)
    assert rules.get_rule("momentum").defaults["momentum"] == 0.9


def test_name_lookup_is_forgiving_but_unknown_lists_valid_names():
    assert rules.get_rule("VR_LAMB").name == "vr-lamb"
    with pytest.raises(ValueError) as e:
        rules.get_rule("adamw")
    msg = str(e.value)
    assert "adamw" in msg and all(n in msg for n in rules.NAMES)


@pytest.mark.parametrize("arg,value,needle", [
    ("lr", -0.1, "[0, inf)"),
    ("betas", (0.9, 1.0), "[0, 1)"),
    ("betas", (-0.1, 0.9), "[0, 1)"),
    ("betas", 0.9, "pair"),
    ("gamma", 0.0, "(0, 1]"),
    ("gamma", 1.5, "(0, 1]"),
    ("gsnr_momentum", 1.0, "[0, 1)"),
    ("eps", -1e-8, "[0, inf)"),
    ("weight_decay", -1e-4, "[0, inf)"),
    ("lr", float("nan"), "[0, inf)"),
    ("lr", "0.1", "[0, inf)"),
])
def test_bad_hyperparameters_name_argument_value_and_range(arg, value, needle):
    with pytest.raises(ValueError) as e:
        rules.validate("vr-adam", {arg: value})
    msg = str(e.value)
    assert arg in msg and repr(value) in msg and needle in msg


@pytest.mark.parametrize("name", rules.NAMES)
def test_every_hyper_of_every_rule_rejects_out_of_range(name):
    rule = rules.get_rule(name)
    for h in rule.hypers:
        if h.kind == "bool":
            bad = "yes"
        elif h.kind == "betas":
            bad = (1.0, 0.5)
        elif h.low > -math.inf:
            bad = h.low - 1
        else:  # pragma: no cover - every hyper is bounded below
            continue
        with pytest.raises(ValueError, match=h.name):
            rules.validate(name, {h.name: bad})
        # the default itself is valid
        rules.validate(name, {h.name: h.default})


def test_unknown_hyperparameter_and_bad_combination():
    with pytest.raises(ValueError, match="betas.*'sgd'|'sgd'.*betas"):
        rules.validate("sgd", {"betas": (0.9, 0.99)})
    with pytest.raises(ValueError, match="nesterov"):
        rules.validate("momentum", {"nesterov": True, "momentum": 0.0})


def test_validate_fills_defaults_and_normalises():
    hp = rules.validate("lamb", {"lr": 1, "betas": [0.8, 0.9]})
    assert hp["lr"] == 1.0 and isinstance(hp["lr"], float)
    assert hp["betas"] == (0.8, 0.9)
    assert set(hp) == {h.name for h in rules.get_rule("lamb").hypers}
    assert rules.validate("tvlars", {"delay_steps": 5.0})["delay_steps"] == 5


def test_keras_spelling_round_trip():
    hp = rules.validate("vr-lamb", {})
    k = rules.to_keras(hp)
    assert {"learning_rate", "beta_1", "beta_2", "epsilon", "weight_decay"} <= set(k)
    assert "lr" not in k and "betas" not in k and "eps" not in k
    assert rules.from_keras(k) == hp


def test_k_below_two_is_a_clear_error():
    assert rules.check_samples(2, 1) == 2 and rules.check_samples(1, 2) == 2
    with pytest.raises(ValueError) as e:
        rules.check_samples(1, 1)
    msg = str(e.value)
    assert "k = 1 × 1 = 1" in msg and "micro_batches" in msg and "horovodrun -np" in msg
    with pytest.raises(ValueError, match="micro_batches=0"):
        rules.check_samples(2, 0)


def test_small_k_warns_once_per_process_and_k(recwarn):
    """However many optimizers, steps and call sites check k (README: once)."""
    for _ in range(3):
        for workers, micro in ((2, 1), (1, 2), (2, 2), (4, 2)):
            rules.check_samples(workers, micro)
    weak = [str(w.message) for w in recwarn if "is weak" in str(w.message)]
    assert len(weak) == 2 and "k = 2 × 1 = 2" in weak[0] and "k = 2 × 2 = 4" in weak[1], weak
    assert rules.small_k_note(2, 3).startswith("hvd_lb: GSNR from k = 2 × 3 = 6") and rules.small_k_note(4, 2) is None


@pytest.mark.parametrize("run", [1, 2])
def test_small_k_warning_is_fresh_in_every_test(run):
    """tests/conftest.py clears what was warned, so test order does not matter."""
    with pytest.warns(UserWarning, match="k = 2 × 1 = 2 gradient samples is weak"):
        rules.check_samples(2, 1)
