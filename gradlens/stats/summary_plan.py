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
buffer in chunks of a stack's size, one chunk after another, and its row sums the chunks'
partial sums (``max_abs`` their max): one read from memory instead of about eight passes over a
temporary of its own size (52 -> 11 ms for 32768 x 256 on one CPU core). Stacked rows equal
:func:`gradlens.stats.norms.group_summary`'s bit for bit (same copies, same reductions); a
chunked row sums in another order (float rounding; the max and the count are exact).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from gradlens.stats import norms as N

__all__ = ["PLAN_STACK_ENTRIES", "SummaryPlan", "SummaryPlans"]

#: Entries of one stack (1 MiB in float32): fewer, larger stacks launch fewer kernels, while
#: a stack and its twin still fit in a core's cache (measured at 291 tensors on the CPU,
#: microseconds per tensor per step: 2**16 entries 10.1, 2**18 8.8, 2**20 9.9; buffers kept
#: between calls instead of allocated per call saved 0.3-1.0 more, not worth their memory).
PLAN_STACK_ENTRIES = 1 << 18


def signature(grads: Sequence[torch.Tensor]) -> tuple:
    """What a plan depends on: each tensor's shape, dtype and device."""
    return (tuple([g.shape for g in grads]), tuple([g.dtype for g in grads]),
            tuple([g.device for g in grads]))


class SummaryPlan:
    """The batching of one list signature (see the module docstring)."""

    def __init__(self, grads: Sequence[torch.Tensor], acc: torch.dtype) -> None:
        self.acc = acc
        device = grads[0].device
        numels = [g.numel() for g in grads]
        self.stacks = N.shape_groups(grads, PLAN_STACK_ENTRIES)
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
        self._size = max([s[0] * s[2] for s in self._shapes if s is not None]
                         + [PLAN_STACK_ENTRIES for s, idx in zip(self._shapes, self.stacks,
                                                                 strict=True)
                            if s is None and numels[idx[0]] > 0], default=0)

    def __call__(self, grads: Sequence[torch.Tensor], max_abs: bool = True) -> torch.Tensor:
        """``(L, 4)`` summaries of ``grads`` (of this plan's signature), in input order."""
        buf = torch.empty(2 * self._size, dtype=self.acc, device=self.numel.device)
        a, b = buf[:self._size], buf[self._size:]
        sq, mx, count = [], [], []
        for idx, shape in zip(self.stacks, self._shapes, strict=True):
            views = None
            if shape is not None:
                n, dims, numel = shape
                size = n * numel
                views = (a[:size].view(n, *dims), a[:size].view(n, numel),
                         b[:size].view(n, numel))
            elif grads[idx[0]].numel() > 0:  # larger than a stack: alone, in chunks
                s, m, c = self._chunked(grads[idx[0]], a, b, max_abs)
                sq.append(s)
                mx.append(m)
                count.append(c)
                continue
            s, m, c = self._stack([grads[k] for k in idx], views, max_abs)
            sq.append(s)
            mx.append(m)
            count.append(c)
        cols = [torch.cat(sq) if len(sq) > 1 else sq[0],
                (torch.cat(mx) if len(mx) > 1 else mx[0]) if max_abs else self.nan,
                torch.cat(count) if len(count) > 1 else count[0], self.numel]
        rows = torch.stack(cols, dim=1)
        return rows if self.index is None else rows[self.index]

    def _stack(self, group: list[torch.Tensor], views, max_abs: bool):
        """``(sq, max_abs, count)`` rows of one stack copied into ``views`` (None: the
        tensors are empty, every row 0)."""
        if views is None:
            zero = torch.zeros(len(group), dtype=self.acc, device=group[0].device)
            return zero, zero, zero
        shaped, a, b = views
        torch.stack(group, out=shaped)
        torch.mul(a, 0, out=b)
        count = b.nan_to_num_(nan=1.0).sum(dim=1)
        a.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        return self._finite(a, max_abs, count)

    def _chunked(self, g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, max_abs: bool):
        """One tensor larger than a stack, through the buffer ``a``/``b`` in chunks of
        :data:`PLAN_STACK_ENTRIES` entries: each chunk is a one-row stack, and the row is the
        sum of the chunks' rows (``max_abs``: their max)."""
        sq, mx, count = [], [], []
        for chunk in g.reshape(-1).split(PLAN_STACK_ENTRIES):
            n = chunk.numel()
            s, m, c = self._stack([chunk], (a[:n].view(1, n), a[:n].view(1, n),
                                            b[:n].view(1, n)), max_abs)
            sq.append(s)
            mx.append(m)
            count.append(c)
        return (torch.cat(sq).sum().reshape(1),
                torch.cat(mx).amax().reshape(1) if max_abs else None,
                torch.cat(count).sum().reshape(1))

    @staticmethod
    def _finite(a: torch.Tensor, max_abs: bool, count: torch.Tensor):
        """Row-wise largest ``|a|`` and ``sum a^2`` of the finite copy ``a`` (squared in
        place: ``vecdot(a, a)``'s products and sums, without its temporary)."""
        largest = N.rowwise_max_abs(a) if max_abs else None
        return a.square_().sum(dim=1), largest, count


class SummaryPlans:
    """A collector's plans, one per list signature met (a few: the layers with a gradient
    can change between steps); the oldest is dropped beyond ``limit``."""

    def __init__(self, limit: int = 8) -> None:
        self.limit = limit
        self._plans: dict[tuple, SummaryPlan] = {}

    def get(self, grads: Sequence[torch.Tensor]) -> SummaryPlan:
        """The plan of this list (made and kept on first sight: one device, the dtype rule
        and the errors of :func:`gradlens.stats.grad_summaries`)."""
        key = signature(grads) if grads else ()
        plan = self._plans.get(key)
        if plan is None:
            acc, _ = N._common_acc(grads)
            if len(self._plans) >= self.limit:
                self._plans.pop(next(iter(self._plans)))
            plan = self._plans[key] = SummaryPlan(grads, acc)
        return plan
