"""Squared norms of many micro-batch gradients at once (the two-batch estimator's small batches),
and their weighted sums over micro-batches, per layer, for all layers at once.

For each gradient ``h``: matrices give the per-output-unit squared norms ``u_i = sum_j h_ij^2``
(``(units,)``, the unit axis from the layout as in :func:`gradlens.roles.output_units_view`)
and ``||h||^2 = sum_i u_i``; vectors give ``||h||^2``. Like
:func:`gradlens.stats.columns.unit_sq_norms_propagating`, nothing is masked: a non-finite
entry makes its unit and its total non-finite (the estimator reads that as NaN).

Batched: tensors of one shape, dtype and unit axis are stacked (at most
:data:`MICRO_STACK_ENTRIES` entries per stack; the stacking kept per list signature) and
reduced with one kernel per stack, vectors too (on CPU ``torch._foreach_norm`` is a loop over
the tensors). The kernels launched grow with the distinct shapes, not with the tensors.
:class:`MicroNorms` keeps the results in those stacks and forms ``sum_m w_m x_{k,m}`` for
every layer ``k`` with a few kernels per step (one scatter into a dense ``(layer,
micro-batch)`` buffer, then the sum over ``m`` in micro-batch order: the same rounding as a
per-layer loop); where the stack rows go is kept per pattern of records in a caller's dict.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from gradlens.roles import _LAYOUT_UNIT_DIM
from gradlens.stats.norms import accumulation_dtype, chunked

__all__ = ["MicroNorms", "micro_sq_norm_stacks", "micro_sq_norms"]

#: Scatter layouts :meth:`MicroNorms.sums` keeps in a caller's dict at most.
PLANS = 16

#: ``(members, units, sq)``: the norms of ``grads[members]``, stacked: ``units`` ``(n, U)``
#: (None for vectors), ``sq`` ``(n,)``.
Stack = tuple[list[int], "torch.Tensor | None", torch.Tensor]


#: Entries of one stack at most (1 MiB in float32): at 291 tensors (hidden 64) 2**16 made 31
#: stacks per list and 2**18 made 9, and the stacking and reductions cost about the same per
#: entry (:data:`gradlens.stats.summary_plan.PLAN_STACK_ENTRIES` measured the same size).
MICRO_STACK_ENTRIES = 1 << 18


#: ``(members, shape, dtype, unit_dim)`` of each stack, per list signature (a few: the
#: same lists come every step); at most :data:`LAYOUTS` are kept.
_STACKING: dict[tuple, list[tuple[list[int], torch.Size, torch.dtype, int | None]]] = {}
LAYOUTS = 16


def _stacking(grads: Sequence[torch.Tensor], layouts: Sequence[str | None]
              ) -> list[tuple[list[int], torch.Size, torch.dtype, int | None]]:
    """The stacks of a list: tensors of one shape, dtype and unit axis (None: a vector), in
    order of first appearance, split at :data:`MICRO_STACK_ENTRIES` entries."""
    key = (tuple([g.shape for g in grads]), tuple([g.dtype for g in grads]), tuple(layouts),
           MICRO_STACK_ENTRIES)
    plan = _STACKING.get(key)
    if plan is None:
        groups: dict[tuple, list[int]] = {}
        for i, (g, layout) in enumerate(zip(grads, layouts, strict=True)):
            unit_dim = None if layout is None or g.ndim < 2 else _LAYOUT_UNIT_DIM[layout]
            groups.setdefault((g.shape, g.dtype, unit_dim), []).append(i)
        numels = [g.numel() for g in grads]
        plan = [(chunk, *group) for group, idx in groups.items()
                for chunk in chunked([idx], numels, MICRO_STACK_ENTRIES)]
        if torch.compiler.is_compiling():  # traced: its shapes may be symbolic, not kept
            return plan
        if len(_STACKING) >= LAYOUTS:
            _STACKING.clear()
        _STACKING[key] = plan
    return plan


def micro_sq_norm_stacks(grads: Sequence[torch.Tensor], layouts: Sequence[str | None]
                         ) -> list[Stack]:
    """The squared norms of ``grads`` as computed, one :data:`Stack` per stack: ``units`` the
    per-unit squared norms of matrices (``layouts[i]`` their layout; a vector has
    ``layouts[i] is None`` and no units), ``sq`` the squared norms, in the accumulation
    dtype. Every input index appears in exactly one stack.

    Per stack ``X`` (``n`` tensors of one shape and dtype, viewed ``(n, rows, rest)``):
    units along rows ``u = ||X_i.||^2`` (one contiguous ``vector_norm``, squared), along
    columns ``sum_i X_ij^2`` (squared in the stack's own copy, summed down the rows), and
    ``sq = sum u``; vectors ``sq = ||x||^2`` row-wise on ``(n, numel)``."""
    out: list[Stack] = []
    for chunk, shape, dtype, unit_dim in _stacking(grads, layouts):
        acc = accumulation_dtype(dtype)
        numel = math.prod(shape)
        x = torch.stack([grads[i] for i in chunk]) if len(chunk) > 1 \
            else grads[chunk[0]].unsqueeze(0)
        n = len(chunk)
        if unit_dim is None:
            sq = torch.linalg.vector_norm(x.reshape(n, numel), dim=1, dtype=acc).square()
            out.append((chunk, None, sq))
            continue
        x = x.reshape(n, shape[0], math.prod(shape[1:]))
        if unit_dim == 1 and numel > MICRO_STACK_ENTRIES:  # one large matrix: in chunks
            units = _column_sq_norms(x[0], acc).unsqueeze(0)
        elif unit_dim == 1:  # units are columns: a sum of squares down the rows
            own = n > 1 or dtype != acc  # a stack or a conversion: our own copy
            x = x.to(acc)
            units = (x.square_() if own else x * x).sum(dim=1)
        else:
            units = torch.linalg.vector_norm(x, dim=2, dtype=acc).square()
        out.append((chunk, units, units.sum(dim=1)))
    return out


def _column_sq_norms(m: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``sum_i m_ij^2`` of a matrix larger than a stack (an embedding's gradient), through one
    buffer of about :data:`MICRO_STACK_ENTRIES` entries, whole rows at a time, the chunks'
    column sums added: one read of ``m`` instead of a squared temporary of its size (on one
    CPU core 24 -> 4 ms for 32768 x 256)."""
    rows = max(1, MICRO_STACK_ENTRIES // m.shape[1])
    buf = torch.empty(min(rows, m.shape[0]) * m.shape[1], dtype=acc, device=m.device)
    total = None
    for part in m.split(rows):
        sq = buf[:part.numel()].view(part.shape).copy_(part).square_().sum(dim=0)
        total = sq if total is None else total.add_(sq)
    return total


def micro_sq_norms(grads: Sequence[torch.Tensor], layouts: Sequence[str | None]
                   ) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
    """``[(units, sq)]`` per gradient, in input order (:func:`micro_sq_norm_stacks` split):
    ``units`` the ``(units,)`` per-unit squared norms of a matrix or None for a vector,
    ``sq`` the 0-d squared norm, in the accumulation dtype."""
    out: list[tuple[torch.Tensor | None, torch.Tensor] | None] = [None] * len(grads)
    for members, units, sq in micro_sq_norm_stacks(grads, layouts):
        for j, i in enumerate(members):
            out[i] = (None if units is None else units[j], sq[j])
    return out  # type: ignore[return-value]


class MicroNorms:
    """One step's micro-batch squared norms per (layer, micro-batch), held in their stacks.

    ``count[k]``: layer ``k``'s gradients so far, the caller's counter: its gradients are
    numbered in arrival order (``m = count[k]``, then ``count[k] += 1``); an entry whose
    number is -1 when the sums are formed is left out (a read that was not confirmed). The weighted
    sums ``sum_m w_m x_{k,m}`` need exactly ``len(w)`` entries per layer: a layer with none
    sums to 0, a layer with another number (absent from some micro-batch) is NaN."""

    def __init__(self, n_layers: int) -> None:
        self.count = [0] * n_layers
        self.records: list[tuple[list[int], list[int], list[Stack]]] = []

    def add(self, ks: list[int], ms: list[int], stacks: list[Stack]) -> None:
        """The norms of the gradients of layers ``ks`` (micro-batch numbers ``ms``, read when
        the sums are formed: an entry may be confirmed later)."""
        self.records.append((ks, ms, stacks))

    def sums(self, w: Sequence[float], rows: dict[int, tuple[int, ...]], dtype: torch.dtype,
             index: Callable[[tuple[int, ...]], torch.Tensor], device: torch.device | None,
             plans: dict | None = None
             ) -> tuple[torch.Tensor, list[int], dict[int, torch.Tensor], list[int]]:
        """``(a, counts, units, unit_counts)``: ``a`` ``(L,)`` the weighted sums of the squared
        norms; ``units[U]`` ``(len(rows[U]), U)`` those of the per-unit norms of the layers
        ``rows[U]`` (layers of ``U`` units); ``counts`` / ``unit_counts`` the entries per
        layer (0: sum 0; neither 0 nor ``len(w)``: NaN). ``index`` makes a device index
        from a tuple (cached: the same pattern every step). ``plans``: a caller's dict that
        keeps the scatter's layout (:meth:`_plan`) per pattern of records (the same every
        step unless the graph changes; at most :data:`PLANS` are kept)."""
        M = len(w)
        key = (M, tuple((tuple(ks), tuple(ms), tuple((tuple(members), units is None)
                                                     for members, units, _ in stacks))
                        for ks, ms, stacks in self.records))
        kept = None if plans is None else plans.get(key)
        if kept is None or kept[0] is not rows:
            kept = (rows, self._plan(M, rows, index))
            if plans is not None and not torch.compiler.is_compiling():  # traced: not kept
                if len(plans) >= PLANS:
                    plans.clear()
                plans[key] = kept
        sq_parts, pos, unit_plans, ucount = kept[1]
        a = self._sum(pos, self._take(sq_parts, 2), len(self.count), w, dtype, device)
        a = self._nan_where(a, [c not in (0, M) for c in self.count], index)
        units_out = {}
        for U, ks in rows.items():
            u_parts, u_pos, bad = unit_plans[U]
            u = self._sum(u_pos, self._take(u_parts, 1), len(ks), w, dtype, device, U)
            units_out[U] = u if bad is None else u.index_fill(0, bad, math.nan)
        return a, list(self.count), units_out, list(ucount)

    def _take(self, parts: list[tuple[int, int, torch.Tensor | None]], field: int
              ) -> list[torch.Tensor]:
        """Field ``field`` (1: units, 2: squared norms) of stack ``s`` of record ``r`` for each
        ``(r, s, rows)`` of a plan, its kept rows only where ``rows`` is an index."""
        out = []
        for r, s, keep in parts:
            x = self.records[r][2][s][field]
            out.append(x if keep is None else x.index_select(0, keep))
        return out

    def _plan(self, M: int, rows: dict[int, tuple[int, ...]],
              index: Callable[[tuple[int, ...]], torch.Tensor]):
        """Where each entry goes: ``(sq_parts, pos, {U: (unit_parts, unit_pos, nan_rows)},
        unit_counts)``; parts are ``(record, stack, kept rows or None)``, ``pos`` the device
        index of their rows ``k * M + m`` in the dense buffer (None: no entry), ``nan_rows``
        the rows of ``units[U]`` with neither 0 nor ``M`` entries (None: none)."""
        slot: dict[int, tuple[int, int]] = {k: (U, r) for U, ks in rows.items()
                                           for r, k in enumerate(ks)}
        ucount = [0] * len(self.count)
        pos: list[int] = []
        parts: list[tuple[int, int, torch.Tensor | None]] = []
        upos: dict[int, list[int]] = {U: [] for U in rows}
        uparts: dict[int, list[tuple[int, int, torch.Tensor | None]]] = {U: [] for U in rows}
        for r, (ks, ms, stacks) in enumerate(self.records):
            for s, (members, units, _) in enumerate(stacks):
                keep, p, ukeep, up = [], [], [], []
                for j, i in enumerate(members):
                    k, m = ks[i], ms[i]
                    if m < 0 or m >= M:
                        continue
                    keep.append(j)
                    p.append(k * M + m)
                    if units is not None and k in slot:
                        ucount[k] += 1
                        ukeep.append(j)
                        up.append(slot[k][1] * M + m)
                if keep:
                    pos += p
                    parts.append((r, s, None if len(keep) == len(members)
                                  else index(tuple(keep))))
                if up:
                    U = slot[ks[members[ukeep[0]]]][0]
                    upos[U] += up
                    uparts[U].append((r, s, None if len(ukeep) == len(members)
                                      else index(tuple(ukeep))))
        unit_plans = {}
        for U, ks in rows.items():
            bad = tuple(j for j, k in enumerate(ks) if ucount[k] not in (0, M))
            unit_plans[U] = (uparts[U], index(tuple(upos[U])) if upos[U] else None,
                             index(bad) if bad else None)
        return parts, index(tuple(pos)) if pos else None, unit_plans, ucount

    @staticmethod
    def _sum(pos: torch.Tensor | None, parts: list[torch.Tensor], n: int, w: Sequence[float],
             dtype: torch.dtype, device, *shape: int) -> torch.Tensor:
        """``sum_m w_m x[.., m]`` of the entries ``parts`` scattered to rows ``pos`` of a
        dense ``(n * M, *shape)`` buffer, in micro-batch order."""
        M = len(w)
        dense = torch.zeros((n * M, *shape), dtype=dtype, device=device)
        if parts:
            dense.index_copy_(0, pos, torch.cat(parts).to(dtype))
        dense = dense.view(n, M, *shape)
        total = dense[:, 0] * w[0]
        for m in range(1, M):
            total = total + dense[:, m] * w[m]
        return total

    @staticmethod
    def _nan_where(x: torch.Tensor, bad: list[bool],
                   index: Callable[[tuple[int, ...]], torch.Tensor]) -> torch.Tensor:
        if not any(bad):
            return x
        rows = index(tuple(j for j, b in enumerate(bad) if b))
        return x.index_fill(0, rows, math.nan)
