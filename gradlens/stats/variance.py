"""Gradient-variance estimators (methods.md section 4), as pure tensor functions.

Notation: for one layer, ``g_b`` is the gradient of example ``b``'s own loss, ``G = mean_b g_b``
the batch gradient over ``n`` examples, ``Sigma`` the per-example covariance, so that
``E||G_B||**2 = ||G_true||**2 + tr(Sigma) / B`` for ``B`` i.i.d. examples.

Contents:

- per-example squared gradient norms of ``Linear`` / GPT-2 ``Conv1D`` / ``Embedding`` layers
  from their inputs and output gradients, without per-example gradients
  (:func:`per_example_sq_norms_linear`, :func:`per_example_sq_norms_embedding`,
  :func:`per_example_sq_norms_bias`), and the within-batch trace :func:`within_batch_trace`;
- the two-batch-size estimator of McCandlish et al. (:func:`two_batch_estimates`; its per-unit
  form: :mod:`gradlens.stats.unit_noise`), with ratio-of-EMAs smoothing (:func:`ema_update`,
  :func:`ema_debiased`, :func:`ema_ratio_update`);
- temporal variance across steps, exact or through a count sketch (:func:`temporal_init`,
  :func:`temporal_update_`, :func:`temporal_readout`, :func:`temporal_step`).

Scaling, the one thing to get right (all estimators assume *per-example-loss* gradients):

- A mean-reduced loss over ``B`` examples hands backward hooks ``1/B`` of each example's
  gradient: multiply per-example squared norms by ``B**2`` (and, with ``K`` accumulated
  micro-batches whose losses are divided by ``K``, by ``(K B)**2``) before
  :func:`within_batch_trace`. A token-mean loss over ``N`` tokens hands ``1/N`` of each
  token's gradient: multiply by ``N**2`` to get the gradient of the per-example *sum* of token
  losses, or by ``(N / T_b)**2`` for the per-example *mean*; say which.
- The two-batch estimator wants each batch's *mean* gradient: a micro-batch hook sees ``G_s/K``
  under a ``1/K``-scaled accumulated loss: multiply its squared norm by ``K**2``.
- Under AMP, divide squared norms by the loss scale squared unless read after unscaling.
- Noise scales (ratios of a trace to a squared norm) are invariant to a common factor; raw
  traces are not (and favour big tensors: use the per-element or per-unit forms to compare
  layers).

Every function is pure and host-sync free: python numbers only come from shapes and arguments,
and there is no branch on tensor data.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch

from gradlens.stats.columns import unit_sq_norms_propagating
from gradlens.stats.norms import accumulation_dtype, finite_copy

__all__ = [
    "DEFAULT_CHUNK_ELEMS",
    "choose_per_example_method",
    "ema_debiased",
    "ema_ratio_update",
    "ema_update",
    "per_example_sq_norms_bias",
    "per_example_sq_norms_embedding",
    "per_example_sq_norms_linear",
    "sketch_apply",
    "temporal_init",
    "temporal_readout",
    "temporal_step",
    "temporal_update_",
    "token_grams",
    "two_batch_estimates",
    "within_batch_trace",
]

#: Largest temporary (in elements) the per-example kernels create per chunk (128 MiB float32).
DEFAULT_CHUNK_ELEMS = 1 << 25

_METHODS = ("auto", "gram", "direct")


# ----------------------------------------------------------------------------- per-example norms


def _btf(x: torch.Tensor) -> torch.Tensor:
    """(B, ..., F) -> (B, T, F) in the accumulation dtype (T = 1 for (B, F))."""
    return x.reshape(x.shape[0], -1, x.shape[-1]).to(accumulation_dtype(x.dtype))


def choose_per_example_method(seq_len: int, fan_in: int, fan_out: int,
                               input_gram: bool = False) -> str:
    """``"gram"`` or ``"direct"``, whichever needs fewer multiply-adds for a Linear layer.

    Gram: two ``T x T`` Gram matrices per example, ``~T**2 (in + out)``, or only the output
    one, ``~T**2 out``, when the inputs' Gram is at hand (``input_gram``: layers reading the
    same input share it, see :func:`token_grams`); direct: the per-example gradient
    ``D^T A``, ``~T in out``. Ties go to Gram, whose small products run faster than direct's
    ``out x in`` per-example gradients. Python ints only (shapes): no synchronization.
    """
    gram = seq_len * (fan_out if input_gram else fan_in + fan_out)
    return "gram" if gram <= fan_in * fan_out else "direct"


def token_grams(x: torch.Tensor) -> torch.Tensor:
    """Per-example Gram matrices of a layer's inputs, ``X_b X_b^T``: ``(B, T, T)``.

    ``x``: ``(B, T, in)``, ``(B, in)`` or ``(B, ..., in)`` (middle dims are tokens), in the
    accumulation dtype. Layers that read the same input (a block's query/key/value
    projections, an MLP's gate and up projections) can share it through the ``a_gram``
    argument of :func:`per_example_sq_norms_linear`.
    """
    x3 = _btf(x)
    return torch.bmm(x3, x3.transpose(1, 2))


def _check_method(method: str) -> None:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")


def _gram_blocks(T: int, max_elems: int) -> tuple[int, int]:
    """(rows per time block, examples per chunk) keeping two (bc, tb, T) blocks in budget."""
    if max_elems >= 2 * T * T:
        return T, max(1, max_elems // (2 * T * T))
    return max(1, max_elems // (2 * T)), 1


def _gram_sq_norms(a: torch.Tensor, d: torch.Tensor, max_elems: int,
                   a_gram: torch.Tensor | None = None) -> torch.Tensor:
    """sum_{t,t'} (A A^T)_{tt'} (D D^T)_{tt'} per example, chunked over examples and rows
    (``a_gram``: ``A A^T`` already computed, read block by block, never written)."""
    B, T, _ = a.shape
    tb, bc = _gram_blocks(T, max_elems)
    out = []
    for b0 in range(0, B, bc):
        ab, db = a[b0:b0 + bc], d[b0:b0 + bc]
        acc = None
        for t0 in range(0, T, tb):
            if a_gram is None:
                ga = torch.bmm(ab[:, t0:t0 + tb], ab.transpose(1, 2))  # (bc, tb, T)
            else:
                ga = a_gram[b0:b0 + bc, t0:t0 + tb]
            gd = torch.bmm(db[:, t0:t0 + tb], db.transpose(1, 2))
            part = gd.mul_(ga).sum(dim=(1, 2))
            acc = part if acc is None else acc + part
        out.append(acc)
    return torch.cat(out)


def _direct_sq_norms(a: torch.Tensor, d: torch.Tensor, max_elems: int) -> torch.Tensor:
    """||D_b^T A_b||_F**2 per example, materializing at most ``max_elems`` gradient entries."""
    B, _, fin = a.shape
    fout = d.shape[-1]
    if fin * fout <= max_elems:
        ob, bc = fout, max(1, max_elems // (fin * fout))
    else:
        ob, bc = max(1, max_elems // fin), 1
    out = []
    for b0 in range(0, B, bc):
        ab, db = a[b0:b0 + bc], d[b0:b0 + bc]
        acc = None
        for o0 in range(0, fout, ob):
            gb = torch.bmm(db[:, :, o0:o0 + ob].transpose(1, 2), ab)  # (bc, ob, in)
            part = gb.square_().sum(dim=(1, 2))
            acc = part if acc is None else acc + part
        out.append(acc)
    return torch.cat(out)


def per_example_sq_norms_linear(
    a: torch.Tensor,
    d: torch.Tensor,
    method: str = "auto",
    *,
    max_chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    a_gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-example squared Frobenius norms of a Linear (or GPT-2 Conv1D) weight gradient.

    For example ``b`` with layer inputs ``A_b`` (``T x in``) and output gradients ``D_b``
    (``T x out``, the gradient of the loss w.r.t. the layer's output), the weight gradient is
    ``D_b^T A_b`` (``out x in``; its transpose for Conv1D, same norm), and

        ||D_b^T A_b||_F**2 = sum_{t,t'} (A_b A_b^T)_{tt'} (D_b D_b^T)_{tt'}

    (Goodfellow 2015 for T = 1; the sequence form as in BackPACK's ``BatchL2Grad`` and
    Li et al. 2022's "ghost clipping"). ``method="gram"`` uses the right side (cost ~``T**2
    (in + out)``), ``"direct"`` forms ``D_b^T A_b`` chunk by chunk (~``T in out``), ``"auto"``
    picks the cheaper from the shapes (:func:`choose_per_example_method`). No per-example
    gradient is ever held whole unless it fits ``max_chunk_elems``. With one token per example
    (``(B, in)`` inputs) every method reduces to the closed form ``||a_b||**2 ||d_b||**2``.

    Args:
        a: inputs, ``(B, T, in)``, ``(B, in)`` or ``(B, ..., in)`` (middle dims are tokens).
        d: output gradients with the same leading dims, ``(..., out)``.
        method: ``"auto"`` | ``"gram"`` | ``"direct"``.
        max_chunk_elems: bound on the temporaries (Gram blocks or gradient slices).
        a_gram: :func:`token_grams` of ``a``, when already computed for another layer reading
            the same input; ``"auto"`` then costs the Gram method ``T**2 out`` only.

    Returns:
        ``(B,)`` in float32 (float64 for float64 inputs). An example whose inputs or gradients
        hold NaN/Inf gets a non-finite entry (only that example: every chunk is per example);
        :func:`gradlens.stats.norms.finite_sum` skips it.

    Pitfalls: ``d`` carries the loss reduction. With a mean over ``B`` examples (or over ``N``
    tokens) every ``D_b`` is ``1/B`` (``1/N``) of the per-example-loss gradient, and with
    ``K`` accumulated micro-batches a further ``1/K``; AMP multiplies it by the loss scale.
    Multiply the result by the square of the undoing factor. The bias gradient is separate:
    :func:`per_example_sq_norms_bias`.
    """
    _check_method(method)
    if a.ndim < 2 or d.ndim < 2 or a.shape[:-1] != d.shape[:-1]:
        raise ValueError(
            "per_example_sq_norms_linear needs a (B, ..., in) and d (B, ..., out) with equal "
            f"leading dims, got {tuple(a.shape)} and {tuple(d.shape)}"
        )
    acc = torch.promote_types(accumulation_dtype(a.dtype), accumulation_dtype(d.dtype))
    a3, d3 = _btf(a).to(acc), _btf(d).to(acc)
    T, fin, fout = a3.shape[1], a3.shape[2], d3.shape[2]
    if a_gram is not None and tuple(a_gram.shape) != (a3.shape[0], T, T):
        raise ValueError(f"a_gram must be the (B, T, T) = {(a3.shape[0], T, T)} token Gram "
                         f"matrices of a, got {tuple(a_gram.shape)}")
    if T == 1:  # rank-one per-example gradient: ||a_b||^2 ||d_b||^2
        return a3[:, 0].square().sum(-1) * d3[:, 0].square().sum(-1)
    if method == "auto":
        method = choose_per_example_method(T, fin, fout, input_gram=a_gram is not None)
    if method == "gram":
        return _gram_sq_norms(a3, d3, max_chunk_elems,
                              None if a_gram is None else a_gram.to(acc))
    return _direct_sq_norms(a3, d3, max_chunk_elems)


def per_example_cross_linear(a1: torch.Tensor, d1: torch.Tensor, a2: torch.Tensor,
                             d2: torch.Tensor) -> torch.Tensor:
    """Per-example inner products ``<D1_b^T A1_b, D2_b^T A2_b>_F`` of two calls of one Linear
    layer, ``(B,)``: ``sum_{t,s} (A1_b A2_b^T)_{ts} (D1_b D2_b^T)_{ts}``.

    A module called twice in a forward (shared weights) has the per-example gradient
    ``D1^T A1 + D2^T A2``, whose squared norm is the two calls' own squared norms
    (:func:`per_example_sq_norms_linear`) plus twice this cross term. Cost
    ``~T1 T2 (in + out)`` per example; no per-example gradient is formed.
    """
    acc = torch.promote_types(accumulation_dtype(a1.dtype), accumulation_dtype(d1.dtype))
    a1, d1, a2, d2 = (_btf(x).to(acc) for x in (a1, d1, a2, d2))
    return (torch.bmm(a1, a2.transpose(1, 2)) * torch.bmm(d1, d2.transpose(1, 2))).sum((1, 2))


def per_example_sq_norms_bias(d: torch.Tensor,
                              token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example squared norms of a bias gradient: ``||sum_t d_bt||**2``, ``(B,)``.

    Any bias added to a module output (``Linear``, GPT-2 ``Conv1D``, ``LayerNorm``): the bias
    gradient of example ``b`` is the sum over its tokens of the output gradient ``d_bt``.
    ``d``: output gradients ``(B, T, out)``, ``(B, out)`` or ``(B, ..., out)``. Padded tokens
    whose labels are ``-100`` get a zero output gradient and drop out by themselves;
    ``token_mask`` (``(B, ...)``, 1 = keep) is for losses that do not zero them. Same scaling
    pitfalls as :func:`per_example_sq_norms_linear`.
    """
    if token_mask is not None:
        if tuple(token_mask.shape) != tuple(d.shape[:-1]):
            raise ValueError(f"token_mask must have the token shape {tuple(d.shape[:-1])} of d, "
                             f"got {tuple(token_mask.shape)}")
        d = d * token_mask.unsqueeze(-1).to(d.dtype)
    d3 = _btf(d)
    return d3.sum(dim=1).square().sum(dim=-1)


def _embedding_gram(ids: torch.Tensor, d: torch.Tensor, max_elems: int) -> torch.Tensor:
    B, T, _ = d.shape
    tb, bc = _gram_blocks(T, max_elems)
    out = []
    for b0 in range(0, B, bc):
        ib, db = ids[b0:b0 + bc], d[b0:b0 + bc]
        acc = None
        for t0 in range(0, T, tb):
            gd = torch.bmm(db[:, t0:t0 + tb], db.transpose(1, 2))  # (bc, tb, T)
            same = ib[:, t0:t0 + tb, None] == ib[:, None, :]
            part = torch.where(same, gd, torch.zeros((), dtype=gd.dtype, device=gd.device))
            part = part.sum(dim=(1, 2))
            acc = part if acc is None else acc + part
        out.append(acc)
    return torch.cat(out)


def _embedding_direct(ids: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Sort each example's ids, sum d over runs of equal ids, square: O(B T (dim + log T))."""
    B, T, dim = d.shape
    sorted_ids, perm = torch.sort(ids, dim=1)
    ds = d.gather(1, perm.unsqueeze(-1).expand(B, T, dim))
    new = torch.ones_like(sorted_ids, dtype=torch.bool)
    new[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    seg = torch.cumsum(new.long(), dim=1) - 1  # run index within the example, in [0, T)
    seg = seg + torch.arange(B, device=d.device).unsqueeze(1) * T
    sums = torch.zeros(B * T, dim, dtype=d.dtype, device=d.device)
    sums.index_add_(0, seg.reshape(-1), ds.reshape(-1, dim))
    return sums.square().sum(dim=-1).reshape(B, T).sum(dim=1)


def per_example_sq_norms_embedding(
    ids: torch.Tensor,
    d: torch.Tensor,
    method: str = "auto",
    *,
    padding_idx: int | None = None,
    max_chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> torch.Tensor:
    """Per-example squared norms of an ``nn.Embedding`` weight gradient.

    Example ``b``'s gradient is ``sum_t onehot(ids_bt) d_bt^T`` (``vocab x dim``): rows of
    repeated tokens add up. Its squared Frobenius norm is the Linear formula with one-hot
    inputs, whose Gram matrix is the "same token" mask:

        ||G_b||_F**2 = sum_{t,t'} [ids_bt == ids_bt'] <d_bt, d_bt'>

    ``method="gram"`` evaluates that (cost ``~T**2 dim``); ``"direct"`` sorts each example's
    ids and sums ``d`` over runs of equal ids (``~T (dim + log T)``, one ``(B T, dim)``
    temporary); ``"auto"`` uses the Gram form only for ``T <= 16`` (where one batched matmul
    beats the sort on CPU and GPU alike) and the sort otherwise.

    Args:
        ids: token ids ``(B, T)`` (or ``(B,)``, or ``(B, ...)``), integer.
        d: gradient w.r.t. the embedding output, ``(B, T, dim)`` (matching leading dims).
        method: ``"auto"`` | ``"gram"`` | ``"direct"``.
        padding_idx: the module's ``padding_idx``: positions holding it get no gradient in
            PyTorch, so they are dropped here too.
        max_chunk_elems: bound on the Gram temporaries.

    Returns:
        ``(B,)``, float32 (float64 for float64 ``d``). ``scale_grad_by_freq=True`` embeddings
        are not supported (their gradient depends on batch-wide counts). Scaling pitfalls as in
        :func:`per_example_sq_norms_linear`.
    """
    _check_method(method)
    if d.ndim < 2 or tuple(ids.shape) != tuple(d.shape[:-1]):
        raise ValueError(
            "per_example_sq_norms_embedding needs ids (B, ...) and d (B, ..., dim) with "
            f"matching leading dims, got {tuple(ids.shape)} and {tuple(d.shape)}"
        )
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an integer tensor, got {ids.dtype}")
    B = d.shape[0]
    d3 = _btf(d)
    ids2 = ids.reshape(B, -1)
    if padding_idx is not None:
        keep = (ids2 != padding_idx).unsqueeze(-1)
        d3 = torch.where(keep, d3, torch.zeros((), dtype=d3.dtype, device=d3.device))
    T = d3.shape[1]
    if T == 1:
        return d3[:, 0].square().sum(-1)
    if method == "auto":
        method = "gram" if T <= 16 else "direct"
    if method == "gram":
        return _embedding_gram(ids2, d3, max_chunk_elems)
    return _embedding_direct(ids2, d3)


def within_batch_trace(
    per_example_sq: torch.Tensor, batch_grad_sq: torch.Tensor, n: int | None = None
) -> torch.Tensor:
    """Unbiased per-example covariance trace from one batch:

        tr(Sigma) ~ n/(n-1) * (mean_b ||g_b||**2 - ||G||**2),   G = mean_b g_b,

    which equals ``1/(n-1) sum_b ||g_b - G||**2`` exactly (the sample covariance's trace).

    Args:
        per_example_sq: either the per-example squared norms ``||g_b||**2`` (shape ``(n,)``;
            non-finite entries are skipped in the mean) or their mean already (0-d).
        batch_grad_sq: ``||G||**2`` of the *mean* of the same ``g_b`` (0-d, or broadcastable).
        n: number of examples; defaults to ``per_example_sq.shape[0]`` for a vector. Must be
            >= 2. Under data parallelism, the examples of all ranks (mean-reduce the
            ``mean_b ||g_b||**2`` terms across ranks, use the all-reduced ``G``, and pass the
            global ``n``).

    Convention: ``g_b`` is the gradient of example ``b``'s own loss. What hooks see under a
    mean-reduced loss is ``g_b / B`` (and ``p.grad`` is then already ``G``): multiply the
    per-example squared norms by ``B**2`` first (``(K B)**2`` with ``K`` accumulated
    micro-batches of a ``1/K``-scaled loss). Under a sum-reduced loss hooks see ``g_b`` but
    ``p.grad`` is ``sum_b g_b = n G``: divide its squared norm by ``n**2``.
    """
    if per_example_sq.ndim >= 1:
        if n is None:
            n = int(per_example_sq.shape[0])
        c = finite_copy(per_example_sq)
        count = torch.isfinite(per_example_sq).sum(dim=0).to(c.dtype)
        mean_sq = c.sum(dim=0) / count
    else:
        mean_sq = per_example_sq.to(accumulation_dtype(per_example_sq.dtype))
    if n is None or n < 2:
        raise ValueError(f"within_batch_trace needs n >= 2 examples, got n={n!r}")
    return n / (n - 1) * (mean_sq - batch_grad_sq.to(mean_sq.dtype))


# ----------------------------------------------------------------------------- two-batch estimator


def _check_batches(b_small: Any, b_big: Any) -> None:
    if isinstance(b_small, (int, float)) and isinstance(b_big, (int, float)) and not (
        0 < b_small < b_big
    ):
        raise ValueError(
            f"two-batch estimator needs 0 < b_small < b_big, got b_small={b_small!r}, "
            f"b_big={b_big!r}"
        )


def two_batch_estimates(
    small_sq: torch.Tensor,
    big_sq: torch.Tensor,
    b_small: float | torch.Tensor,
    b_big: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """McCandlish et al. (2018, arXiv 1812.06162, appendix A) two-batch-size estimator.

    From ``E||G_B||**2 = |G|**2 + tr(Sigma)/B`` at two batch sizes:

        |G|**2     ~ (B_big |G_big|**2 - B_small |G_small|**2) / (B_big - B_small)
        tr(Sigma)  ~ (|G_small|**2 - |G_big|**2) / (1/B_small - 1/B_big)

    Args:
        small_sq: squared norm of a small-batch *mean* gradient; to reduce noise, the mean over
            the ``K`` small batches (micro-batches, or ranks before the all-reduce) of their
            squared norms.
        big_sq: squared norm of the big-batch mean gradient (the accumulated / all-reduced
            one, typically ``B_big = K B_small``).
        b_small, b_big: the two batch sizes (examples, or tokens: pick one and keep it).

    Returns:
        ``(signal, trace)``, elementwise in the inputs' shape: works for per-layer scalars,
        for a stacked ``(L,)`` vector and for per-unit vectors alike
        (:func:`two_batch_unit_estimates`). Both are unbiased but noisy, and either may be
        negative on a single step: smooth numerator and denominator separately
        (:func:`ema_ratio_update`) before dividing. When the small batches partition the big
        one the trace estimate is the unbiased sample-covariance trace of a finite population
        (tested); see the module docstring for the scale of the inputs.
    """
    _check_batches(b_small, b_big)
    acc = torch.promote_types(accumulation_dtype(small_sq.dtype), accumulation_dtype(big_sq.dtype))
    s, g = small_sq.to(acc), big_sq.to(acc)
    signal = (b_big * g - b_small * s) / (b_big - b_small)
    trace = (s - g) / (1.0 / b_small - 1.0 / b_big)
    return signal, trace


# ----------------------------------------------------------------------------- EMA helpers


def ema_update(
    value: torch.Tensor, ema: torch.Tensor, count: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One EMA step ``ema <- beta ema + (1 - beta) value`` where ``value`` is finite.

    Elementwise and functional: returns ``(ema, count)``; non-finite entries of ``value`` leave
    their ``ema`` and ``count`` unchanged (a NaN never enters the average). ``ema`` starts at 0
    and ``count`` (a tensor, broadcast to ``value``'s shape) at 0; read the bias-corrected
    value with :func:`ema_debiased`.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    ok = torch.isfinite(value)
    v = torch.where(ok, value, torch.zeros_like(value)).to(ema.dtype)
    new = torch.where(ok, beta * ema + (1.0 - beta) * v, ema)
    count = torch.broadcast_to(count, new.shape) + ok.to(count.dtype)
    return new, count


def ema_debiased(ema: torch.Tensor, count: torch.Tensor, beta: float) -> torch.Tensor:
    """Bias-corrected EMA ``ema / (1 - beta**count)`` (Adam's correction); NaN where count 0."""
    corr = 1.0 - torch.pow(torch.full_like(ema, beta), count.to(ema.dtype))
    out = ema / torch.where(count > 0, corr, torch.ones_like(corr))
    return torch.where(count > 0, out, torch.full_like(out, math.nan))


def ema_ratio_update(
    num: torch.Tensor,
    den: torch.Tensor,
    ema_num: torch.Tensor,
    ema_den: torch.Tensor,
    count: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ratio of EMAs (not EMA of ratios): the smoothed noise scale ``EMA(trace) / EMA(|G|^2)``.

    McCandlish et al. smooth numerator and denominator separately because single-step
    estimates are noisy and can be negative; a ratio of two noisy terms is biased and
    heavy-tailed, averaging it does not fix that. Both EMAs advance together, only where both
    ``num`` and ``den`` are finite, so their bias corrections are equal and cancel in the
    ratio.

    Returns:
        ``(ratio, ema_num, ema_den, count)``: ``ratio = ema_num / ema_den``, NaN where no update
        happened yet or where ``ema_den <= 0`` (no positive signal: no noise scale). The new
        state is ``(ema_num, ema_den, count)``; ``count`` is broadcast to the inputs' shape
        (start it as a 0-d zero). Debiased values: :func:`ema_debiased`.
    """
    both = torch.isfinite(num) & torch.isfinite(den)
    nan = torch.full_like(num, math.nan)
    ema_num, count_new = ema_update(torch.where(both, num, nan), ema_num, count, beta)
    ema_den, _ = ema_update(torch.where(both, den, nan), ema_den, count, beta)
    ok = (count_new > 0) & (ema_den > 0)
    ratio = ema_num / torch.where(ok, ema_den, torch.ones_like(ema_den))
    ratio = torch.where(ok, ratio, torch.full_like(ratio, math.nan))
    return ratio, ema_num, ema_den, count_new


# ----------------------------------------------------------------------------- temporal variance

_P = (1 << 31) - 1  # Mersenne prime for the universal hash
_SKETCH_CHUNK = 1 << 22


def _hash_params(seed: int) -> tuple[int, int, int, int]:
    rng = random.Random(seed)
    return (rng.randrange(1, _P), rng.randrange(0, _P), rng.randrange(1, _P), rng.randrange(0, _P))


def sketch_apply(
    x: torch.Tensor, sketch_dim: int, seed: int = 0, *, chunk: int = _SKETCH_CHUNK
) -> torch.Tensor:
    """Count sketch ``S x`` of a tensor: a ``(sketch_dim,)`` vector with ``E||S x||**2 = ||x||**2``.

    Entry ``i`` of ``x.reshape(-1)`` goes, multiplied by a sign ``s(i)``, to bucket ``h(i)``:
    ``(S x)_j = sum_{i: h(i) = j} s(i) x_i``. ``h`` and ``s`` come from two seeded
    Carter-Wegman hashes ``((a i + b) mod p)`` with ``p = 2**31 - 1``, evaluated on device
    chunk by chunk from the index (nothing the size of ``x`` is stored, only temporaries of
    ``chunk`` entries). The same ``seed`` gives the same ``S`` on every call, so ``S`` is
    linear across steps: ``S (EMA of g) = EMA of (S g)``.

    Error (Charikar et al. 2002; Weinberger et al. 2009): with pairwise independent signs and
    buckets, ``E||S x||**2 = ||x||**2`` and ``Var ||S x||**2 = (2/k) (||x||**4 - sum_i
    x_i**4) <= 2 ||x||**4 / k``: a relative standard deviation of at most ``sqrt(2/k)``
    (2.2% at k = 4096). The sign here is the hash's low bit, unbiased up to ``1/p``.
    Non-finite entries of ``x`` poison their bucket (callers skip such steps).
    """
    if sketch_dim < 1:
        raise ValueError(f"sketch_dim must be >= 1, got {sketch_dim!r}")
    flat = x.reshape(-1)
    if flat.numel() >= _P:
        raise ValueError(f"count sketch supports tensors below 2**31 - 1 entries, got {flat.numel()}")
    a1, b1, a2, b2 = _hash_params(seed)
    acc = accumulation_dtype(x.dtype)
    out = torch.zeros(sketch_dim, dtype=acc, device=x.device)
    for s in range(0, flat.numel(), chunk):
        idx = torch.arange(s, min(s + chunk, flat.numel()), device=x.device, dtype=torch.int64)
        bucket = torch.remainder(torch.remainder(idx * a1 + b1, _P), sketch_dim)
        sign = 1 - 2 * torch.bitwise_and(torch.remainder(idx * a2 + b2, _P), 1)
        out.index_add_(0, bucket, flat[s:s + idx.numel()].to(acc) * sign.to(acc))
    return out


def temporal_init(
    like: torch.Tensor,
    sketch_dim: int | None = None,
    seed: int = 0,
    normalized: bool = True,
) -> dict[str, Any]:
    """State of the temporal-variance tracker of one tensor (a dict of tensors and ints).

    Keys: ``mean`` (EMA of ``g``, shape of ``like``; or EMA of the count sketch ``S g``,
    ``(sketch_dim,)``), ``sq`` (EMA of ``||g||**2``, 0-d), ``mean_n`` / ``sq_n`` (the same for
    SCALE's normalized gradient ``G / r``, when ``normalized`` and ``like`` is a matrix),
    ``n`` (0-d tensor: updates accepted, i.e. steps with a finite gradient), ``count`` (python
    int: updates attempted, no sync to read), ``beta`` (set by the first update),
    ``sketch_dim``, ``seed``.

    Memory: exact, ``numel`` floats per tracked quantity (2 with ``normalized``); sketched,
    ``sketch_dim`` floats each, whatever the tensor's size. Buffers are float32 (float64 for a
    float64 ``like``) on ``like``'s device.
    """
    acc = accumulation_dtype(like.dtype)
    dev = like.device
    shape = tuple(like.shape) if sketch_dim is None else (int(sketch_dim),)
    if sketch_dim is not None and sketch_dim < 1:
        raise ValueError(f"sketch_dim must be >= 1 or None, got {sketch_dim!r}")
    state: dict[str, Any] = {
        "mean": torch.zeros(shape, dtype=acc, device=dev),
        "sq": torch.zeros((), dtype=acc, device=dev),
        "n": torch.zeros((), dtype=acc, device=dev),
        "count": 0,
        "beta": None,
        "sketch_dim": None if sketch_dim is None else int(sketch_dim),
        "seed": int(seed),
    }
    if normalized and like.ndim >= 2:
        state["mean_n"] = torch.zeros(shape, dtype=acc, device=dev)
        state["sq_n"] = torch.zeros((), dtype=acc, device=dev)
    return state


def _sq(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1)
    return flat.dot(flat) if flat.numel() else flat.new_zeros(())


def temporal_update_(
    state: dict[str, Any], g: torch.Tensor, layout: str | None = None, beta: float = 0.9,
    finite: torch.Tensor | None = None,
) -> None:
    """Advance the temporal-variance state with this step's gradient ``g`` (in place).

    ``m <- beta m + (1-beta) g`` (or of ``S g``), ``q <- beta q + (1-beta) ||g||**2``, and the
    same for SCALE's normalized gradient ``G / max(r, 1e-8)`` (``r`` the per-unit RMS) when
    the state tracks it (``layout`` is then required: ``linear``, ``conv1d``, ``embedding``,
    ``other``). A step whose gradient is not finite (``||g||**2`` is NaN/Inf) changes nothing
    but ``count``: its EMA weight is a device-side 0 (``w = (1-beta) [finite]``), no sync.
    ``beta`` must stay the same across calls (the bias correction assumes it). ``finite``: a
    0-d bool tensor, whether every entry of ``g`` and ``||g||**2`` are finite, when the caller
    knows it already (saves the pass that checks it).

    Cost: one finite copy of ``g`` and a few fused passes (``lerp`` with a 0-d weight;
    ``m_n <- (1-w) m_n + (w/r) G`` as ``mul_`` + ``addcmul_`` with ``w/r`` broadcast per unit;
    ``||G/r||**2 = sum_i ||G_i||**2 / r_i**2`` from the per-unit norms). Exact states make no
    temporary beyond the copy, except on the CPU a squared copy where units are columns
    (``conv1d``, ``embedding``: see :func:`gradlens.stats.unit_sq_norms_propagating`).
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    if state["beta"] is None:
        state["beta"] = float(beta)
    elif state["beta"] != float(beta):
        raise ValueError(f"temporal state was built with beta={state['beta']}, got beta={beta}")
    normalized = "mean_n" in state
    if normalized and layout is None:
        raise ValueError("this temporal state tracks G/r: pass the layer's layout")
    acc = state["mean"].dtype
    if finite is None:
        finite = torch.isfinite(_sq(g.to(acc)))  # False too when a square overflows
    ok = finite.to(acc)
    w = ok * (1.0 - beta)  # 0-d: this step's EMA weight, 0 for a non-finite step
    zero = torch.zeros((), dtype=acc, device=ok.device)
    c = finite_copy(g).to(acc)
    sketch = state["sketch_dim"]
    if normalized:
        rows = c.reshape(c.shape[0], -1)
        by_column = layout in ("conv1d", "embedding")  # units are columns, else rows
        unit_sq = unit_sq_norms_propagating(c, layout)  # c is finite: the masked norms
        fan = rows.shape[0] if by_column else rows.shape[1]
        sq = unit_sq.sum()
    else:
        sq = _sq(c)
    state["mean"].lerp_(c.reshape(state["mean"].shape) if sketch is None
                        else sketch_apply(c, sketch, state["seed"]), w)
    state["sq"].lerp_(torch.where(finite, sq, zero), w)  # 0 * inf would be NaN
    if normalized:
        r = (unit_sq / fan).sqrt().clamp_min(1e-8)
        bshape = (1, -1) if by_column else (-1, 1)  # broadcasts a per-unit vector
        if sketch is None:
            m_n = state["mean_n"].view(rows.shape)
            m_n.mul_(1.0 - w).addcmul_(rows, (w / r).reshape(bshape))
        else:
            state["mean_n"].lerp_(sketch_apply(rows / r.reshape(bshape), sketch, state["seed"]),
                                  w)
        state["sq_n"].lerp_(torch.where(finite, (unit_sq / r.square()).sum(), zero), w)
    state["n"].add_(ok)
    state["count"] += 1


def _variance(q: torch.Tensor, m_sq: torch.Tensor, n: torch.Tensor, beta: float,
              unbiased: bool) -> tuple[torch.Tensor, torch.Tensor]:
    bc = 1.0 - torch.pow(torch.full_like(n, beta), n)
    safe_bc = torch.where(n > 0, bc, torch.ones_like(bc))
    q_hat = q / safe_bc
    m2_hat = m_sq / safe_bc.square()
    var = q_hat - m2_hat
    signal = m2_hat
    if unbiased:
        # sum of the squared normalized EMA weights after n steps
        s2 = (1 - beta) * (1 + (1.0 - bc)) / ((1 + beta) * safe_bc)
        ok = n >= 2
        var = var / torch.where(ok, 1 - s2, torch.ones_like(s2))
        signal = m2_hat - s2 * var
        nan = torch.full_like(var, math.nan)
        return torch.where(ok, var, nan), torch.where(ok, signal, nan)
    nan = torch.full_like(var, math.nan)
    return torch.where(n > 0, var, nan), torch.where(n > 0, signal, nan)


def temporal_readout(
    state: dict[str, Any], unbiased: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Temporal variance across steps: ``(var, mean_sq, var_normalized)``, three 0-d tensors.

    With EMA weights ``w_s`` (normalized to sum 1 by the bias correction ``1 - beta**n``):

        var     = E_w||g||**2 - ||E_w g||**2  =  sum_s w_s ||g_s - E_w g||**2
        mean_sq = ||E_w g||**2

    and ``var_normalized`` is ``var`` for SCALE's ``G / r`` (NaN if not tracked). Divide
    ``var`` by ``numel`` for a per-element value, by ``mean_sq`` for a temporal noise scale.

    ``unbiased=True`` (default) corrects for the finite effective window: for i.i.d. steps
    ``E[var] = (1 - sum_s w_s**2) tr(Sigma)``, so ``var`` is divided by ``1 - sum w**2`` (the
    reliability-weights correction; ``sum w**2 = (1-beta)(1+beta**n) / ((1+beta)(1-beta**n))``,
    1 at n = 1, ``(1-beta)/(1+beta)`` in steady state) and ``mean_sq`` becomes the unbiased
    ``||E_w g||**2 - sum w**2 var`` (it may then be <= 0 when the signal is weak). All NaN
    before two accepted steps (one before the first with ``unbiased=False``).

    Sketched states replace ``||E_w g||**2`` by ``||S E_w g||**2``: unbiased, with standard
    deviation at most ``sqrt(2/k) ||E_w g||**2`` (see :func:`sketch_apply`), so the error of
    ``var`` is about ``sqrt(2/k) / temporal_noise_scale`` relative to ``var``.

    Precision: ``var`` is a difference of two accumulated squares; in float32 its absolute
    error is about ``1e-7 ||E_w g||**2`` (harmless unless the temporal noise scale is below
    ~1e-5; use a float64 state for such cases).

    Scale: ``var`` scales with the square of the gradient (loss reduction, ``1/K`` accumulation
    factors, AMP scale); ``var_normalized`` does not (``G / r`` has unit RMS per unit).
    """
    beta = state["beta"]
    n = state["n"]
    nan = torch.full((), math.nan, dtype=n.dtype, device=n.device)
    if beta is None:
        return nan, nan, nan
    m = state["mean"]
    var, signal = _variance(state["sq"], _sq(m), n, beta, unbiased)
    if "mean_n" in state:
        var_n, _ = _variance(state["sq_n"], _sq(state["mean_n"]), n, beta, unbiased)
    else:
        var_n = nan
    return var, signal, var_n


def temporal_step(
    state: dict[str, Any], g: torch.Tensor, layout: str | None = None, beta: float = 0.9,
    unbiased: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`temporal_update_` then :func:`temporal_readout`: ``(var, mean_sq, var_normalized)``."""
    temporal_update_(state, g, layout, beta)
    return temporal_readout(state, unbiased)

