"""Which tensors get weight decay and trust-ratio adaptation (SPEC §3).

Default, as in timm and the LARS/LAMB papers: tensors with ``ndim ≤ 1``
(biases, norm scales) are excluded from both. ``exclude`` name patterns add
exclusions; ``include`` patterns force a tensor back in (they win).
Patterns are ``fnmatch`` globs matched against the parameter name (PyTorch)
or variable path (Keras).
"""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Sequence


def patterns(arg_name: str, value) -> tuple:
    """Validate ``exclude``/``include``: None, one glob, or an iterable of globs → tuple."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        out = tuple(value)
    except TypeError:
        out = None
    if out is None or not all(isinstance(p, str) for p in out):
        raise ValueError(f"invalid {arg_name}={value!r}: must be a list of fnmatch name patterns (strings)")
    return out


def is_excluded(name: str, ndim: int, exclude: Sequence[str] = (), include: Sequence[str] = ()) -> bool:
    """True when tensor ``name`` of rank ``ndim`` gets neither weight decay nor adaptation."""
    name = name or ""
    if any(fnmatchcase(name, p) for p in patterns("include", include)):
        return False
    if any(fnmatchcase(name, p) for p in patterns("exclude", exclude)):
        return True
    return ndim <= 1
