"""Checks of ``hvd-lb`` options, run before any process starts.

Each takes the option's name and its value as typed and raises one ``ValueError``
``invalid <option> <value>: <allowed range or reason>`` (``cli.main`` prints it as
the single ``hvd-lb: error: …`` line).
"""
from __future__ import annotations

import math
import os
import tempfile
from typing import Optional


def _range(low, high, low_open: bool = False) -> str:
    text = lambda v: str(v) if isinstance(v, int) else f"{v:g}"  # noqa: E731
    return f"{'(' if low_open else '['}{text(low)}, {'inf)' if high is None else text(high) + ']'}"


def integer(option: str, value, low: int = 1, high: Optional[int] = None) -> int:
    """``value`` (a string or an int) as an int in [low, high]."""
    try:
        v = value if isinstance(value, int) and not isinstance(value, bool) else int(str(value).strip())
    except ValueError:
        v = None
    if v is None or v < low or (high is not None and v > high):
        raise ValueError(f"invalid {option} {value}: must be an integer in {_range(low, high)}")
    return v


def number(option: str, value, low: float = 0.0, low_open: bool = False) -> float:
    """``value`` (a string or a number) as a finite float ≥ low (> low with ``low_open``)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not (math.isfinite(v) and (v > low if low_open else v >= low)):
        raise ValueError(f"invalid {option} {value}: must be a finite number in {_range(low, None, low_open)}")
    return v


def hosts(option: str, value: Optional[str], np_: int) -> None:
    """``host[:slots],...`` (None: localhost:np_) with at least ``np_`` slots in all."""
    if value is None:
        return
    total = 0
    for entry in value.split(","):
        host, sep, slots = entry.strip().partition(":")
        try:
            n = int(slots) if sep else 1
        except ValueError:
            n = 0
        if not host or n < 1:
            raise ValueError(f"invalid {option} {value}: each entry must be HOST or HOST:SLOTS, "
                             "SLOTS an integer in [1, inf)")
        total += n
    if total < np_:
        raise ValueError(f"invalid {option} {value}: {total} slot(s) for -np {np_}; give at least {np_}")


def writable_dir(option: str, path: str) -> str:
    """Create ``path`` if needed and check that a file can be written in it; its absolute path."""
    full = os.path.abspath(path)
    try:
        os.makedirs(full, exist_ok=True)
        with tempfile.TemporaryFile(dir=full):
            pass
    except OSError as e:
        raise ValueError(f"invalid {option} {path}: cannot write there ({e.strerror or e})") from None
    return full


__all__ = ["integer", "number", "hosts", "writable_dir"]
