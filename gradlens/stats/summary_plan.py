"""The every-step summary of a list of gradients, batched by a plan made once per list shape.

:func:`gradlens.stats.grad_summaries` (``[sq_norm, max_abs, nonfinite, numel]`` per tensor)
runs at every optimizer step, so its host work is what an unlogged step costs. A
:class:`SummaryPlan` holds what depends only on the shapes and dtypes of the list: the stacks
(tensors of one shape and dtype, at most :data:`PLAN_STACK_ENTRIES` entries each), the
gather that puts the rows back in input order, the constant columns, and two
buffers of one stack's size that every step's stacks are written into (no allocation per
step; a fresh allocation on the CPU costs page faults). :class:`SummaryPlans` keeps the plans
of a collector, keyed by the list's shapes and dtypes.

Per stack ``A`` (``n`` rows, one per tensor, in the accumulation dtype) and its twin ``B``:

    B = A * 0               0 where finite, NaN where not
    nonfinite = rowsum(nan_to_num(B, nan=1))
    A = nan_to_num(A, 0)    finite copy
    sq_norm = rowwise A . A          max_abs = rowwise max(-min A, max A)

The stack is read from the gradients once, then from cache. A tensor larger than a stack is
summarized alone, in a temporary of its own size. Results equal
:func:`gradlens.stats.norms.group_summary`'s bit for bit (same copies, same reductions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from gradlens.stats import norms as N

__all__ = ["PLAN_STACK_ENTRIES", "SummaryPlan", "SummaryPlans"]

#: Entries of one stack of a kept plan (its two buffers, 1 MiB each in float32): larger than
#: a one-off stack (:data:`gradlens.stats.norms.STACK_ENTRIES`), since the buffers are not
#: allocated per call; fewer, larger stacks launch fewer kernels (measured at 291 tensors on
#: the CPU: 2**16 entries 10.1, 2**18 8.8, 2**20 9.9 us per tensor per step).
PLAN_STACK_ENTRIES = 1 << 18


def signature(grads: Sequence[torch.Tensor]) -> tuple:
    """What a plan depends on: each tensor's shape, dtype and device."""
    return (tuple([g.shape for g in grads]), tuple([g.dtype for g in grads]),
            tuple([g.device for g in grads]))


class SummaryPlan:
    """The batching of one list signature (see the module docstring). ``reuse=False``: no
    buffers kept (each call allocates its stacks), for one-off calls."""

    def __init__(self, grads: Sequence[torch.Tensor], acc: torch.dtype, reuse: bool = True
                 ) -> None:
        self.acc = acc
        device = grads[0].device
        numels = [g.numel() for g in grads]
        limit = PLAN_STACK_ENTRIES if reuse else N.STACK_ENTRIES
        self.stacks = N.shape_groups(grads, limit)
        order = [k for idx in self.stacks for k in idx]
        inverse = [0] * len(order)
        for pos, k in enumerate(order):
            inverse[k] = pos
        self.index = (None if order == list(range(len(grads)))
                      else torch.tensor(inverse, device=device))
        self.numel = torch.tensor([float(numels[k]) for k in order], dtype=acc, device=device)
        self.nan = torch.full((len(grads),), math.nan, dtype=acc, device=device)
        fits = [len(idx) * numels[idx[0]] for idx in self.stacks
                if len(idx) * numels[idx[0]] <= limit]
        size = max(fits, default=0) if reuse else 0
        a = torch.empty(size, dtype=acc, device=device)
        b = torch.empty(size, dtype=acc, device=device)
        self._views = [self._buffers(a, b, [grads[k] for k in idx]) for idx in self.stacks]

    @staticmethod
    def _buffers(a: torch.Tensor, b: torch.Tensor, group: list[torch.Tensor]):
        """A stack's views of the two buffers: ``(A as (n, *shape), A, B)`` with ``A`` and
        ``B`` as ``(n, numel)``; None where the stack does not fit (or is empty)."""
        n, numel = len(group), group[0].numel()
        size = n * numel
        if numel == 0 or size > a.numel():
            return None
        return (a[:size].view(n, *group[0].shape), a[:size].view(n, numel),
                b[:size].view(n, numel))

    def __call__(self, grads: Sequence[torch.Tensor], max_abs: bool = True) -> torch.Tensor:
        """``(L, 4)`` summaries of ``grads`` (of this plan's signature), in input order."""
        sq, mx, count = [], [], []
        for idx, views in zip(self.stacks, self._views, strict=True):
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
        acc, n, numel = self.acc, len(group), group[0].numel()
        if views is not None:
            shaped, a, b = views
            torch.stack(group, out=shaped)
            torch.mul(a, 0, out=b)
        elif numel == 0:
            zero = torch.zeros(n, dtype=acc, device=group[0].device)
            return zero, zero, zero
        elif n == 1 and group[0].dtype == acc:  # alone: one temporary, the input read twice
            g = group[0].reshape(1, numel)
            b = torch.mul(g, 0)
            count = b.nan_to_num_(nan=1.0).sum(dim=1)
            a = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0, out=b)
            return self._finite(a, max_abs, count)
        else:
            a = torch.stack(group).reshape(n, numel).to(acc)
            b = torch.mul(a, 0)
        count = b.nan_to_num_(nan=1.0).sum(dim=1)
        a.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        return self._finite(a, max_abs, count)

    @staticmethod
    def _finite(a: torch.Tensor, max_abs: bool, count: torch.Tensor):
        sq = torch.linalg.vecdot(a, a)
        if not max_abs:
            return sq, None, count
        lo, hi = torch.aminmax(a, dim=1)
        return sq, torch.maximum(-lo, hi), count


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
