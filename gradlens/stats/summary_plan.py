"""The every-step summary of a list of gradients, batched by a plan made once per list shape.

:func:`gradlens.stats.grad_summaries` (``[sq_norm, max_abs, nonfinite, numel]`` per tensor)
runs at every optimizer step, so its host work is what an unlogged step costs. A
:class:`SummaryPlan` holds what depends only on the shapes and dtypes of the list: the stacks
(tensors of one shape and dtype, at most :data:`PLAN_STACK_ENTRIES` entries each), the
gather that puts the rows back in input order and the constant columns. Each call allocates
ONE buffer of two stacks' size that every stack is written into in turn (nothing the size of
the gradients is kept between steps). :class:`SummaryPlans` keeps the plans of a collector,
keyed by the list's shapes, dtypes and devices.

Per stack ``A`` (``n`` rows, one per tensor, in the accumulation dtype) and its twin ``B``:

    B = A * 0               0 where finite, NaN where not
    nonfinite = rowsum(nan_to_num(B, nan=1))
    A = nan_to_num(A, 0)    finite copy
    max_abs = rowwise max(-min A, max A)      sq_norm = rowsum(A^2)  (A squared in place)

The stack is read from the gradients once, then from cache. A tensor larger than a stack (an
embedding, an output layer: 32 MB at a 32k vocabulary and hidden 256) goes through the same
buffer in chunks of about a stack's size (whole rows of its memory layout), one after
another, and its row sums the chunks' partial sums (``max_abs`` their max): one read from
memory instead of about eight passes over a temporary of its own size (52 -> 11 ms for
32768 x 256 on one CPU core). Stacked rows equal :func:`gradlens.stats.norms.group_summary`'s
bit for bit (same copies, same reductions); a chunked row sums in another order (float
rounding; the max and the count are exact).

A plan made with layouts (a logged step of the columns family) stacks matrices of one shape,
dtype and unit axis, and views each squared stack ``(n, units, fan)``:

    units = sum over fan of A^2     fans = sum over units of A^2     sq_norm = sum units

A chunked matrix is cut along its memory rows: the axis along the rows (units for
``linear``, fans for ``embedding``) is the chunks' results put end to end, the other the sum
of the chunks' partial sums.
(:meth:`SummaryPlan.with_axes`; :func:`gradlens.stats.grad_summaries_with_axes`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from gradlens.roles import _LAYOUT_UNIT_DIM, output_units_view
from gradlens.stats import norms as N

__all__ = ["PLAN_STACK_ENTRIES", "AxisStack", "SummaryPlan", "SummaryPlans"]

#: Entries of one stack (1 MiB in float32): fewer, larger stacks launch fewer kernels, while
#: a stack and its twin still fit in a core's cache (measured at 291 tensors on the CPU,
#: microseconds per tensor per step: 2**16 entries 10.1, 2**18 8.8, 2**20 9.9; buffers kept
#: between calls instead of allocated per call saved 0.3-1.0 more, not worth their memory).
PLAN_STACK_ENTRIES = 1 << 18

#: ``(members, units, fans)``: the per-unit ``(n, units)`` and per-fan ``(n, fan)`` squared
#: norms of the matrices ``members`` (input indices), stacked.
AxisStack = tuple[list[int], torch.Tensor, torch.Tensor]


def signature(grads: Sequence[torch.Tensor]) -> tuple:
    """What a plan depends on: each tensor's shape, dtype and device."""
    return (tuple([g.shape for g in grads]), tuple([g.dtype for g in grads]),
            tuple([g.device for g in grads]))


class SummaryPlan:
    """The batching of one list signature (see the module docstring)."""

    def __init__(self, grads: Sequence[torch.Tensor], acc: torch.dtype,
                 layouts: Sequence[str | None] | None = None) -> None:
        self.acc = acc
        device = grads[0].device
        numels = [g.numel() for g in grads]
        if layouts is None:
            self.stacks = N.shape_groups(grads, PLAN_STACK_ENTRIES)
            self._axes: list[tuple[int, int, int] | None] = [None] * len(self.stacks)
        else:
            self.stacks, self._axes = _axis_stacks(grads, layouts)
        order = [k for idx in self.stacks for k in idx]
        inverse = [0] * len(order)
        for pos, k in enumerate(order):
            inverse[k] = pos
        self.index = (None if order == list(range(len(grads)))
                      else torch.tensor(inverse, device=device))
        self.numel = torch.tensor([float(numels[k]) for k in order], dtype=acc, device=device)
        self.nan = torch.full((len(grads),), math.nan, dtype=acc, device=device)
        # (n, shape, numel) of each stack that goes through the buffer whole (None: a tensor
        # larger than a stack, chunked, or an empty one)
        self._shapes = [(len(idx), grads[idx[0]].shape, numels[idx[0]])
                        if 0 < len(idx) * numels[idx[0]] <= PLAN_STACK_ENTRIES else None
                        for idx in self.stacks]
        # entries per chunk of each chunked tensor (whole memory rows where it has axes)
        self._chunk = [None if shape is not None or numels[idx[0]] == 0 else
                       PLAN_STACK_ENTRIES if ax is None else
                       _row_length(ax) * max(1, PLAN_STACK_ENTRIES // _row_length(ax))
                       for idx, shape, ax in zip(self.stacks, self._shapes, self._axes,
                                                 strict=True)]
        self._size = max([s[0] * s[2] for s in self._shapes if s is not None]
                         + [c for c in self._chunk if c is not None], default=0)

    def __call__(self, grads: Sequence[torch.Tensor], max_abs: bool = True) -> torch.Tensor:
        """``(L, 4)`` summaries of ``grads`` (of this plan's signature), in input order."""
        return self.with_axes(grads, max_abs)[0]

    def with_axes(self, grads: Sequence[torch.Tensor], max_abs: bool = True
                  ) -> tuple[torch.Tensor, list[AxisStack]]:
        """The summaries and, for a plan made with layouts, the per-unit and per-fan squared
        norms of the matrices, one :data:`AxisStack` per stack (matrices of one shape)."""
        buf = torch.empty(2 * self._size, dtype=self.acc, device=self.numel.device)
        a, b = buf[:self._size], buf[self._size:]
        sq, mx, count = [], [], []
        axes: list[AxisStack] = []
        for idx, shape, ax, chunk in zip(self.stacks, self._shapes, self._axes, self._chunk,
                                         strict=True):
            views = None
            if shape is not None:
                n, dims, numel = shape
                size = n * numel
                views = (a[:size].view(n, *dims), a[:size].view(n, numel),
                         b[:size].view(n, numel))
            if chunk is not None:  # larger than a stack: alone, in chunks
                s, m, c, unit_fan = self._chunked(grads[idx[0]], a, b, max_abs, ax, chunk)
            else:
                s, m, c, unit_fan = self._stack([grads[k] for k in idx], views, max_abs, ax)
            sq.append(s)
            mx.append(m)
            count.append(c)
            if unit_fan is not None:
                axes.append((idx, *unit_fan))
        cols = [torch.cat(sq) if len(sq) > 1 else sq[0],
                (torch.cat(mx) if len(mx) > 1 else mx[0]) if max_abs else self.nan,
                torch.cat(count) if len(count) > 1 else count[0], self.numel]
        rows = torch.stack(cols, dim=1)
        return (rows if self.index is None else rows[self.index]), axes

    def _stack(self, group: list[torch.Tensor], views, max_abs: bool,
               ax: tuple[int, int, int] | None):
        """``(sq, max_abs, count, unit_fan)`` rows of one stack copied into ``views`` (None:
        the tensors are empty, every row 0)."""
        if views is None:
            n, kw = len(group), {"dtype": self.acc, "device": group[0].device}
            zero = torch.zeros(n, **kw)
            unit_fan = None if ax is None else (torch.zeros(n, ax[1], **kw),
                                                torch.zeros(n, ax[2], **kw))
            return zero, zero, zero, unit_fan
        shaped, a, b = views
        torch.stack(group, out=shaped)
        torch.mul(a, 0, out=b)
        count = b.nan_to_num_(nan=1.0).sum(dim=1)
        a.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        return self._finite(a, max_abs, count, ax)

    def _chunked(self, g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, max_abs: bool,
                 ax: tuple[int, int, int] | None, chunk: int):
        """One tensor larger than a stack, through the buffer ``a``/``b`` in chunks of
        ``chunk`` entries, each a one-row stack: the sums of the chunks' rows (``max_abs``:
        their max); with axes, chunks of whole memory rows, whose row-axis results are put
        end to end and whose other axis is summed (module docstring)."""
        sq, mx, count, along, across = [], [], [], [], None
        for part in g.reshape(-1).split(chunk):
            n = part.numel()
            part_ax = None if ax is None else (
                (0, n // ax[2], ax[2]) if ax[0] == 0 else (1, ax[1], n // ax[1]))
            s, m, c, unit_fan = self._stack([part], (a[:n].view(1, n), a[:n].view(1, n),
                                                     b[:n].view(1, n)), max_abs, part_ax)
            sq.append(s)
            mx.append(m)
            count.append(c)
            if unit_fan is not None:  # (unit, fan): linear's rows are units, else fans
                rows, cols = unit_fan if ax[0] == 0 else unit_fan[::-1]
                along.append(rows)
                across = cols if across is None else across + cols
        largest = torch.cat(mx).amax().reshape(1) if max_abs else None
        total = torch.cat(count).sum().reshape(1)
        if ax is None:
            return torch.cat(sq).sum().reshape(1), largest, total, None
        rows = torch.cat(along, dim=1)
        unit, fan = (rows, across) if ax[0] == 0 else (across, rows)
        return unit.sum(dim=1), largest, total, (unit, fan)

    @staticmethod
    def _finite(a: torch.Tensor, max_abs: bool, count: torch.Tensor,
                ax: tuple[int, int, int] | None):
        """Row-wise largest ``|a|`` and ``sum a^2`` of the finite copy ``a`` (squared in
        place: ``vecdot(a, a)``'s products and sums, without its temporary); with axes the
        squares viewed ``(n, units, fan)`` summed on each axis, ``sum a^2`` from the units."""
        largest = N.rowwise_max_abs(a) if max_abs else None
        sq = a.square_()
        if ax is None:
            return sq.sum(dim=1), largest, count, None
        mat = sq.view(a.shape[0], ax[1], ax[2]) if ax[0] == 0 else \
            sq.view(a.shape[0], ax[2], ax[1]).transpose(1, 2)
        unit, fan = mat.sum(dim=2), mat.sum(dim=1)
        return unit.sum(dim=1), largest, count, (unit, fan)


def _row_length(ax: tuple[int, int, int]) -> int:
    """Entries of one memory row of a matrix with axes ``(unit_dim, units, fan)``: its fan
    where units are rows (``linear``), else its units (``embedding``, ``conv1d``)."""
    return ax[2] if ax[0] == 0 else ax[1]


def _axis_stacks(grads: Sequence[torch.Tensor], layouts: Sequence[str | None]
                 ) -> tuple[list[list[int]], list[tuple[int, int, int] | None]]:
    """Stacks of tensors of one shape, dtype and layout axis (vectors: ``layouts[k]`` None),
    with each stack's ``(unit_dim, units, fan)`` (None for vectors)."""
    groups: dict[tuple, list[int]] = {}
    for k, (g, layout) in enumerate(zip(grads, layouts, strict=True)):
        if layout is not None:
            if layout not in _LAYOUT_UNIT_DIM:
                raise ValueError(f"unknown layout {layout!r}; use 'linear', 'conv1d', "
                                 "'embedding' or 'other' (1-D 'vector' parameters have no "
                                 "units, their layout is None here)")
            output_units_view(g, layout)  # a matrix
        key = (tuple(g.shape), g.dtype, None if layout is None else _LAYOUT_UNIT_DIM[layout])
        groups.setdefault(key, []).append(k)
    stacks, axes = [], []
    numels = [g.numel() for g in grads]
    for key, idx in groups.items():
        for run in N.chunked([idx], numels, PLAN_STACK_ENTRIES):
            stacks.append(run)
            if key[2] is None:
                axes.append(None)
            else:
                units, fan = output_units_view(grads[run[0]], layouts[run[0]]).shape
                axes.append((key[2], units, fan))
    return stacks, axes


class SummaryPlans:
    """A collector's plans, one per list signature met (a few: the layers with a gradient
    can change between steps); the oldest is dropped beyond ``limit``."""

    def __init__(self, limit: int = 8) -> None:
        self.limit = limit
        self._plans: dict[tuple, SummaryPlan] = {}

    def get(self, grads: Sequence[torch.Tensor],
            layouts: Sequence[str | None] | None = None) -> SummaryPlan:
        """The plan of this list (made and kept on first sight: one device, the dtype rule
        and the errors of :func:`gradlens.stats.grad_summaries`); with ``layouts`` (a matrix
        layout per tensor, None for vectors), one that also gives each matrix's per-unit and
        per-fan squared norms (:meth:`SummaryPlan.with_axes`)."""
        key = signature(grads) if grads else ()
        if layouts is not None:
            key = (key, tuple(layouts))
        plan = self._plans.get(key)
        if plan is None:
            acc, _ = N._common_acc(grads)
            if len(self._plans) >= self.limit:
                self._plans.pop(next(iter(self._plans)))
            plan = self._plans[key] = SummaryPlan(grads, acc, layouts)
        return plan
