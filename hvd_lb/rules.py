"""The rule table: every optimizer name of SPEC §4 as data.

One table drives the NumPy reference, both backends and the tests: names,
hyperparameters with defaults and valid ranges, which rules need GSNR
statistics, and which state slots each rule keeps. Nothing else repeats it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

INF = math.inf


@dataclass(frozen=True)
class Hyper:
    """One hyperparameter: its default and the interval it must lie in.

    ``kind`` is ``"float"``, ``"int"``, ``"bool"``, ``"betas"`` (a pair of floats,
    each in the interval) or ``"optional_float"`` (``None`` = off).
    """

    name: str
    default: Any
    low: float = -INF
    high: float = INF
    low_open: bool = False
    high_open: bool = False
    kind: str = "float"
    doc: str = ""

    def range_text(self) -> str:
        if self.kind == "bool":
            return "True or False"
        lo = "(" if self.low_open else "["
        hi = ")" if self.high_open or self.high == INF else "]"
        text = f"{lo}{self.low:g}, {self.high:g}{hi}"
        if self.kind == "betas":
            return f"a pair, each in {text}"
        if self.kind == "optional_float":
            return f"None or a value in {text}"
        if self.kind == "int":
            return f"an integer in {text}"
        return text

    def _in_range(self, x: float) -> bool:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x):
            return False
        if x < self.low or (self.low_open and x == self.low):
            return False
        if x > self.high or (self.high_open and x == self.high):
            return False
        return True

    def check(self, value: Any, rule: str = "") -> Any:
        """Return the normalised value or raise ValueError naming argument, value, range."""
        where = f" for optimizer '{rule}'" if rule else ""

        def bad():
            return ValueError(
                f"invalid {self.name}={value!r}{where}: must be {self.range_text()}"
            )

        if self.kind == "bool":
            if not isinstance(value, bool):
                raise bad()
            return value
        if self.kind == "betas":
            try:
                pair = tuple(float(v) for v in value)
            except TypeError:
                raise bad() from None
            if len(pair) != 2 or not all(self._in_range(b) for b in pair):
                raise bad()
            return pair
        if self.kind == "optional_float":
            if value is None:
                return None
            if not self._in_range(value):
                raise bad()
            return float(value)
        if self.kind == "int":
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int) or isinstance(value, bool) or not self._in_range(value):
                raise bad()
            return value
        if not self._in_range(value):
            raise bad()
        return float(value)


def _h(name, default, low=-INF, high=INF, low_open=False, high_open=False, kind="float", doc=""):
    return Hyper(name, default, low, high, low_open, high_open, kind, doc)


# Shared hyperparameter definitions (PyTorch spelling, SPEC §4).
def LR(default):
    return _h("lr", default, 0.0, INF, doc="learning rate")


WEIGHT_DECAY = _h("weight_decay", 0.0, 0.0, INF, doc="λ")
MOMENTUM = _h("momentum", 0.9, 0.0, 1.0, high_open=True, doc="μ (β for SNGM)")
NESTEROV = _h("nesterov", False, kind="bool")
BETAS = _h("betas", (0.9, 0.999), 0.0, 1.0, high_open=True, kind="betas", doc="β₁, β₂")


def EPS(default):
    return _h("eps", default, 0.0, INF, doc="ε")


TRUST_COEFFICIENT = _h("trust_coefficient", 0.001, 0.0, INF, low_open=True, doc="η")
TRUST_CLIP = _h("trust_clip", False, kind="bool", doc="LARC clip mode: min(trust, lr)")
MAX_TRUST = _h("max_trust", None, 0.0, INF, low_open=True, kind="optional_float")
GAMMA = _h("gamma", 0.1, 0.0, 1.0, low_open=True, doc="GSNR clip floor γ")


def GSNR_MOMENTUM(default):
    return _h("gsnr_momentum", default, 0.0, 1.0, high_open=True, doc="β₃")


ALPHA = _h("alpha", 1.0, 0.0, INF, doc="TVLARS scaling factor α")
DECAY_COEFFICIENT = _h("decay_coefficient", 1e-4, 0.0, INF, doc="TVLARS λ_d (per step)")
# The TVLARS paper delays 10 epochs; SPEC gives d_e in steps without a default.
# 1000 steps is our choice; hvd_lb.schedules.tvlars_delay_steps converts epochs.
DELAY_STEPS = _h("delay_steps", 1000, 0, INF, kind="int", doc="TVLARS d_e in steps")
MIN_RATIO = _h("min_ratio", 0.0, 0.0, INF, doc="TVLARS γ_min")


@dataclass(frozen=True)
class Rule:
    """A named optimizer: its base rule (SPEC §3), GSNR need, hypers and state slots."""

    name: str
    base: str
    gsnr: bool
    hypers: Tuple[Hyper, ...]
    slots: Tuple[str, ...]
    doc: str = ""
    has_momentum: bool = field(init=False)
    has_betas: bool = field(init=False)
    has_eps: bool = field(init=False)

    def __post_init__(self):
        names = {h.name for h in self.hypers}
        object.__setattr__(self, "has_momentum", "momentum" in names)
        object.__setattr__(self, "has_betas", "betas" in names)
        object.__setattr__(self, "has_eps", "eps" in names)

    @property
    def defaults(self) -> Dict[str, Any]:
        return {h.name: h.default for h in self.hypers}

    def hyper(self, name: str) -> Hyper:
        for h in self.hypers:
            if h.name == name:
                return h
        raise KeyError(name)


# Base rules: hyperparameters and the per-tensor state they keep.
_BASE: Dict[str, Tuple[Tuple[Hyper, ...], Tuple[str, ...], str]] = {
    "sgd": ((LR(0.01), WEIGHT_DECAY), (), "w ← w − lr·(g + λw)"),
    "momentum": (
        (LR(0.01), MOMENTUM, NESTEROV, WEIGHT_DECAY),
        ("momentum_buffer",),
        "b ← μb + (g + λw), w ← w − lr·b (PyTorch convention)",
    ),
    "adam": (
        (LR(1e-3), BETAS, EPS(1e-8), WEIGHT_DECAY),
        ("exp_avg", "exp_avg_sq"),
        "Adam with decoupled weight decay (Kingma & Ba 2015; Loshchilov & Hutter 2019)",
    ),
    "lars": (
        (LR(1.0), MOMENTUM, NESTEROV, TRUST_COEFFICIENT, EPS(1e-9), WEIGHT_DECAY, TRUST_CLIP),
        ("momentum_buffer",),
        "LARS (You et al. 2017): b ← μb + lr·trust·(g + λw), w ← w − b",
    ),
    "lamb": (
        (LR(1e-3), BETAS, EPS(1e-6), WEIGHT_DECAY, MAX_TRUST),
        ("exp_avg", "exp_avg_sq"),
        "LAMB (You et al. 2020): w ← w − lr·(‖w‖/‖u‖)·u, u = m̂/(√v̂+ε) + λw",
    ),
    "sngm": (
        (LR(0.1), MOMENTUM, WEIGHT_DECAY),
        ("momentum_buffer",),
        "SNGM (Zhao et al. 2020): u ← βu + d/‖d‖_global, w ← w − lr·u",
    ),
    "tvlars": (
        (LR(1.0), MOMENTUM, TRUST_COEFFICIENT, EPS(1e-9), WEIGHT_DECAY,
         ALPHA, DECAY_COEFFICIENT, DELAY_STEPS, MIN_RATIO),
        ("prev_iterate",),
        "TVLARS (Do et al. 2023): LARS with φ_t = 1/(α + exp(λ_d(t − d_e))) + γ_min",
    ),
}

BASE_NAMES: Tuple[str, ...] = tuple(_BASE)
# GSNR momentum is on by default only where the VRGD paper uses it (SPEC §2).
_GSNR_MOMENTUM_DEFAULT = {"adam": 0.9, "lamb": 0.9}


def _build() -> Dict[str, Rule]:
    table: Dict[str, Rule] = {}
    for base, (hypers, slots, doc) in _BASE.items():
        table[base] = Rule(base, base, False, hypers, slots, doc)
    for base, (hypers, slots, doc) in _BASE.items():
        vr_hypers = hypers + (GAMMA, GSNR_MOMENTUM(_GSNR_MOMENTUM_DEFAULT.get(base, 0.0)))
        table["vr-" + base] = Rule(
            "vr-" + base, base, True, vr_hypers, slots + ("gsnr_avg",),
            f"VR-{base}: {doc}, on the GSNR-scaled gradient ĝ = p̂ ⊙ ḡ (VRGD, Yu et al.)",
        )
    return table


RULES: Dict[str, Rule] = _build()
NAMES: Tuple[str, ...] = tuple(RULES)

# Keras spells the first four hyperparameters its own way (SPEC §4).
KERAS_NAMES = {"lr": "learning_rate", "eps": "epsilon"}  # betas -> beta_1, beta_2


def get_rule(name: str) -> Rule:
    """Look up a rule by name (case-insensitive, ``_`` accepted for ``-``)."""
    if not isinstance(name, str):
        raise ValueError(f"invalid optimizer name {name!r}: must be one of {', '.join(NAMES)}")
    key = name.strip().lower().replace("_", "-")
    if key not in RULES:
        raise ValueError(f"unknown optimizer {name!r}: valid names are {', '.join(NAMES)}")
    return RULES[key]


def validate(name: str, hparams: Optional[Mapping[str, Any]] = None, *, fill_defaults: bool = True) -> Dict[str, Any]:
    """Check hyperparameters for rule ``name``; return them (with defaults filled in).

    Unknown keys and out-of-range values raise ``ValueError`` naming the
    argument, the value and the allowed range.
    """
    rule = get_rule(name)
    hparams = dict(hparams or {})
    allowed = {h.name for h in rule.hypers}
    unknown = sorted(set(hparams) - allowed)
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {', '.join(unknown)} for optimizer '{rule.name}': "
            f"valid are {', '.join(h.name for h in rule.hypers)}"
        )
    out: Dict[str, Any] = {}
    for h in rule.hypers:
        if h.name in hparams:
            out[h.name] = h.check(hparams[h.name], rule.name)
        elif fill_defaults:
            out[h.name] = h.default
    if out.get("nesterov") and out.get("momentum", 1.0) == 0.0:
        raise ValueError(
            f"invalid nesterov=True with momentum=0 for optimizer '{rule.name}': "
            "Nesterov needs momentum in (0, 1)"
        )
    return out


def to_keras(hparams: Mapping[str, Any]) -> Dict[str, Any]:
    """PyTorch-spelled hyperparameters → Keras spelling (lr, betas, eps)."""
    out = {}
    for k, v in hparams.items():
        if k == "betas":
            out["beta_1"], out["beta_2"] = v
        else:
            out[KERAS_NAMES.get(k, k)] = v
    return out


def from_keras(hparams: Mapping[str, Any]) -> Dict[str, Any]:
    """Keras-spelled hyperparameters → PyTorch spelling."""
    inv = {v: k for k, v in KERAS_NAMES.items()}
    out = {}
    b1, b2 = hparams.get("beta_1"), hparams.get("beta_2")
    for k, v in hparams.items():
        if k in ("beta_1", "beta_2"):
            continue
        out[inv.get(k, k)] = v
    if b1 is not None or b2 is not None:
        d1, d2 = BETAS.default
        out["betas"] = (d1 if b1 is None else b1, d2 if b2 is None else b2)
    return out


def check_micro_batches(micro_batches) -> int:
    """``micro_batches`` (backward passes per step) must be an integer ≥ 1."""
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"invalid micro_batches={micro_batches!r}: must be an integer in [1, inf)")
    return micro_batches


def check_samples(workers: int, micro_batches: int) -> int:
    """k = workers × micro_batches for a VR rule; raise if there is no variance (k < 2)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"invalid workers={workers!r}: must be an integer in [1, inf)")
    check_micro_batches(micro_batches)
    k = workers * micro_batches
    if k < 2:
        raise ValueError(
            f"VR optimizers need k = workers × micro_batches ≥ 2 gradient samples to estimate "
            f"the gradient variance, got k = {workers} × {micro_batches} = {k}: run with more "
            "Horovod workers (horovodrun -np 2 or more) or pass micro_batches=2 or more"
        )
    return k


__all__ = [
    "Hyper", "Rule", "RULES", "NAMES", "BASE_NAMES", "get_rule", "validate",
    "to_keras", "from_keras", "check_samples", "check_micro_batches", "KERAS_NAMES",
]
