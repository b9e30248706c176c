"""Per-example squared gradient norms of ``Linear`` / GPT-2 ``Conv1D`` / ``Embedding`` layers
from their inputs ``A`` and output gradients ``D``, without per-example gradients:
``q_b = ||D_b^T A_b||^2`` (:func:`per_example_sq_norms_linear`,
:func:`per_example_sq_norms_embedding`, :func:`per_example_sq_norms_bias`, the cross terms of a
module called twice :func:`per_example_cross_linear`), and the within-batch trace
:func:`within_batch_trace`. Notation and the scaling rules (the loss reduction's factors):
:mod:`gradlens.stats.variance`. Norm gains: :mod:`gradlens.stats.per_example_vector`.

Every function is pure and host-sync free: python numbers only come from shapes and arguments,
and there is no branch on tensor data.
"""

from __future__ import annotations

import torch

from gradlens.stats.norms import accumulation_dtype, finite_copy

__all__ = [
    "DEFAULT_CHUNK_ELEMS",
    "choose_per_example_method",
    "per_example_cross_linear",
    "per_example_sq_norms_bias",
    "per_example_sq_norms_embedding",
    "per_example_sq_norms_linear",
    "token_grams",
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
