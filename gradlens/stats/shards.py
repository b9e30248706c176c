"""Pure helpers for gradients held as shards (FSDP2's ``DTensor``; the local piece is
:func:`gradlens.dtensor.local_tensor`): the counts whose partial sums add over ranks in the
flush's one collective (:mod:`gradlens.core.distributed` places and reduces them)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradlens.roles import output_units_view
from gradlens.stats.norms import accumulation_dtype

__all__ = ["fan_finite_counts", "spam_counts", "unit_count"]


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
