"""The heatmap's colour-scale kind, chosen by the report's rule so that both agree.

:func:`heatmap_scale` hands a statistic's per-layer values (every logged step, before any
binning: what the report colours) to :func:`gradlens.report.scales.heatmap_norm` and sends
its choice: ``log`` (every finite value positive, spanning >= 2 decades), ``symlog`` (signed
or zero and heavy-tailed; linear within +-``linthresh``, the median of the non-zero |v|) or
``linear``. The browser sets the ends from percentiles of the shown cells itself.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
from matplotlib.colors import LogNorm, SymLogNorm

from gradlens.report.scales import heatmap_norm

__all__ = ["heatmap_scale"]

_CACHE: dict[int, tuple[weakref.ref[np.ndarray], dict[str, Any] | None]] = {}
_CACHE_SIZE = 64


def _choose(values: np.ndarray) -> dict[str, Any] | None:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return None
    norm = heatmap_norm(v)
    kind = ("log" if isinstance(norm, LogNorm)
            else "symlog" if isinstance(norm, SymLogNorm) else "linear")
    out: dict[str, Any] = {"kind": kind, "min": float(v.min()), "max": float(v.max())}
    if isinstance(norm, SymLogNorm):
        out["linthresh"] = float(norm.linthresh)
    return out


def heatmap_scale(values: np.ndarray) -> dict[str, Any] | None:
    """``{kind: "log"|"symlog"|"linear", min, max[, linthresh]}`` of ``values`` (NaN ignored),
    None when none is finite. Cached per array object: the route's matrix of a statistic is one
    object until the run's files change, so a poll does not take the median again."""
    hit = _CACHE.get(id(values))
    if hit is not None and hit[0]() is values:
        return hit[1]
    scale = _choose(np.asarray(values, dtype=float))
    if len(_CACHE) >= _CACHE_SIZE:
        for k in [k for k, (ref, _) in _CACHE.items() if ref() is None] or list(_CACHE)[:1]:
            del _CACHE[k]
    _CACHE[id(values)] = (weakref.ref(values), scale)
    return scale
