"""Colour scales of heatmaps: linear, log, or symmetric log for heavy-tailed signed values."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.colors import LogNorm, Normalize, SymLogNorm

__all__ = ["heatmap_norm", "scale_name", "spans_decades"]


def spans_decades(values: Any, decades: float = 2.0) -> bool:
    """True when every finite value is positive and max/min >= 10**decades (use a log scale)."""
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v)]
    if v.size < 2 or np.any(v <= 0):
        return False
    return bool(v.max() / v.min() >= 10.0 ** decades)


def heatmap_norm(values: Any, log: bool | None = None, decades: float = 2.0) -> Normalize:
    """The colour scale of a heatmap of ``values`` (pass every run's values to share it).

    - ``LogNorm`` when every finite value is positive and max/min >= 10**decades (``log=None``),
      or when ``log=True`` (values <= 0 are then left out);
    - ``SymLogNorm`` when values are signed (or zero) and heavy-tailed: max|v| >= 10**decades
      times the median of the non-zero |v|; linear within +-that median, logarithmic beyond,
      its ends at the 0.5th and 99.5th percentiles (values beyond take the end colours), so
      one value of -160,000 among values near 1 does not turn the map one colour;
    - linear (``Normalize``) otherwise, or when ``log=False``.
    """
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("no finite values to colour")
    if log or (log is None and spans_decades(v, decades)):
        pos = v[v > 0]
        if pos.size == 0:
            raise ValueError("no positive value for a log colour scale")
        return LogNorm(vmin=float(pos.min()), vmax=float(pos.max()))
    mag = np.abs(v[v != 0])
    if log is None and mag.size and mag.max() >= 10.0 ** decades * float(np.median(mag)):
        lo, hi = np.percentile(v, [0.5, 99.5])
        return SymLogNorm(linthresh=float(np.median(mag)), vmin=float(lo), vmax=float(hi),
                          base=10, clip=True)
    return Normalize(vmin=float(v.min()), vmax=float(v.max()))


def scale_name(norm: Normalize) -> str:
    """The colour bar's note on the scale: ' (log scale)', ' (symmetric log scale)' or ''."""
    if isinstance(norm, LogNorm):
        return " (log scale)"
    return " (symmetric log scale)" if isinstance(norm, SymLogNorm) else ""
