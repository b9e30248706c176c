"""Numbers as the plugin's JSON carries them: 5 significant digits, no NaN or infinity."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["json_floats", "round_sig"]


def round_sig(a: np.ndarray, digits: int = 5) -> np.ndarray:
    """``a`` rounded to ``digits`` significant digits (as ``float(f"{x:.5g}")``, vectorized:
    ``round(x * 10**k) / 10**k`` with ``10**k`` exact, so the result is the double nearest
    to the rounded decimal; it can differ from the string's only where ``x * 10**k`` lands
    within an ulp of a tie). Non-finite values, zeros and magnitudes outside 1e-17..1e22
    (where ``10**k`` is not exact) go through the string."""
    a = np.asarray(a, np.float64)
    out = a.copy()
    mag = np.abs(a)
    ok = np.isfinite(a) & (mag >= 1e-17) & (mag < 1e22)
    x = a[ok]
    k = (digits - 1) - np.floor(np.log10(np.abs(x)))  # 10**k scales the last kept digit to 1
    r = np.empty_like(x)
    up = k >= 0
    r[up] = np.round(x[up] * 10.0 ** k[up]) / 10.0 ** k[up]
    r[~up] = np.round(x[~up] / 10.0 ** -k[~up]) * 10.0 ** -k[~up]
    out[ok] = r
    rest = np.flatnonzero(~ok & np.isfinite(a))
    out.flat[rest] = [float(f"{v:.{digits}g}") for v in a.flat[rest]]
    return out


def json_floats(a: np.ndarray) -> list[Any]:
    """Nested lists with 5 significant digits; NaN and +-inf as None (JSON has neither)."""
    a = np.asarray(a, np.float64)
    flat = [v if math.isfinite(v) else None for v in round_sig(a).ravel().tolist()]
    if a.ndim == 1:
        return flat
    n = a.shape[1]
    return [flat[i:i + n] for i in range(0, len(flat), n)]
