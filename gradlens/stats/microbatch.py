"""Squared norms of many micro-batch gradients at once (the two-batch estimator's small batches).

For each gradient ``h``: matrices give the per-output-unit squared norms ``u_i = sum_j h_ij^2``
(``(units,)``, the unit axis from the layout as in :func:`gradlens.roles.output_units_view`)
and ``||h||^2 = sum_i u_i``; vectors give ``||h||^2``. Like
:func:`gradlens.stats.columns.unit_sq_norms_propagating`, nothing is masked: a non-finite
entry makes its unit and its total non-finite (the estimator reads that as NaN).

Batched: matrices of one shape, dtype and layout are stacked (at most
:data:`gradlens.stats.norms.STACK_ENTRIES` entries per stack) and reduced with one kernel per
stack; vectors go through one multi-tensor norm (``torch._foreach_norm``) per dtype. The
kernels launched grow with the distinct shapes, not with the tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradlens.roles import _LAYOUT_UNIT_DIM
from gradlens.stats.norms import accumulation_dtype, chunked

__all__ = ["micro_sq_norms"]


def _matrix(g: torch.Tensor) -> torch.Tensor:
    return g.reshape(g.shape[0], -1) if g.ndim > 2 else g


def micro_sq_norms(grads: Sequence[torch.Tensor], layouts: Sequence[str | None]
                   ) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
    """``[(units, sq)]`` per gradient, in input order: ``units`` the ``(units,)`` per-unit
    squared norms of a matrix (``layouts[i]`` its layout) or None for a vector
    (``layouts[i] is None``), ``sq`` the 0-d squared norm, in the accumulation dtype."""
    out: list[tuple[torch.Tensor | None, torch.Tensor] | None] = [None] * len(grads)
    vectors: dict[torch.dtype, list[int]] = {}
    groups: dict[tuple, list[int]] = {}
    for i, (g, layout) in enumerate(zip(grads, layouts, strict=True)):
        if layout is None or g.ndim < 2:
            vectors.setdefault(g.dtype, []).append(i)
        else:
            groups.setdefault((tuple(g.shape), g.dtype, _LAYOUT_UNIT_DIM[layout]), []).append(i)
    for dtype, idx in vectors.items():
        norms = torch._foreach_norm([grads[i] for i in idx], 2,
                                    dtype=accumulation_dtype(dtype))
        for i, n in zip(idx, norms, strict=True):
            out[i] = (None, n.square())
    keys = list(groups)
    numels = [grads[i].numel() for i in range(len(grads))]
    for key, idx in zip(keys, [groups[k] for k in keys], strict=True):
        _shape, dtype, unit_dim = key
        acc = accumulation_dtype(dtype)
        for chunk in chunked([idx], numels):
            x = torch.stack([_matrix(grads[i]) for i in chunk])
            if unit_dim == 1:  # units are columns: a sum of squares down the rows
                x = x.to(acc)
                units = (x * x).sum(dim=1)
            else:
                units = torch.linalg.vector_norm(x, dim=2, dtype=acc).square()
            sq = units.sum(dim=1)
            for j, i in enumerate(chunk):
                out[i] = (units[j], sq[j])
    return out  # type: ignore[return-value]
