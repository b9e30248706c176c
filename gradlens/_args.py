"""Checks of public arguments: one clear error naming the argument, what it must be, and what
it got. A wrong type is a ``TypeError``, a value out of range a ``ValueError``; ``bool`` is never
taken for a number (``True`` is not a count)."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Mapping
from typing import Any


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    return " and ".join(parts)


def _in_range(v: float, low: float | None, high: float | None, low_open: bool,
              high_open: bool) -> bool:
    return not ((low is not None and (v <= low if low_open else v < low))
                or (high is not None and (v >= high if high_open else v > high)))


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None, *,
              none_ok: bool = False) -> None:
    """An integer (not a bool) in ``[low, high]``; ``None`` too where ``none_ok``."""
    if value is None and none_ok:
        return
    rng = _range_text(low, high, False, False)
    what = f"an integer {rng}".strip() + (" (or None)" if none_ok else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    if not _in_range(int(value), low, high, False, False):
        raise ValueError(f"{name} must be {what}, got {value!r}")


def check_real(name: str, value: Any, low: float | None = None, high: float | None = None, *,
               low_open: bool = False, high_open: bool = False) -> None:
    """A finite real number (not a bool) in the given range."""
    what = f"a finite number {_range_text(low, high, low_open, high_open)}".strip()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v) or not _in_range(v, low, high, low_open, high_open):
        raise ValueError(f"{name} must be {what}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got "
                         f"{value!r}")


def check_type(name: str, value: Any, types: type | tuple[type, ...], expected: str, *,
               none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if not isinstance(value, types):
        raise TypeError(f"{name} must be {expected}{' (or None)' if none_ok else ''}, got "
                        f"{value!r:.80} ({type(value).__name__})")


def check_strings(name: str, value: Any, *, none_ok: bool = True,
                  item: tuple[type, ...] = (str,)) -> None:
    """A list (any iterable but a string) of strings."""
    if value is None and none_ok:
        return
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a list of strings, got {value!r:.80} "
                        f"({type(value).__name__}); a single pattern goes in a list: "
                        f"[{value!r:.40}]")
    items = value if isinstance(value, (list, tuple, set, frozenset)) else ()  # not a generator
    bad = [v for v in items if not isinstance(v, item)]
    if bad:
        raise TypeError(f"{name} must be a list of strings, got an item {bad[0]!r:.80} "
                        f"({type(bad[0]).__name__})")


def check_path(name: str, value: Any, *, none_ok: bool = True) -> None:
    check_type(name, value, (str, os.PathLike), "a path (str or os.PathLike)", none_ok=none_ok)
