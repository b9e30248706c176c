"""Pure helpers for gradients held as shards (FSDP2's ``DTensor``): the local piece, and the
counts whose partial sums add over ranks in the flush's one collective
(:mod:`gradlens.core.distributed` places and reduces them). No collective here."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from gradlens.roles import output_units_view
from gradlens.stats.norms import accumulation_dtype

__all__ = ["fan_finite_counts", "is_dtensor", "local_tensor", "spam_counts", "unit_count"]


@functools.lru_cache(maxsize=1)
def _dtensor_types() -> tuple[type, type] | None:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - very old torch
        return None
    return DTensor, Shard


def is_dtensor(t: Any) -> bool:
    """``isinstance(t, DTensor)``, False where torch.distributed is missing."""
    types = _dtensor_types()
    return types is not None and isinstance(t, types[0])


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (a view), else ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def unit_count(shape: Sequence[int], layout: str) -> int:
    """Number of output units of a parameter of this (global) shape and layout."""
    return int(shape[1]) if layout in ("conv1d", "embedding") else int(shape[0])


def fan_finite_counts(g: torch.Tensor, layout: str) -> torch.Tensor:
    """Per-fan number of finite entries (over the units) of ``g``'s ``(units, fan)`` view,
    in the accumulation dtype: the denominator of :func:`gradlens.stats.fan_rms`."""
    z = output_units_view((g * 0).nan_to_num_(nan=1.0), layout)  # 0 where finite, 1 where not
    return z.shape[0] - z.sum(dim=0, dtype=accumulation_dtype(g.dtype))


def spam_counts(g: torch.Tensor, v: torch.Tensor,
                theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hits, ok)``: the numerator and denominator of :func:`gradlens.stats.spam_fraction`
    (``#{i: g_i**2 > theta v_i}`` and ``#{i: g_i, v_i finite}``), which add over shards."""
    acc = accumulation_dtype(g.dtype)
    gf, vf = g.to(acc), v.to(acc)
    ok = torch.isfinite(gf) & torch.isfinite(vf)
    hit = ok & (gf.square() > theta * vf)
    return hit.sum().to(acc), ok.sum().to(acc)
