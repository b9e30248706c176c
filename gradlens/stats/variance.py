"""Gradient-variance estimators (McCandlish et al., arXiv 1812.06162), as pure tensor functions.

Notation: for one layer, ``g_b`` is the gradient of example ``b``'s own loss, ``G = mean_b g_b``
the batch gradient over ``n`` examples, ``Sigma`` the per-example covariance, so that
``E||G_B||**2 = ||G_true||**2 + tr(Sigma) / B`` for ``B`` i.i.d. examples.

Contents:

- per-example squared gradient norms and the within-batch trace: :mod:`gradlens.stats.per_example`;
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
    "ema_debiased",
    "ema_ratio_update",
    "ema_update",
    "sketch_apply",
    "temporal_init",
    "temporal_readout",
    "temporal_step",
    "temporal_update_",
    "two_batch_estimates",
]

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

