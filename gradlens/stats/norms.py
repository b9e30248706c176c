"""Per-tensor gradient summaries: squared norm, max |g|, non-finite count, numel.

Every function here is a pure tensor -> tensor map: it reads a gradient, never writes it, returns
tensors on the gradient's device, and never synchronizes with the host (no ``.item()``, no
python ``if`` on tensor data, no data-dependent shapes). Results accumulate in ``float32``
(``float64`` when the input is ``float64``), whatever the gradient's dtype (``bf16``/``fp16``
gradients are upcast in the one copy the masking makes anyway).

Non-finite entries (NaN, +-Inf) are **excluded** from the norm and the maximum (they contribute
0) and **counted** separately, so one NaN never poisons a running average.

Scaling pitfalls (apply to every statistic computed from ``p.grad``):

- **Loss reduction.** With a mean-reduced loss over a batch of ``B`` examples the gradient is
  the *mean* of per-example gradients; with a sum-reduced loss it is their sum, ``B`` times
  larger (``B**2`` in a squared norm).
- **Gradient accumulation.** Trainers divide each micro-batch loss by the number ``K`` of
  micro-batches, so a hook on a single backward sees ``1/K`` of that micro-batch's mean
  gradient; ``p.grad`` at the optimizer step is the mean over all ``K * B`` examples.
- **AMP.** Under ``torch.amp.GradScaler`` the gradients are multiplied by the loss scale ``S``
  until ``scaler.unscale_(optimizer)`` runs: a norm read before that is ``S`` times too large
  (``S**2`` squared), and Inf/NaN entries are expected on the steps the scaler skips. Read the
  gradient after unscaling (an optimizer step pre-hook does) or divide by ``S``.
- **Clipping.** ``clip_grad_norm_`` rescales ``p.grad`` in place; a norm read in a step
  pre-hook is the *clipped* norm.

Speed (2 shared CPU cores, a 5.3M-entry list shaped like the ``small`` LLaMA's gradients,
best of 15, one thread; the machine was busy, so read these as ratios): ``torch.dot`` +
``torch.aminmax`` with no masking and no count, 1.6 ms; the exact summary here, 4.9 ms: a
``nan_to_num`` copy, ``dot`` and ``aminmax`` on it, then the non-finite count in the copy's
own buffer (``g * 0`` is 0 for a finite entry and NaN for a non-finite one; NaN read as 1 and
summed). Counting the NaNs of ``g * 0`` with ``count_nonzero`` in a second temporary took
17.8 ms in the same run: boolean reductions are slow on CPU, and every temporary costs page
faults there. ``torch.where(torch.isfinite(g), g, 0)`` with a boolean-sum count and
``torch._foreach_norm`` (a per-tensor loop on CPU) are slower still. At a real tensor count
(291 tensors, as LLaMA-7B) the per-tensor launches dominate instead: :func:`grad_summaries`
therefore stacks each group of tensors of one shape and dtype into ONE copy and runs the same
kernels on the stack (about 10 stacks for a LLaMA of any depth), from a plan a collector keeps
per list shape (:mod:`gradlens.stats.summary_plan`). The per-tensor loop
(``foreach=False``) and the ``torch._foreach_*`` path (``foreach=True``) stay as references;
all three agree to float rounding (tested on CPU against float64 numpy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from gradlens.stats.summary_plan import SummaryPlans

__all__ = [
    "SUMMARY_FIELDS",
    "accumulation_dtype",
    "finite_copy",
    "finite_max_abs",
    "finite_sq_norm",
    "finite_sum",
    "grad_summaries",
    "grad_summary",
    "grouped_summaries",
    "nonfinite_count",
    "shape_groups",
    "sq_norms",
]

#: Column order of :func:`grad_summary` / :func:`grad_summaries`.
SUMMARY_FIELDS = ("sq_norm", "max_abs", "nonfinite", "numel")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """``float64`` for ``float64`` inputs, ``float32`` for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def finite_copy(x: torch.Tensor) -> torch.Tensor:
    """A new tensor in the accumulation dtype with NaN/+-Inf replaced by 0 (``x`` untouched)."""
    acc = accumulation_dtype(x.dtype)
    if x.dtype == acc:
        return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    return x.to(acc).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def nonfinite_count(x: torch.Tensor) -> torch.Tensor:
    """Number of NaN/+-Inf entries of ``x`` (0-d tensor in the accumulation dtype).

    ``x * 0`` is 0 for a finite entry and NaN for a non-finite one; with NaN read as 1 its sum
    is the count (a float sum: on CPU several times faster than counting booleans). Exact
    below 2**24 non-finite entries in float32.
    """
    return (x * 0).nan_to_num_(nan=1.0).sum(dtype=accumulation_dtype(x.dtype))


def _flat(c: torch.Tensor) -> torch.Tensor:
    return c.reshape(-1)


def finite_sq_norm(g: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm over the finite entries: ``sum_{i: g_i finite} g_i**2`` (0-d tensor).

    Reference: the plain definition; float64 numpy in ``tests/stats/test_norms.py``.
    """
    c = _flat(finite_copy(g))
    return torch.dot(c, c)


def finite_max_abs(g: torch.Tensor) -> torch.Tensor:
    """``max |g_i|`` over finite entries (0 when there is none, or for an empty tensor)."""
    c = _flat(finite_copy(g))
    if c.numel() == 0:
        return c.new_zeros(())
    lo, hi = torch.aminmax(c)
    return torch.maximum(-lo, hi)


def finite_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of the finite entries of ``x`` (0-d, accumulation dtype).

    Used on per-example squared norms: an example whose activations or gradients overflowed
    contributes nothing (count the non-finite ones with :func:`nonfinite_count`).
    """
    return finite_copy(x).sum()


def grad_summary(g: torch.Tensor, max_abs: bool = True) -> torch.Tensor:
    """One gradient's summary: a ``(4,)`` tensor ``[sq_norm, max_abs, nonfinite, numel]``
    (``max_abs=False`` skips that pass and leaves NaN in its place).

    - ``sq_norm = sum_{finite} g_i**2`` (``||g||_2**2`` over finite entries),
    - ``max_abs = max_{finite} |g_i|``,
    - ``nonfinite = #{i: g_i is NaN or +-Inf}``,
    - ``numel`` (a constant of the shape; float32 represents it exactly up to 2**24 =
      16.7M entries, approximately beyond: use the python ``g.numel()`` where it matters).

    The norm is ``sqrt(sq_norm)``; the RMS is ``sqrt(sq_norm / (numel - nonfinite))``.
    See the module docstring for the loss-reduction, accumulation and AMP pitfalls.
    """
    acc = accumulation_dtype(g.dtype)
    c = _flat(finite_copy(g))
    if c.numel() == 0:
        return torch.zeros(len(SUMMARY_FIELDS), dtype=acc, device=g.device)
    sq = torch.dot(c, c)
    if max_abs:
        lo, hi = torch.aminmax(c)
        largest = torch.maximum(-lo, hi)
    else:
        largest = torch.full((), math.nan, dtype=acc, device=g.device)
    # the count in the copy's buffer: g * 0 is 0 where finite and NaN where not, so with NaN
    # read as 1 its sum counts the non-finite entries (float sums beat boolean counts on CPU)
    count = torch.mul(g.reshape(-1), 0, out=c).nan_to_num_(nan=1.0).sum()
    return torch.stack([
        sq,
        largest,
        count,
        torch.full((), float(c.numel()), dtype=acc, device=g.device),
    ])


def _common_acc(grads: Sequence[torch.Tensor]) -> tuple[torch.dtype, torch.device]:
    if len(grads) == 0:
        raise ValueError("grad_summaries needs at least one tensor")
    devices = {g.device for g in grads}
    if len(devices) != 1:
        raise ValueError(
            f"grad_summaries needs all tensors on one device, got {sorted(map(str, devices))}; "
            "call it once per device"
        )
    acc = (torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32)
    return acc, grads[0].device


def grad_summaries(grads: Sequence[torch.Tensor], foreach: bool | None = None,
                   max_abs: bool = True, plans: SummaryPlans | None = None) -> torch.Tensor:
    """Summaries of a list of gradients, stacked: an ``(L, 4)`` tensor.

    Columns follow :data:`SUMMARY_FIELDS`: ``[sq_norm, max_abs, nonfinite, numel]``; row ``k``
    equals ``grad_summary(grads[k])`` up to float rounding (the sums run in another order).
    The dtype is float64 if any input is float64, else float32; all tensors must live on
    one device.

    Args:
        grads: gradients (any shapes, any floating dtypes).
        foreach: ``True``: ``torch._foreach_*`` multi-tensor reductions over the list.
            ``False``: one ``grad_summary`` per tensor (the reference). ``None`` (default):
            batched per group of same-shaped tensors (:func:`grouped_summaries`): a few
            kernels per shape, not per tensor, on every device.
        max_abs: False skips the ``max_abs`` pass (NaN column): the lens reads it on logged
            steps only.
        plans: with ``foreach=None``, plans and buffers kept between calls
            (:class:`gradlens.stats.summary_plan.SummaryPlans`).
    """
    if foreach is None and plans is not None:  # checked when the plan was made
        return plans.get(grads)(grads, max_abs)
    acc, device = _common_acc(grads)
    if foreach is None:
        return grouped_summaries(grads, acc, max_abs)
    if not foreach or any(g.numel() == 0 for g in grads):
        return torch.stack([grad_summary(g, max_abs).to(acc) for g in grads])
    cleaned = [finite_copy(g).to(acc) for g in grads]
    if hasattr(torch, "_foreach_powsum"):
        sq = torch.stack(torch._foreach_powsum(cleaned, 2))
    else:  # older torch: the norm, squared
        sq = torch.stack(torch._foreach_norm(cleaned, 2)).square()
    largest = (torch.stack(torch._foreach_norm(cleaned, float("inf"))) if max_abs
               else torch.full((len(grads),), math.nan, dtype=acc, device=device))
    zeroed = torch._foreach_mul(list(grads), 0.0)  # 0 where finite, NaN where not
    nonfinite = torch.stack(torch._foreach_norm(zeroed, 0, dtype=acc))  # L0 "norm": a count
    numel = torch.stack([
        torch.full((), float(g.numel()), dtype=acc, device=device) for g in grads
    ])
    return torch.stack([sq, largest, nonfinite, numel], dim=1)


#: Entries of one stacked copy at most (a group larger than this is split): a stack much
#: larger than one gradient is a fresh allocation (page faults on CPU) that costs more than
#: the launches it saves.
STACK_ENTRIES = 1 << 16


def chunked(groups: Sequence[list[int]], numels: Sequence[int],
            limit: int | None = None) -> list[list[int]]:
    """``groups`` split into runs of at most ``limit`` entries (default
    :data:`STACK_ENTRIES`; one tensor at least)."""
    limit = STACK_ENTRIES if limit is None else limit
    out = []
    for idx in groups:
        n = max(1, limit // max(1, numels[idx[0]]))
        out += [idx[i:i + n] for i in range(0, len(idx), n)]
    return out


def shape_groups(grads: Sequence[torch.Tensor], limit: int | None = None) -> list[list[int]]:
    """Indices of ``grads`` grouped by (shape, dtype), in order of first appearance, each
    group split into stacks of at most ``limit`` entries (:func:`chunked`)."""
    groups: dict[tuple[tuple[int, ...], torch.dtype], list[int]] = {}
    for k, g in enumerate(grads):
        groups.setdefault((tuple(g.shape), g.dtype), []).append(k)
    return chunked(list(groups.values()), [g.numel() for g in grads], limit)


def rowwise_max_abs(c: torch.Tensor) -> torch.Tensor:
    """``max_j |c_ij|`` of each row of a finite 2-D ``c``: ``max(-min, max)``, exact. On CPU
    from ``amin`` and ``amax`` (a row-wise ``aminmax`` there is 10-20x slower: 230 against 11 us
    for 16 x 4096, torch 2.13), elsewhere one ``aminmax`` pass."""
    if c.device.type == "cpu":
        return torch.maximum(-c.amin(dim=1), c.amax(dim=1))
    lo, hi = torch.aminmax(c, dim=1)
    return torch.maximum(-lo, hi)


def group_summary(group: Sequence[torch.Tensor], acc: torch.dtype,
                  max_abs: bool = True) -> torch.Tensor:
    """``(n, 4)`` summaries of ``n`` tensors of one numel and dtype: ONE stacked finite copy
    ``C`` (``(n, numel)``), ``sq = rowwise C . C``, ``max_abs`` row-wise (:func:`rowwise_max_abs`),
    and the non-finite count in the same buffer (``g * 0``, NaN read as 1, summed per row)."""
    n, numel = len(group), group[0].numel()
    device = group[0].device
    if numel == 0:
        return torch.zeros(n, len(SUMMARY_FIELDS), dtype=acc, device=device)
    flat = [g.reshape(-1) for g in group]
    c = torch.stack(flat)
    if c.dtype != acc:
        c = c.to(acc)
    c.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    sq = torch.linalg.vecdot(c, c)
    if max_abs:
        largest = rowwise_max_abs(c)
    else:
        largest = torch.full((n,), math.nan, dtype=acc, device=device)
    if group[0].dtype == acc:
        torch.stack(flat, out=c)  # the originals again, into the same buffer
        zeroed = c.mul_(0)
    else:
        zeroed = torch.stack(flat).mul_(0).to(acc)
    count = zeroed.nan_to_num_(nan=1.0).sum(dim=1)
    return torch.stack([sq, largest, count, torch.full((n,), float(numel), dtype=acc,
                                                       device=device)], dim=1)


def grouped_summaries(grads: Sequence[torch.Tensor], acc: torch.dtype,
                      max_abs: bool = True) -> torch.Tensor:
    """:func:`grad_summaries` batched per group of tensors of one shape and dtype
    (:func:`group_summary`): the kernels launched grow with the distinct shapes (a LLaMA of
    any depth has about 10), not with the tensors; the rows return to the input order with
    one gather. A collector keeps plans instead (:mod:`gradlens.stats.summary_plan`: the
    same stacked rows bit for bit, tensors larger than a stack summed in chunks)."""
    groups = shape_groups(grads)
    if len(groups) == 1:
        return group_summary(grads, acc, max_abs)
    rows = torch.cat([group_summary([grads[k] for k in idx], acc, max_abs) for idx in groups])
    return rows[order_index([k for idx in groups for k in idx], rows.device)]


_ORDER: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}


def order_index(order: Sequence[int], device: torch.device) -> torch.Tensor:
    """The device index that puts rows stacked in ``order`` back in input order, made once
    per (order, device): a host-to-device copy of a new list would synchronize on CUDA."""
    key = (tuple(order), device)
    index = _ORDER.get(key)
    if index is None:
        inverse = [0] * len(order)
        for pos, k in enumerate(order):
            inverse[k] = pos
        if len(_ORDER) >= 64:  # a few models per process; bounded all the same
            _ORDER.clear()
        index = _ORDER[key] = torch.tensor(inverse, device=device)
    return index


def sq_norms(grads: Sequence[torch.Tensor | None],
             dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(L,)`` squared L2 norms ``||g_k||^2``, NaN where ``g_k`` is None, from ONE multi-tensor
    reduction (``torch._foreach_norm``; no per-tensor Python work beyond building the list),
    in ``dtype`` (None: float64 if any input is, else float32). Unlike :func:`grad_summaries`
    nothing is masked: a non-finite entry makes its tensor's value non-finite (the caller
    reads that as "unknown")."""
    present = [g for g in grads if g is not None]
    if dtype is None:
        dtype = torch.float64 if any(g.dtype == torch.float64 for g in present) \
            else torch.float32
    if not present:
        return torch.full((len(grads),), math.nan, dtype=dtype)
    sq = torch.stack(torch._foreach_norm(present, 2, dtype=dtype)).square()
    if len(present) == len(grads):
        return sq
    out = torch.full((len(grads),), math.nan, dtype=dtype, device=sq.device)
    idx = [k for k, g in enumerate(grads) if g is not None]
    return out.index_copy_(0, torch.tensor(idx, device=sq.device), sq)
