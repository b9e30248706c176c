"""Per-unit noise-to-signal ``tr(Sigma_i) / |G_i|^2`` (the two-batch estimator unit by unit),
with a rounding floor on the signal.

A unit's signal estimate is a difference of two non-negative terms: in the two-batch form
``signal = (B_big g - B_small s) / (B_big - B_small)``, in the micro-batch form
(``families.twobatch``) ``signal = (K y - c a) / (K - B c)`` with ``y = ||G_i||^2`` and ``a =
sum_k b_k ||G_k,i||^2``. When the exact signal is 0 (a unit that gets gradient in one
micro-batch only: a ReLU unit active in one, an expert routed in one, a vocabulary row seen
in one) rounding leaves a tiny value of either sign, and the ratio ``trace / signal`` explodes
(1e16 in float64). So a unit is **excluded** where

    signal_i <= FLOOR eps (|term1_i| + |term2_i|) / |denominator|,     FLOOR = 32,

``eps`` the machine epsilon of the dtype the gradients were rounded in (float32: 1.2e-7,
float64: 2.2e-16, bfloat16: 7.8e-3): below that, the signal's sign and size are rounding.
Equivalently, a kept unit has a relative signal ``signal_i / (y_i + c |tr_i|)`` above about
``FLOOR eps``. Host-sync free, static shapes (excluded entries are NaN).
"""

from __future__ import annotations

import math

import torch

from gradlens.stats.columns import sort_rows, sorted_quantile
from gradlens.stats.variance import two_batch_estimates

__all__ = ["FLOOR", "noise_to_signal_summary", "signal_floor", "two_batch_unit_estimates",
           "unit_noise_to_signal", "unit_noise_to_signal_ratios"]

#: Multiple of the machine epsilon below which a per-unit signal is rounding (module docstring).
FLOOR = 32.0


def signal_floor(term1: torch.Tensor, term2: torch.Tensor, denominator: float,
                 dtype: torch.dtype) -> torch.Tensor:
    """``FLOOR eps(dtype) (|term1| + |term2|) / |denominator|``: a signal ``(term1 - term2) /
    denominator`` at or below it is zero within rounding."""
    eps = torch.finfo(dtype).eps
    return FLOOR * eps * (term1.abs() + term2.abs()) / abs(denominator)


def _floor_two_batch(s: torch.Tensor, g: torch.Tensor, b_small, b_big) -> torch.Tensor:
    dtype = torch.promote_types(s.dtype, g.dtype)
    return signal_floor(b_big * g, b_small * s, 1.0, dtype) / (b_big - b_small)


def two_batch_unit_estimates(
    unit_small_sq: torch.Tensor,
    unit_big_sq: torch.Tensor,
    b_small: float | torch.Tensor,
    b_big: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-unit two-batch estimates: ``(signal_i, trace_i)``, each ``(units,)``.

    Inputs are per-unit squared norms (:func:`gradlens.stats.columns.unit_sq_norms`) of the
    small-batch gradients (mean over the small batches) and of the big-batch gradient; the
    math is :func:`gradlens.stats.variance.two_batch_estimates`, applied unit by unit
    (tr(Sigma_i) is the noise in unit ``i``'s slice of the gradient).
    """
    if unit_small_sq.shape != unit_big_sq.shape or unit_small_sq.ndim != 1:
        raise ValueError(
            "two_batch_unit_estimates needs two (units,) vectors of equal length, got "
            f"{tuple(unit_small_sq.shape)} and {tuple(unit_big_sq.shape)}"
        )
    return two_batch_estimates(unit_small_sq, unit_big_sq, b_small, b_big)


def unit_noise_to_signal_ratios(
    unit_small_sq: torch.Tensor,
    unit_big_sq: torch.Tensor,
    b_small: float | torch.Tensor,
    b_big: float | torch.Tensor,
) -> torch.Tensor:
    """Per-unit noise-to-signal ``tr(Sigma_i) / |G_i|**2``, ``(units,)``, NaN where excluded.

    A unit whose signal estimate is not above the rounding floor (module docstring), or not
    finite, has no meaningful ratio: its entry is NaN (static shape; a single step's estimate
    of a small signal is often negative).
    """
    signal, trace = two_batch_unit_estimates(unit_small_sq, unit_big_sq, b_small, b_big)
    floor = _floor_two_batch(unit_small_sq, unit_big_sq, b_small, b_big)
    ok = torch.isfinite(signal) & torch.isfinite(trace) & (signal > floor)
    ratio = trace / torch.where(ok, signal, torch.ones_like(signal))
    return torch.where(ok, ratio, torch.full_like(ratio, math.nan))


def unit_noise_to_signal(
    unit_small_sq: torch.Tensor,
    unit_big_sq: torch.Tensor,
    b_small: float | torch.Tensor,
    b_big: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Median and mean over output units of ``tr(Sigma_i) / |G_i|**2``: ``(median, mean)``.

    Per-unit noise-to-signal along SCALE's axis (arXiv 2506.16659): SCALE normalizes each
    unit separately, so this is the noise its update carries unit by unit (rare-token rows of
    the output layer are the natural suspects). Units whose signal estimate is not above the
    rounding floor (or not finite) are **excluded** (NaN-masked, static shapes); the median
    is numpy's (average of the two middle values), the mean is over the remaining units; both
    NaN when every unit is excluded. Per-unit traces may be negative (unbiased noise): they
    are kept. The fraction of excluded units grows when the signal is weak relative to the
    noise (small batches): read it from :func:`unit_noise_to_signal_ratios`.
    """
    signal, trace = two_batch_unit_estimates(unit_small_sq, unit_big_sq, b_small, b_big)
    return noise_to_signal_summary(trace, signal,
                                   _floor_two_batch(unit_small_sq, unit_big_sq, b_small, b_big))


def noise_to_signal_summary(trace: torch.Tensor, signal: torch.Tensor,
                            floor: torch.Tensor | float = 0.0
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(median, mean)`` over units (the last dimension) of ``trace / signal``, units whose
    signal is not above ``floor`` (:func:`signal_floor`; 0: the sign alone) or not finite
    excluded (see :func:`unit_noise_to_signal`). Rows of a ``(G, N)`` pair are summarized at
    once (one sort for G layers of N units): ``(G,)`` each.
    """
    ok = torch.isfinite(signal) & torch.isfinite(trace) & (signal > floor)
    r = trace / torch.where(ok, signal, torch.ones_like(signal))
    r = torch.where(ok, r, torch.full_like(r, math.nan))
    ok = torch.isfinite(r)
    n = ok.sum(dim=-1).to(r.dtype)
    xs = sort_rows(torch.where(ok, r, torch.full_like(r, math.inf)))
    median = sorted_quantile(xs, n, 0.5)
    mean = torch.where(ok, r, torch.zeros_like(r)).sum(dim=-1) / n
    return median, mean
