"""Float64 reference of the two-batch estimators from the micro-batch gradients a run's own
hooks saw, with the perturbation bounds the golden comparisons rest on.

``grads[k]`` is what backward pass k added to ``p.grad`` (``h_k = lam v_k G_k``, the table of
``gradlens.families.twobatch``; ``lam = B`` for ``sum``, else 1; ``v_k = 1/K`` for ``mean``, else
``b_k/B``); ``c = sum_k v_k^2 / b_k``. Then, with ``A = sum_k b_k ||G_k||^2`` and
``y = ||G||^2 = ||sum_k h_k||^2 / lam^2``:

    twobatch_trace T = (A - B y) / (K - B c),   twobatch_signal S = y - c T,

and the same per output unit (``A_i``, ``y_i``) for ``unit_nsr_median/mean`` (median and mean of
``T_i / S_i`` over the units with ``S_i > 0``).

Perturbation bounds. If every gradient entry moves by a relative ``d`` at most, ``A`` and ``y``
(sums of squares) move by ``2d`` relative at most, so ``|dT| <= 2d (A + B y) / |K - B c|`` and
``|dS| <= 2d y + c |dT|``: the condition numbers (relative error out per ``2d`` in) are

    kappa_T = (A + B y) / |A - B y|,    kappa_S = (y + c |T| kappa_T) / |S|.

A unit ratio ``T_i / S_i`` lies in the interval of the corners of ``[T_i +- dT_i] / [S_i +-
dS_i]``; a unit whose signal interval contains 0 may be kept or dropped by the sign test, and
its ratio is then unbounded. :func:`nsr_interval` bounds the median over every such choice
(the median is monotone in each entry); the mean is unbounded as soon as one unit is uncertain.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from gradlens.roles import output_units_view


def weights(sizes: Sequence[int], reduction: str) -> tuple[list[float], float, float]:
    """``(v, lam, c)`` of the table above (written out again: the reference is independent)."""
    K, B = len(sizes), float(sum(sizes))
    lam = B if reduction == "sum" else 1.0
    v = [1.0 / K] * K if reduction == "mean" else [b / B for b in sizes]
    return v, lam, sum(vk * vk / b for vk, b in zip(v, sizes, strict=True))


def _units_sq(g: torch.Tensor, layout: str | None) -> np.ndarray | None:
    if layout in (None, "vector") or g.ndim < 2:
        return None
    return output_units_view(g.double(), layout).pow(2).sum(1).numpy()


def two_batch(grads: Sequence[torch.Tensor], sizes: Sequence[int], reduction: str,
              layout: str | None) -> dict[str, object]:
    """One layer's estimators and bounds at one step (``grads``: the K backward passes' ``h_k``,
    any order of ranks and micro-batches, all of equal weight convention)."""
    v, lam, c = weights(sizes, reduction)
    K, B = len(sizes), float(sum(sizes))
    hs = [g.double() for g in grads]
    coef = [b / (lam * vk) ** 2 for b, vk in zip(sizes, v, strict=True)]  # b_k ||G_k||^2
    total = sum(hs[1:], hs[0].clone())
    A = sum(w * float(h.pow(2).sum()) for w, h in zip(coef, hs, strict=True))
    y = float(total.pow(2).sum()) / lam**2
    T = (A - B * y) / (K - B * c)
    S = y - c * T
    kT = (A + B * y) / abs(A - B * y) if B * y != A else math.inf
    kS = (y + c * abs(T) * kT) / abs(S) if S != 0 else math.inf
    out: dict[str, object] = {"T": T, "S": S, "y": y, "A": A, "kT": kT, "kS": kS, "c": c}
    u_y = _units_sq(total, layout)
    if u_y is not None:
        u_y = u_y / lam**2
        u_A = sum(w * _units_sq(h, layout) for w, h in zip(coef, hs, strict=True))
        u_T = (u_A - B * u_y) / (K - B * c)
        out.update(uT=u_T, uS=u_y - c * u_T,
                   ueT=(u_A + B * u_y) / abs(K - B * c),  # |dT_i| per 2d
                   ueS=u_y)  # |dS_i| per 2d, before c |dT_i|
    return out


def nsr(uT: np.ndarray, uS: np.ndarray) -> tuple[float, float]:
    """``(median, mean)`` of ``T_i / S_i`` over the units with ``S_i > 0`` (NaN if none)."""
    ok = np.isfinite(uT) & np.isfinite(uS) & (uS > 0)
    if not ok.any():
        return math.nan, math.nan
    r = uT[ok] / uS[ok]
    return float(np.median(r)), float(np.mean(r))


def nsr_interval(ref: Mapping[str, object], d: float) -> tuple[tuple[float, float],
                                                               tuple[float, float]]:
    """Bounds ``((med_lo, med_hi), (mean_lo, mean_hi))`` of the unit noise-to-signal summaries
    when every gradient entry moves by ``d`` relative at most (``+-inf`` where unbounded)."""
    uT, uS = np.asarray(ref["uT"]), np.asarray(ref["uS"])
    eT = 2 * d * np.asarray(ref["ueT"])
    eS = 2 * d * np.asarray(ref["ueS"]) + ref["c"] * eT  # type: ignore[operator]
    t_lo, t_hi, s_lo, s_hi = uT - eT, uT + eT, uS - eS, uS + eS
    sure = s_lo > 0  # kept whatever the rounding
    unsure = (s_hi > 0) & ~sure  # kept or dropped
    with np.errstate(divide="ignore", invalid="ignore"):
        corners = np.stack([t_lo / s_lo, t_lo / s_hi, t_hi / s_lo, t_hi / s_hi])
    r_lo, r_hi = corners.min(0)[sure], corners.max(0)[sure]
    # an unsure unit: dropped, or kept with S_i -> 0+ (ratio -> +inf if T_i > 0, -inf if < 0)
    neg = np.full(int((unsure & (t_lo < 0)).sum()), -math.inf)
    pos = np.full(int((unsure & (t_hi > 0)).sum()), math.inf)
    lo_set, hi_set = np.concatenate([r_lo, neg]), np.concatenate([r_hi, pos])
    if not lo_set.size or not hi_set.size:
        med = (-math.inf, math.inf) if unsure.any() or sure.any() else (math.nan, math.nan)
        return med, med
    with np.errstate(invalid="ignore"):
        med = (float(np.median(lo_set)), float(np.median(hi_set)))
    if unsure.any():
        return med, (-math.inf, math.inf)
    return med, (float(np.mean(r_lo)), float(np.mean(r_hi)))


def interval_cond(value: float, lo: float, hi: float, d: float) -> float:
    """The condition number that makes ``value +- cond * 2d |value|`` cover ``[lo, hi]``."""
    if math.isnan(value):
        return 1.0
    if not (math.isfinite(lo) and math.isfinite(hi)) or value == 0:
        return math.inf
    return max(hi - value, value - lo, 0.0) / (2 * d * abs(value))


def ema_ratio(num: Sequence[tuple[float, float]], den: Sequence[tuple[float, float]],
              beta: float) -> tuple[float, float]:
    """``(EMA(num) / EMA(den), condition)`` over the steps where both are finite (the lens's
    ratio of EMAs, ``gradlens.stats.ema_ratio_update``; NaN where no step counted or
    ``EMA(den) <= 0``). ``num``, ``den``: per step ``(value, its condition number)``."""
    en = ed = bn = bd = 0.0
    seen = False
    for (n, kn), (s, ks) in zip(num, den, strict=True):
        if not (math.isfinite(n) and math.isfinite(s)):
            continue
        seen = True
        en, ed = beta * en + (1 - beta) * n, beta * ed + (1 - beta) * s
        bn, bd = beta * bn + (1 - beta) * abs(n) * kn, beta * bd + (1 - beta) * abs(s) * ks
    if not seen or ed <= 0:
        return math.nan, 1.0
    return en / ed, (bn / abs(en) if en else math.inf) + bd / ed
