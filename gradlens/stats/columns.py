"""Column-norm spread: per-output-unit RMS of a gradient matrix and how unequal it is.

The axis is SCALE's (arXiv 2506.16659). For a 2-D gradient ``G`` viewed as ``(units, fan)`` with
:func:`gradlens.roles.output_units_view` (one row per output unit: a row of a Linear weight, a
column of a GPT-2 ``Conv1D``, a feature of the embedding), the per-unit RMS

    r_i = sqrt( mean_j G_ij**2 )                      (SCALE's normalization axis)

is the scale SCALE divides out; the other axis gives the per-fan RMS ``c_j = sqrt(mean_i
G_ij**2)``. :func:`spread` summarizes such a vector by its coefficient of variation, max/min
ratio, p99/p50 ratio and Gini coefficient; :func:`log_histogram` bins it on log-spaced edges
computed on device. SCALE's update ``G / r`` has spread exactly 0 on its axis (cv 0, ratios
1, Gini 0): a self-check.

Conventions shared by every function here:

- pure, no host synchronization, static output shapes; results in float32 (float64 for
  float64 inputs) on the input's device;
- non-finite gradient entries are excluded: sums skip them and means divide by the number of
  finite entries of the unit; a unit with no finite entry has RMS NaN, and NaN entries of a
  vector handed to :func:`spread` / :func:`log_histogram` are ignored;
- scale: every RMS here is proportional to the gradient, so the loss reduction, the ``1/K`` of
  gradient accumulation and an un-removed AMP loss scale multiply ``r`` (not the spread, which
  is scale-free; the histogram's edges move with it). See :mod:`gradlens.stats.norms`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from gradlens.roles import output_units_view
from gradlens.stats.norms import _common_acc, accumulation_dtype, finite_copy
from gradlens.stats.summary_plan import SummaryPlan, SummaryPlans

__all__ = [
    "HISTOGRAM_MOMENT_FIELDS",
    "SPREAD_FIELDS",
    "fan_rms",
    "fan_sq_norms",
    "grad_summaries_with_axes",
    "histogram_moments",
    "histograms_moments",
    "log_histogram",
    "log_histograms",
    "sort_rows",
    "sorted_quantile",
    "spread",
    "spread_batched",
    "spread_rows",
    "summary_and_axis_sq_norms",
    "unit_rms",
    "unit_sq_norms",
    "unit_sq_norms_propagating",
]

#: Order of the entries returned by :func:`spread` (schema names ``unit_rms_<field>``).
SPREAD_FIELDS = ("cv", "max_min", "p99_p50", "gini")
#: Order of the entries returned by :func:`histogram_moments`.
HISTOGRAM_MOMENT_FIELDS = ("min", "max", "num", "sum", "sum_squares")


def _units(g: torch.Tensor, layout: str) -> torch.Tensor:
    if layout not in ("linear", "conv1d", "embedding", "other"):
        raise ValueError(
            f"unknown layout {layout!r}; use 'linear', 'conv1d', 'embedding' or 'other' "
            "(1-D 'vector' parameters have no units)"
        )
    return output_units_view(g, layout)


def unit_sq_norms(g: torch.Tensor, layout: str) -> torch.Tensor:
    """Per-output-unit squared L2 norms ``sum_j G_ij**2`` over finite entries, shape ``(units,)``.

    Summing it gives :func:`gradlens.stats.norms.finite_sq_norm` of ``g``. Additive over
    micro-batches only for the *sum* of gradients, not for their squares (use it on each
    micro-batch gradient for the two-batch estimator's small-batch term).
    """
    u = _units(finite_copy(g), layout)
    return u.square_().sum(dim=1)  # squared in the copy's own buffer


def unit_sq_norms_propagating(g: torch.Tensor, layout: str) -> torch.Tensor:
    """Per-output-unit squared norms ``sum_j G_ij**2`` in ONE reduction, without the finite
    copy of :func:`unit_sq_norms`: a unit with a NaN/Inf entry is NaN/Inf (and so is the sum
    of the vector), every other unit is the same. For the hot path of estimators that turn a
    non-finite input into NaN anyway (a third of the memory traffic of the masked version).
    """
    acc = accumulation_dtype(g.dtype)
    u = _units(g, layout)
    if u.device.type == "cpu" and u.stride(1) != 1:
        # across a strided axis (embedding, Conv1D) CPU vector_norm is ~14x slower than a
        # sum of squares (3.4 ms vs 0.24 ms for 4096 x 256, torch 2.13)
        u = u.to(acc)
        return (u * u).sum(dim=1)
    return torch.linalg.vector_norm(u, dim=1, dtype=acc).square()


def fan_sq_norms(g: torch.Tensor, layout: str) -> torch.Tensor:
    """Per-fan (other axis) squared norms ``sum_i G_ij**2`` over finite entries, ``(fan,)``."""
    u = _units(finite_copy(g), layout)
    return u.square_().sum(dim=0)


def summary_and_axis_sq_norms(g: torch.Tensor, layout: str
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_summary(g), unit_sq_norms(g), fan_sq_norms(g))`` of a matrix from one finite
    copy: squared in place, one reduction per axis, the total from the unit sums; the copy's
    buffer then holds the non-finite count (about half the memory traffic of the three calls).

    ``summary = [sq_norm, max_abs, nonfinite, numel]`` as in
    :func:`gradlens.stats.norms.grad_summary`; ``sq_norm`` is the sum of the unit norms.
    """
    acc = accumulation_dtype(g.dtype)
    c = finite_copy(g)
    if c.numel() == 0:
        u = _units(c, layout)
        return (torch.zeros(4, dtype=acc, device=g.device), u.sum(dim=1), u.sum(dim=0))
    lo, hi = torch.aminmax(c)
    sq = _units(c, layout).square_()
    unit, fan = sq.sum(dim=1), sq.sum(dim=0)
    count = torch.mul(g, 0, out=c).nan_to_num_(nan=1.0).sum()  # see grad_summary
    summary = torch.stack([unit.sum(), torch.maximum(-lo, hi), count,
                           torch.full((), float(c.numel()), dtype=acc, device=g.device)])
    return summary, unit, fan


def grad_summaries_with_axes(grads: Sequence[torch.Tensor], layouts: Sequence[str | None],
                             plans: SummaryPlans | None = None
                             ) -> tuple[torch.Tensor, dict[int, tuple[torch.Tensor, ...]]]:
    """:func:`gradlens.stats.grad_summaries` (``(L, 4)``, same dtype rule) with, for every
    ``k`` whose ``layouts[k]`` is a matrix layout, its per-unit and per-fan squared norms from
    the same pass: ``{k: (units, fans)}``. Batched per stack of tensors of one shape, dtype
    and layout axis through one buffer (:class:`gradlens.stats.summary_plan.SummaryPlan`,
    made with the layouts): per stack ``A`` (finite copy, squared in place, viewed
    ``(n, units, fan)``) ``units = sum_j A_ij``, ``fans = sum_i A_ij``, ``sq_norm =
    sum units``; the kernels launched grow with the distinct shapes, not with the tensors.
    ``plans``: a collector's kept plans (the plan is made once per list and layouts;
    :meth:`~gradlens.stats.summary_plan.SummaryPlan.with_axes` keeps the stacks whole)."""
    if plans is None:
        acc, _ = _common_acc(grads)
        plan = SummaryPlan(grads, acc, list(layouts))
    else:
        plan = plans.get(grads, list(layouts))
    summary, stacks = plan.with_axes(grads)
    axes: dict[int, tuple[torch.Tensor, ...]] = {}
    for members, units, fans in stacks:
        axes.update(zip(members, zip(units.unbind(0), fans.unbind(0), strict=True),
                        strict=True))
    return summary, axes


def _finite_counts(g: torch.Tensor, layout: str, dim: int) -> torch.Tensor:
    acc = accumulation_dtype(g.dtype)
    z = _units((g * 0).nan_to_num_(nan=1.0), layout)  # 0 where finite, 1 where not
    return z.shape[dim] - z.sum(dim=dim, dtype=acc)


def unit_rms(g: torch.Tensor, layout: str) -> torch.Tensor:
    """Per-output-unit RMS ``r_i = sqrt(mean_j G_ij**2)``, shape ``(units,)`` (SCALE's axis).

    Equal to ``sqrt(mean(G**2, dim=norm_dim))`` when every entry is finite (``norm_dim`` = 1
    for ``linear``/``other``, 0 for ``conv1d``/``embedding``); otherwise the mean runs over
    the unit's finite entries (NaN for a unit with none). SCALE clamps ``r`` at 1e-8 before
    dividing; this function does not clamp.

    Reference: SCALE (Glentis et al., arXiv 2506.16659), authors' code.
    """
    sq = unit_sq_norms(g, layout)
    return (sq / _finite_counts(g, layout, dim=1)).sqrt()


def fan_rms(g: torch.Tensor, layout: str) -> torch.Tensor:
    """Per-fan RMS ``c_j = sqrt(mean_i G_ij**2)`` across output units, shape ``(fan,)``.

    The axis SCALE does *not* normalize: for a ``linear`` weight one value per input feature,
    for the embedding one per vocabulary row. Same non-finite rule as :func:`unit_rms`.
    """
    sq = fan_sq_norms(g, layout)
    return (sq / _finite_counts(g, layout, dim=0)).sqrt()


#: The signed integer type of each float type's width: the sort key's bits.
_KEY_DTYPES = {torch.float32: torch.int32, torch.float64: torch.int64}


def _sort_key(bits: torch.Tensor) -> torch.Tensor:
    """IEEE bits -> a signed integer key in the order of the floats (an involution): a
    non-negative float's bits already order as integers; a negative float's magnitude bits
    are flipped (``b ^ 0x7f..f``), which reverses them below every non-negative key."""
    return bits ^ ((bits >> (bits.element_size() * 8 - 1)) & torch.iinfo(bits.dtype).max)


def sort_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows of ``x`` (no NaN) sorted ascending along the last dimension: the values of
    ``torch.sort(x, dim=-1)``, bit for bit up to the order of ``-0.0`` and ``+0.0``.

    float32 / float64 rows are sorted as integer keys of their bits (:func:`_sort_key`: the
    same order, ``-inf`` and ``+inf`` included) and mapped back: on CPU about 30% faster than
    the float sort (torch 2.13, 64-4096 entries per row, fresh data each call), whose
    comparator also orders NaNs. Other dtypes use the float sort."""
    key_dtype = _KEY_DTYPES.get(x.dtype)
    if key_dtype is None:
        return torch.sort(x, dim=-1).values
    keys = torch.sort(_sort_key(x.contiguous().view(key_dtype)), dim=-1).values
    return _sort_key(keys).view(x.dtype)


def sorted_quantile(xs: torch.Tensor, n: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile ``q`` of the first ``n`` entries of ascending-sorted rows ``xs`` (``(..., N)``).

    Linear interpolation between order statistics at position ``q * (n - 1)``, numpy's default
    (``method="linear"``); ``n`` is a tensor (``(...)``) so that a data-dependent number of
    valid entries (the rest sorted to the end) keeps static shapes. NaN where ``n == 0``.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must be in [0, 1], got {q!r}")
    last = (n - 1).clamp_min(0)
    pos = q * last
    lo = pos.floor()
    frac = (pos - lo).unsqueeze(-1)
    lo_i = lo.long().unsqueeze(-1)
    hi_i = torch.minimum(lo_i + 1, last.long().unsqueeze(-1))
    a = xs.gather(-1, lo_i)
    b = xs.gather(-1, hi_i)
    # b is at most the (n-1)-th order statistic, so finite whenever a is
    val = torch.where(frac > 0, a + frac * (b - a), a).squeeze(-1)
    return torch.where(n > 0, val, torch.full_like(val, math.nan))


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num/den with 0/0 (and any equal pair) defined as 1."""
    return torch.where(num == den, torch.ones_like(num), num / den)


def spread_rows(x: torch.Tensor) -> torch.Tensor:
    """:func:`spread` of each row of ``x`` (``(L, N)``, non-finite = absent) -> ``(L, 4)``:
    one sort for all the rows."""
    acc = accumulation_dtype(x.dtype)
    x = x.to(acc)
    finite = torch.isfinite(x)
    n = finite.sum(dim=-1).to(acc)
    x0 = torch.where(finite, x, torch.zeros((), dtype=acc, device=x.device))
    total = x0.sum(dim=-1)
    mean = total / n
    dev = torch.where(finite, x - mean.unsqueeze(-1), torch.zeros((), dtype=acc, device=x.device))
    std = (dev.square().sum(dim=-1) / n).sqrt()
    cv = torch.where(std == 0, torch.zeros_like(std), std / mean)

    xs = sort_rows(torch.where(finite, x, torch.full((), math.inf, dtype=acc, device=x.device)))
    lo = xs[..., 0]
    hi = xs.gather(-1, (n - 1).clamp_min(0).long().unsqueeze(-1)).squeeze(-1)
    max_min = _ratio(hi, lo)
    p50 = sorted_quantile(xs, n, 0.5)
    p99 = sorted_quantile(xs, n, 0.99)
    p99_p50 = _ratio(p99, p50)

    # Gini over the n valid entries, ascending: sum_i (2i - n - 1) x_(i) / (n * sum x), i=1..n
    i = torch.arange(1, x.shape[-1] + 1, dtype=acc, device=x.device)
    xs0 = torch.where(i <= n.unsqueeze(-1), xs, torch.zeros((), dtype=acc, device=x.device))
    num = ((2 * i - 1 - n.unsqueeze(-1)) * xs0).sum(dim=-1)  # weights of absent entries: x 0
    gini = torch.where(total == 0, torch.zeros_like(total), num / (n * total))

    out = torch.stack([cv, max_min, p99_p50, gini], dim=-1)
    return torch.where((n > 0).unsqueeze(-1), out, torch.full_like(out, math.nan))


def spread(r: torch.Tensor) -> torch.Tensor:
    """Spread of a non-negative vector (per-unit RMS): ``(4,)`` tensor ``[cv, max_min, p99_p50,
    gini]`` (:data:`SPREAD_FIELDS`; schema ``unit_rms_*`` / ``fan_rms_*``).

    Over the finite entries x_1..x_n of ``r`` (NaN/Inf entries are ignored):

    - ``cv = std(x) / mean(x)``, population std (``ddof=0``);
    - ``max_min = max(x) / min(x)``;
    - ``p99_p50 = quantile(x, 0.99) / quantile(x, 0.5)``, numpy's linear interpolation;
    - ``gini = sum_i sum_j |x_i - x_j| / (2 n**2 mean(x))``, computed from the sorted values as
      ``sum_i (2i - n - 1) x_(i) / (n sum x)`` (0 = all equal, (n-1)/n = one non-zero entry).

    Zeros: a ratio whose terms are equal is 1, including 0/0 (all-zero vector: ``max_min =
    p99_p50 = 1``); a zero denominator under a positive numerator gives ``inf`` (a dead unit
    makes ``max_min`` infinite: that is information, not an error). ``cv`` and ``gini`` of an
    all-zero vector are 0. No finite entry at all: four NaNs.

    Cost: one sort of the vector (units are at most a vocabulary: cheap).
    """
    return spread_rows(r.reshape(1, -1))[0]


def spread_batched(rs: Sequence[torch.Tensor]) -> torch.Tensor:
    """:func:`spread` of several vectors (any lengths): ``(L, 4)``, row ``k`` equal to
    ``spread(rs[k])``.

    Vectors of equal length share one sort (a model has few distinct layer widths), so the
    cost is that of the entries themselves, not of padding every vector to the longest one
    (the vocabulary). Useful to summarize every layer of a model with a few kernels.
    """
    if len(rs) == 0:
        raise ValueError("spread_batched needs at least one vector")
    acc = torch.float64 if any(r.dtype == torch.float64 for r in rs) else torch.float32
    out: list[torch.Tensor | None] = [None] * len(rs)
    for members, x in _equal_length_groups([r.to(acc) for r in rs]):
        for k, row in zip(members, spread_rows(x), strict=True):
            out[k] = row
    return torch.stack(out)  # type: ignore[arg-type]


def log_histogram(r: torch.Tensor, bins: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Histogram of ``r`` on log-spaced edges computed on device: ``(edges, counts)``.

    ``edges`` has ``bins + 1`` entries, log-spaced from the smallest positive finite value
    ``lo`` to the largest finite value ``hi`` (``edges[0] == lo`` and ``edges[-1] == hi``
    exactly). ``counts`` has ``bins + 1`` entries (accumulation dtype, exact below 2**24):

    - ``counts[0]``: the underflow bucket, entries ``<= 0`` (zeros: dead units);
    - ``counts[j]``, ``j = 1..bins``: entries in ``[edges[j-1], edges[j])``, the last bucket
      closed (``hi`` lands in it), as ``numpy.histogram`` does;
    - NaN/Inf entries are not counted anywhere.

    ``len(edges) == len(counts)``, so they are directly TensorBoard's raw-histogram
    ``bucket_limits`` (right edges) and ``bucket_counts``: the underflow bucket's right limit
    is ``lo``. :func:`histogram_moments` gives the ``min/max/num/sum/sum_squares`` it also
    wants. When ``r`` has a single distinct positive value, the edges span ``[lo, lo * e]``;
    with no positive value they span ``[1, e]`` and only the underflow bucket counts.
    """
    edges, counts = _log_histogram_rows(r.reshape(1, -1), bins)
    return edges[0], counts[0]


def log_histograms(rs: Sequence[torch.Tensor], bins: int = 32
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`log_histogram` of several vectors, those of equal length binned together (a
    model has few distinct layer widths): one kernel sequence per length, not per vector."""
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(rs)
    for members, x in _equal_length_groups(rs):
        edges, counts = _log_histogram_rows(x, bins)
        for j, k in enumerate(members):
            out[k] = (edges[j], counts[j])
    return out  # type: ignore[return-value]


def _equal_length_groups(rs: Sequence[torch.Tensor]) -> list[tuple[list[int], torch.Tensor]]:
    """``(indices, stacked rows)`` per distinct length of the flattened vectors ``rs``."""
    groups: dict[int, list[int]] = {}
    for k, r in enumerate(rs):
        groups.setdefault(r.numel(), []).append(k)
    return [(members, torch.stack([rs[k].reshape(-1) for k in members]))
            for members in groups.values()]


def _log_histogram_rows(x: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`log_histogram` of every row of ``x`` (``(G, N)``): ``(G, bins + 1)`` twice."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins!r}")
    acc = accumulation_dtype(x.dtype)
    x = x.to(acc)
    G, dev = x.shape[0], x.device
    finite = torch.isfinite(x)
    pos = finite & (x > 0)
    inf = torch.full((), math.inf, dtype=acc, device=dev)
    one = torch.ones((), dtype=acc, device=dev)
    if x.shape[1]:
        lo = torch.where(pos, x, inf).amin(dim=1)
        hi = torch.where(pos, x, -inf).amax(dim=1)
    else:
        lo, hi = inf.expand(G), (-inf).expand(G)
    has_pos = torch.isfinite(lo)
    lo = torch.where(has_pos, lo, one)
    hi = torch.where(has_pos, hi, one)
    log_lo, log_hi = lo.log(), hi.log()
    span = torch.where(log_hi > log_lo, log_hi - log_lo, one)
    t = torch.linspace(0.0, 1.0, bins + 1, dtype=acc, device=dev)
    inner = torch.exp(log_lo.unsqueeze(1) + span.unsqueeze(1) * t[1:-1])
    last = torch.where(hi > lo, hi, torch.exp(log_lo + span))
    edges = torch.cat([lo.unsqueeze(1), inner, last.unsqueeze(1)], dim=1)
    edges = torch.cummax(edges, dim=1).values  # monotone even under exp rounding
    edges = torch.cat([edges[:, :-1], torch.maximum(edges[:, -1], last).unsqueeze(1)], dim=1)
    # 1..bins for positive entries (searchsorted's right=True is bucketize's right=True)
    idx = torch.searchsorted(edges[:, 1:-1].contiguous(), x, right=True) + 1
    idx = torch.where(pos, idx, torch.zeros_like(idx))  # non-positive -> underflow bucket 0
    idx = torch.where(finite, idx, torch.full_like(idx, bins + 1))  # non-finite -> dropped
    counts = torch.zeros(G, bins + 2, dtype=acc, device=dev)
    counts.scatter_add_(1, idx, torch.ones_like(x))
    return edges, counts[:, : bins + 1]


def histogram_moments(r: torch.Tensor) -> torch.Tensor:
    """``(5,)`` tensor ``[min, max, num, sum, sum_squares]`` over the finite entries of ``r``.

    What TensorBoard's raw histogram wants besides the buckets; min/max are NaN when no entry
    is finite.
    """
    return _histogram_moments_rows(r.reshape(1, -1))[0]


def histograms_moments(rs: Sequence[torch.Tensor]) -> torch.Tensor:
    """:func:`histogram_moments` of several vectors, stacked: ``(L, 5)``."""
    out: list[torch.Tensor | None] = [None] * len(rs)
    for members, x in _equal_length_groups(rs):
        for k, row in zip(members, _histogram_moments_rows(x), strict=True):
            out[k] = row
    return torch.stack(out)  # type: ignore[arg-type]


def _histogram_moments_rows(x: torch.Tensor) -> torch.Tensor:
    acc = accumulation_dtype(x.dtype)
    x = x.to(acc)
    finite = torch.isfinite(x)
    inf = torch.full((), math.inf, dtype=acc, device=x.device)
    num = finite.sum(dim=1).to(acc)
    x0 = torch.where(finite, x, torch.zeros((), dtype=acc, device=x.device))
    if x.shape[1]:
        mn = torch.where(finite, x, inf).amin(dim=1)
        mx = torch.where(finite, x, -inf).amax(dim=1)
    else:
        mn, mx = inf.expand(x.shape[0]), (-inf).expand(x.shape[0])
    nan = torch.full((), math.nan, dtype=acc, device=x.device)
    mn = torch.where(num > 0, mn, nan)
    mx = torch.where(num > 0, mx, nan)
    return torch.stack([mn, mx, num, x0.sum(dim=1), x0.square().sum(dim=1)], dim=1)
