"""The rule table: every optimizer name of docs/SPEC.md §4 as data.

One table drives the NumPy reference, both backends and the tests: names,
hyperparameters with defaults and valid ranges, which rules need GSNR
statistics, and which state slots each rule keeps. Nothing else repeats it.

A base rule is registered once (``register``); its ``vr-`` twin is derived:
the same rule behind the GSNR transform (SPEC §2), with the transform's two
hyperparameters (``GSNR_HYPERS``) and its state slot ``gsnr_avg`` added.
docs/CONTRIBUTING.md lists the edits that add a rule.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
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
        # numbers.Real: NumPy scalars too (np.float32(0.01) is a valid lr, as in torch.optim).
        if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x):
            return False
        if x < self.low or (self.low_open and x == self.low):
            return False
        # inf is never a valid value, also where the range is written "[0, inf)".
        if x > self.high or ((self.high_open or self.high == INF) and x == self.high):
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
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
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


# α = 0 makes φ_t = exp(−ψ) unbounded early and 1/0 once exp(ψ) underflows.
ALPHA = _h("alpha", 1.0, 0.0, INF, low_open=True, doc="TVLARS scaling factor α")
DECAY_COEFFICIENT = _h("decay_coefficient", 1e-4, 0.0, INF, doc="TVLARS λ_d (per step)")
# The TVLARS paper delays 10 epochs; SPEC gives d_e in steps without a default.
# 1000 steps is our choice; hvd_lb.schedules.tvlars_delay_steps converts epochs.
DELAY_STEPS = _h("delay_steps", 1000, 0, INF, kind="int", doc="TVLARS d_e in steps")
MIN_RATIO = _h("min_ratio", 0.0, 0.0, INF, doc="TVLARS γ_min")


@dataclass(frozen=True)
class Rule:
    """A named optimizer: its base rule (SPEC §3), GSNR need, hypers and state slots.

    ``class_name`` is the backends' class name (``VR`` prefixed for GSNR rules).
    """

    name: str
    base: str
    gsnr: bool
    hypers: Tuple[Hyper, ...]
    slots: Tuple[str, ...]
    doc: str = ""
    class_name: str = ""

    @property
    def defaults(self) -> Dict[str, Any]:
        return {h.name: h.default for h in self.hypers}


RULES: Dict[str, Rule] = {}
NAMES: Tuple[str, ...] = ()
BASE_NAMES: Tuple[str, ...] = ()
# The GSNR transform's own hyperparameters and state (SPEC §2).
GSNR_SLOT = "gsnr_avg"


def GSNR_HYPERS(gsnr_momentum: float = 0.0) -> Tuple[Hyper, ...]:
    return (GAMMA, GSNR_MOMENTUM(gsnr_momentum))


def register(name: str, hypers: Tuple[Hyper, ...], slots: Tuple[str, ...], doc: str,
             class_name: str, gsnr_momentum: float = 0.0) -> Rule:
    """Add base rule ``name`` and its ``vr-`` twin to the table; return the base rule.

    ``gsnr_momentum`` is the default β₃ of the ``vr-`` twin (SPEC §2: 0.9 where the
    VRGD paper uses GSNR momentum, 0 elsewhere).
    """
    global NAMES, BASE_NAMES
    if name in RULES or not name or name.startswith("vr-"):
        raise ValueError(f"invalid rule name {name!r}: must be new and must not start with 'vr-'")
    RULES[name] = Rule(name, name, False, tuple(hypers), tuple(slots), doc, class_name)
    RULES["vr-" + name] = Rule(
        "vr-" + name, name, True, tuple(hypers) + GSNR_HYPERS(gsnr_momentum),
        tuple(slots) + (GSNR_SLOT,),
        f"VR-{name}: {doc}, on the GSNR-scaled gradient ĝ = p̂ ⊙ ḡ (VRGD, Yu et al.)",
        "VR" + class_name)
    BASE_NAMES = BASE_NAMES + (name,)
    NAMES = BASE_NAMES + tuple("vr-" + b for b in BASE_NAMES)
    return RULES[name]


register("sgd", (LR(0.01), WEIGHT_DECAY), (), "w ← w − lr·(g + λw)", "SGD")
register("momentum", (LR(0.01), MOMENTUM, NESTEROV, WEIGHT_DECAY), ("momentum_buffer",),
         "b ← μb + (g + λw), w ← w − lr·b (PyTorch convention)", "Momentum")
register("adam", (LR(1e-3), BETAS, EPS(1e-8), WEIGHT_DECAY), ("exp_avg", "exp_avg_sq"),
         "Adam with decoupled weight decay (Kingma & Ba 2015; Loshchilov & Hutter 2019)", "Adam",
         gsnr_momentum=0.9)
register("lars", (LR(1.0), MOMENTUM, NESTEROV, TRUST_COEFFICIENT, EPS(1e-9), WEIGHT_DECAY, TRUST_CLIP),
         ("momentum_buffer",), "LARS (You et al. 2017): b ← μb + lr·trust·(g + λw), w ← w − b", "LARS")
register("lamb", (LR(1e-3), BETAS, EPS(1e-6), WEIGHT_DECAY, MAX_TRUST), ("exp_avg", "exp_avg_sq"),
         "LAMB (You et al. 2020): w ← w − lr·(‖w‖/‖u‖)·u, u = m̂/(√v̂+ε) + λw", "LAMB",
         gsnr_momentum=0.9)
register("sngm", (LR(0.1), MOMENTUM, WEIGHT_DECAY), ("momentum_buffer",),
         "SNGM (Zhao et al. 2020): u ← βu + d/‖d‖_global, w ← w − lr·u", "SNGM")
register("tvlars", (LR(1.0), MOMENTUM, TRUST_COEFFICIENT, EPS(1e-9), WEIGHT_DECAY,
                    ALPHA, DECAY_COEFFICIENT, DELAY_STEPS, MIN_RATIO), ("prev_iterate",),
         "TVLARS (Do et al. 2023): LARS with φ_t = 1/(α + exp(λ_d(t − d_e))) + γ_min", "TVLARS")


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


def validate(name: str, hparams: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
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
        else:
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


def check_bool(name: str, value, allow_none: bool = False):
    """A flag (``fused``, ``foreach``, ``adapt``, ...): exactly True or False (or None where allowed)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        allowed = "True, False or None" if allow_none else "True or False"
        raise ValueError(f"invalid {name}={value!r}: must be {allowed}")
    return value


def check_micro_batches(micro_batches) -> int:
    """``micro_batches`` (backward passes per step) must be an integer ≥ 1."""
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"invalid micro_batches={micro_batches!r}: must be an integer in [1, inf)")
    return micro_batches


def check_gsnr(gamma, momentum) -> Tuple[float, float]:
    """The GSNR transform's γ ∈ (0, 1] and β₃ ∈ [0, 1) (SPEC §2), as floats."""
    return GAMMA.check(gamma), GSNR_MOMENTUM(0.0).check(momentum)


# Horovod's reduction ops (the same integers in horovod.torch and horovod.tensorflow).
HOROVOD_OPS = {0: "hvd.Average", 1: "hvd.Sum", 2: "hvd.Adasum", 3: "hvd.Min", 4: "hvd.Max", 5: "hvd.Product"}


def check_gsnr_op(op, what: str) -> None:
    """ḡ and s are means over samples (SPEC §1): the GSNR transform needs ``op=hvd.Average``."""
    if op != 0:
        raise ValueError(f"invalid op={HOROVOD_OPS.get(op, repr(op))} for {what} with the GSNR transform: "
                         "ḡ and s are means over gradient samples, so op must be hvd.Average (the default)")


# skip_nonfinite (both backends): one warning per this many skipped steps.
SKIP_WARN_EVERY = 100

SQUARE_DTYPES = (None, "float32", "float64", "bfloat16", "float16")


def check_square_dtype(square_dtype) -> Optional[str]:
    """``square_dtype``, the same on both backends: None, "float32", "float64", "bfloat16" or
    "float16" (scaled per tensor, reduced as float16: ``hvd_lb.squares16``, SPEC §1).

    Accepts the strings or a framework dtype (``torch.bfloat16``, ``tf.bfloat16``) and
    returns the string. None = float32, or float64 for float64 parameters (SPEC §1).
    """
    name = square_dtype if square_dtype is None or isinstance(square_dtype, str) else \
        str(getattr(square_dtype, "name", square_dtype)).replace("torch.", "")
    if name not in SQUARE_DTYPES:
        raise ValueError(f"invalid square_dtype={square_dtype!r}: must be None, 'float32', 'float64', "
                         "'bfloat16' or 'float16' (or the framework's dtype object)")
    return name


def square_wire_dtype(square_dtype: Optional[str], workers: int) -> Optional[str]:
    """The dtype s really travels in: bfloat16 only where it is fewer bytes than float32.

    Horovod 0.28 has no bfloat16 all-reduce on CPU, so bf16 s goes as an all-gather of
    2-byte values. Bytes received per worker per element of s, W workers:
    all-gather bf16 2(W − 1); ring all-reduce float32 8(W − 1)/W. bf16 is fewer only
    for W ≤ 3 (half at W = 2, equal at W = 4, W/4 times more beyond); elsewhere s is
    sent as float32 with one warning.
    """
    if square_dtype != "bfloat16" or workers <= 3:
        return square_dtype
    warnings.warn(f"hvd_lb: square_dtype='bfloat16' would send {workers / 4:g}× "
                  f"the bytes of a float32 all-reduce at {workers} workers (bf16 goes as an all-gather); "
                  "sending s as float32", stacklevel=3)
    return "float32"


def agreement_settings(gsnr: bool, optimizer, micro_batches: int, square_dtype, skip_nonfinite: bool, op,
                       predivide: float, gsnr_interval: int = 1, gsnr_compiled=None, **backend) -> Dict[str, Any]:
    """What every rank's DistributedOptimizer must agree on (JSON values), both backends;
    ``gsnr_compiled``: whether the GSNR maths runs compiled (per param group on torch), as
    resolved on this rank: the compiled and plain paths differ by float32 rounding, so ranks
    on different paths would drift apart silently. ``backend``: what only one backend has
    (its tensors, Keras's averaging flag)."""
    rule = getattr(optimizer, "rule_name", "") or type(optimizer).__module__
    return {"GSNR": gsnr, "optimizer": f"{type(optimizer).__name__} ({rule})", "micro_batches": micro_batches,
            "square_dtype": square_dtype, "skip_nonfinite": skip_nonfinite, "op": HOROVOD_OPS.get(op, str(op)),
            "gradient_predivide_factor": float(predivide), "gsnr_interval": gsnr_interval,
            "GSNR maths compiled": gsnr_compiled, **backend}


def disagreement(every, ranks, what: str) -> Optional[str]:
    """The error for settings that differ between ranks (None if they agree), the same text on
    every rank: ``every`` holds each rank's settings dict (JSON values), in rank order.

    Both backends gather their DistributedOptimizer's settings once before reducing anything:
    ranks that disagree about what is reduced would otherwise enqueue different collectives.
    """
    differ = []
    for key in sorted(set().union(*every)):  # the same order on every rank
        values = [r.get(key) for r in every]
        if all(v == values[0] for v in values):
            continue
        if key.startswith(("tensors", "variables")):
            lengths = [len(v or ()) for v in values]
            i = next((i for i in range(min(lengths)) if any(v[i] != values[0][i] for v in values)), min(lengths))
            shown = [v[i] if i < n else f"(only {n})" for v, n in zip(values, lengths)]
            detail = f"#{i}: " + "; ".join(f"rank {r}: {x}" for r, x in zip(ranks, shown))
        else:
            detail = "; ".join(f"rank {r}: {v}" for r, v in zip(ranks, values))
        differ.append(f"{key} ({detail})")
    if not differ:
        return None
    return (f"hvd_lb: the ranks disagree about the {what}'s {', '.join(differ)}: every rank must build the "
            "same optimizer over the same parameters (same names, shapes, dtypes, frozen parameters)")


# The VRGD paper's experiments use k ≥ 8 samples; below, r is dominated by a few elements.
SMALL_K = 8
# The k < SMALL_K values check_samples has warned about in this process (tests clear it).
_WARNED_K = set()


def small_k_note(workers: int, micro_batches: int) -> Optional[str]:
    """The k < 8 warning's text, or None for k ≥ 8 (SPEC §2 note: mean r ≈ 0.10 at k = 2,
    ≈ 0.39 at k = 4, ≈ 0.49 at k = 8)."""
    k = workers * micro_batches
    if k >= SMALL_K:
        return None
    return (f"hvd_lb: GSNR from k = {workers} × {micro_batches} = {k} gradient samples is weak "
            f"(the VRGD paper uses k ≥ {SMALL_K}; at k = 2 about 99 % of elements are clipped to γ "
            "and the mean step is ~γ times the base rule's): raise k with micro_batches "
            f"(DistributedOptimizer(..., micro_batches={-(-SMALL_K // workers)}), splitting each "
            "worker's batch) or more workers")


HOROVOD_WORKERS = "Horovod workers (horovodrun -np 2 or more)"


def check_samples(workers: int, micro_batches: int, more_workers: str = HOROVOD_WORKERS) -> int:
    """k = workers × micro_batches for a VR rule; raise if there is no variance (k < 2).
    ``more_workers``: how to get more of them on this engine, for the message.

    k < 8 warns once per process and k (``small_k_note``), however many optimizers, steps
    and call sites check it.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"invalid workers={workers!r}: must be an integer in [1, inf)")
    check_micro_batches(micro_batches)
    k = workers * micro_batches
    if k < 2:
        raise ValueError(
            f"VR optimizers need k = workers × micro_batches ≥ 2 gradient samples to estimate "
            f"the gradient variance, got k = {workers} × {micro_batches} = {k}: run with more "
            f"{more_workers} or pass micro_batches=2 or more"
        )
    if k < SMALL_K and k not in _WARNED_K:
        _WARNED_K.add(k)
        warnings.warn(small_k_note(workers, micro_batches), stacklevel=2)
    return k


__all__ = [
    "Hyper", "Rule", "RULES", "NAMES", "BASE_NAMES", "GSNR_HYPERS", "GSNR_SLOT", "register", "get_rule",
    "validate", "check_gsnr", "check_gsnr_op", "HOROVOD_OPS", "check_square_dtype", "square_wire_dtype", "SQUARE_DTYPES",
    "to_keras", "from_keras", "check_samples", "small_k_note", "check_micro_batches", "KERAS_NAMES",
    "agreement_settings", "disagreement",
]
