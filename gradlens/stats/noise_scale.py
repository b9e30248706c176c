"""Gradient noise scale and critical batch size readout (McCandlish et al. 2018, arXiv 1812.06162).

Host-side: works on the per-step values the lens has already logged (numpy arrays), so it may
use numpy and a seeded random generator; it never touches a training process.

Inputs, per step ``t``: an unbiased estimate ``tr_t`` of ``tr(Sigma)`` (the per-example
gradient covariance trace) and ``s_t`` of ``|G|**2`` (the squared norm of the true gradient),
e.g. the lens's per-example pair ``pe_trace`` / ``pe_signal``

    tr_t = B/(B-1) (mean_b |g_b|**2 - |G_B|**2),      s_t = |G_B|**2 - tr_t / B,

or the two-batch pair ``twobatch_trace`` / ``twobatch_signal`` (McCandlish et al., arXiv 1812.06162). Either
may be negative on a step (the signal especially, when ``|G|**2 << tr(Sigma)/B``): never drop
or clip such steps, that would bias the readout upward.

- **Smoothed noise scale** (:func:`smoothed_noise_scale`): ``B_simple_t = EMA(tr)_t /
  EMA(s)_t``, the ratio of EMAs, not the EMA of per-step ratios (a ratio of two noisy,
  possibly negative terms is heavy-tailed and biased; averaging ratios does not fix that).
  The two EMAs advance together, so their bias corrections cancel.
- **Readout with an interval** (:func:`noise_scale_readout`): over a window of steps, the ratio
  of means ``R = mean(tr) / mean(s)`` with a percentile interval from a circular block
  bootstrap over steps (pairs ``(tr_t, s_t)`` resampled together, blocks keep the short-range
  autocorrelation of training). Resamples whose mean signal is <= 0 give ``R = +inf`` (no
  detectable signal: the noise scale is unbounded), so the upper bound may be ``inf``.
- **Critical batch size**: ``B_crit ~ B_noise = tr(H Sigma) / (G^T H G)`` (McCandlish et al.,
  eq. 2.7-2.11: the batch size trading training time against compute,
  ``(S/S_min - 1)(E/E_min - 1) = 1``, ``B_crit = E_min / S_min``). ``B_simple = tr(Sigma) /
  |G|**2`` equals ``B_noise`` exactly when the Hessian ``H`` is proportional to the identity;
  otherwise they differ by a problem-dependent factor (McCandlish et al. use ``B_simple`` as
  the practical proxy). ``B_simple`` is in the units of the per-example gradients: examples
  (sequences) for the lens's per-example estimates. It is local in time: it typically grows as
  the loss falls, so read it "at step s" over a short window.

Statistical properties of ``R``: consistent as the number of steps ``n`` grows, with an
``O(1/n)`` ratio bias ``~ R (Var(s_bar)/s_bar**2 - Cov(tr_bar, s_bar)/(tr_bar s_bar))`` and a
relative variance ``~ Var(mean_t z_t) / |G|**4`` where ``z_t = tr_t - R s_t`` (delta method).
Per step, ``Var(s_t) ~ 2 tr(Sigma**2)/B**2 + 4 G^T Sigma G / B``: when ``B << B_simple`` the
signal is buried in noise and many steps are needed (relative error ``~ B_simple / (B sqrt n)``
in the isotropic case). The parameters drift over the window, so ``R`` is an average over it.

Per role (:func:`noise_scale_by_group`): the same from the per-step sums of ``tr`` and ``s``
over a group's layers (traces and squared norms add across disjoint parameter blocks, ratios
do not).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "NoiseScaleReadout",
    "block_length",
    "circular_block_indices",
    "group_sums",
    "lag1_autocorrelation",
    "noise_scale_by_group",
    "noise_scale_readout",
    "ratio_of_means_interval",
    "smoothed_noise_scale",
]

_CHUNK = 2_000_000  # bootstrap indices per chunk (bounds memory on long runs)


@dataclass(frozen=True)
class NoiseScaleReadout:
    """``B_simple`` over a window of steps: ``estimate`` (ratio of means) with its percentile
    interval ``[ci_low, ci_high]`` at level ``ci``, ``smoothed`` (ratio of EMAs at the last
    step, ``step``), the steps used, the bootstrap block length and the mean trace / signal.
    ``estimate`` is ``inf`` when the mean signal is <= 0; everything NaN without steps."""

    estimate: float
    ci_low: float
    ci_high: float
    ci: float
    smoothed: float
    step: int | None
    n_steps: int
    block: int
    mean_trace: float
    mean_signal: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pairs(trace: Any, signal: Any) -> tuple[np.ndarray, np.ndarray]:
    tr = np.asarray(trace, dtype=np.float64).ravel()
    s = np.asarray(signal, dtype=np.float64).ravel()
    if tr.shape != s.shape:
        raise ValueError(f"trace and signal need one length, got {tr.size} and {s.size}")
    return tr, s


def _ratio(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    """num/den where den > 0, +inf where den <= 0 (no positive signal), NaN where NaN."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.inf)
    return np.where(np.isnan(num) | np.isnan(den), np.nan, out)


def smoothed_noise_scale(trace: Any, signal: Any, beta: float = 0.95) -> np.ndarray:
    """Per-step ``EMA(tr)_t / EMA(s)_t`` (ratio of EMAs), ``(n,)``.

    Steps where either value is non-finite leave both EMAs unchanged. NaN before the first
    finite step; ``+inf`` where the smoothed signal is <= 0 (no noise scale yet).
    ``beta = 0`` gives the per-step ratio.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    tr, s = _pairs(trace, signal)
    out = np.full(tr.size, np.nan)
    m_tr = m_s = 0.0
    seen = False
    for t in range(tr.size):
        if math.isfinite(tr[t]) and math.isfinite(s[t]):
            m_tr = beta * m_tr + (1.0 - beta) * tr[t]
            m_s = beta * m_s + (1.0 - beta) * s[t]
            seen = True
        if seen:
            out[t] = float(_ratio(m_tr, m_s))
    return out


def lag1_autocorrelation(x: Any) -> float:
    """Lag-1 autocorrelation ``corr(x[:-1], x[1:])`` (Pearson, as ``numpy.corrcoef``).

    NaN where it is undefined: fewer than 3 values, a constant ``x[:-1]`` or ``x[1:]``, or a
    non-finite value (a caller that needs a number decides what "no estimate" means).
    """
    z = np.asarray(x, dtype=np.float64).reshape(-1)
    if z.size < 3 or not np.isfinite(z).all() or np.ptp(z[:-1]) == 0 or np.ptp(z[1:]) == 0:
        return math.nan
    return float(np.corrcoef(z[:-1], z[1:])[0, 1])


def block_length(trace: Any, signal: Any) -> int:
    """Bootstrap block length for the ratio of means over ``n`` finite steps.

    ``ceil(max(n**(1/3), (1 + r)/(1 - r)))``, where ``r`` (clipped to ``[0, 0.9]``) is the lag-1
    autocorrelation of the linearized statistic ``z_t = tr_t - R s_t``: ``n**(1/3)`` is the
    usual rate for block length, and ``(1 + r)/(1 - r)`` the integrated autocorrelation time of
    an AR(1) series, so blocks span the dependence. Capped at ``max(1, n // 4)``.
    """
    tr, s = _pairs(trace, signal)
    ok = np.isfinite(tr) & np.isfinite(s)
    tr, s = tr[ok], s[ok]
    n = tr.size
    if n < 2:
        return 1
    r_hat = float(_ratio(tr.mean(), s.mean()))
    z = tr - (r_hat if math.isfinite(r_hat) else 0.0) * s
    r = lag1_autocorrelation(z)
    r = min(max(r, 0.0), 0.9) if math.isfinite(r) else 0.0  # no estimate: no dependence
    b = math.ceil(max(n ** (1.0 / 3.0), (1.0 + r) / (1.0 - r)))
    return int(min(b, max(1, n // 4)))


def circular_block_indices(n: int, n_boot: int, block: int,
                           rng: np.random.Generator) -> np.ndarray:
    """``(n_boot, n)`` indices of a circular block bootstrap (Politis and Romano, 1992): each
    replicate strings together blocks of ``block`` consecutive steps (wrapping around) that
    start at uniform random positions, so short-range dependence survives resampling;
    ``block=1`` is the i.i.d. bootstrap. ``block`` is clipped to ``[1, n]``."""
    if n < 1 or n_boot < 1:
        raise ValueError(f"need n >= 1 and n_boot >= 1, got n={n}, n_boot={n_boot}")
    b = max(1, min(int(block), n))
    k = math.ceil(n / b)
    starts = rng.integers(0, n, size=(n_boot, k))
    idx = (starts[:, :, None] + np.arange(b)[None, None, :]).reshape(n_boot, k * b)[:, :n]
    return idx % n


def ratio_of_means_interval(
    trace: Any,
    signal: Any,
    *,
    ci: float = 0.95,
    n_boot: int = 2000,
    block: int | str = "auto",
    seed: int = 0,
) -> tuple[float, float, float, int]:
    """``(R, low, high, block)``: ``R = mean(tr)/mean(s)`` over the finite steps and its
    percentile interval from a circular block bootstrap of the ``(tr_t, s_t)`` pairs.

    ``block="auto"``: :func:`block_length`. Deterministic for a given ``seed``. The bounds are
    order statistics of the replicates (inf-safe: a replicate with mean signal <= 0 is
    ``+inf``). NaNs with fewer than 2 finite steps.
    """
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci!r}")
    if n_boot < 10:
        raise ValueError(f"n_boot must be >= 10, got {n_boot!r}")
    tr, s = _pairs(trace, signal)
    ok = np.isfinite(tr) & np.isfinite(s)
    tr, s = tr[ok], s[ok]
    n = tr.size
    if n < 2:
        return math.nan, math.nan, math.nan, 1
    b = block_length(tr, s) if block == "auto" else int(block)
    if b < 1:
        raise ValueError(f"block must be >= 1 or 'auto', got {block!r}")
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    chunk = max(1, _CHUNK // n)
    for lo in range(0, n_boot, chunk):
        idx = circular_block_indices(n, min(chunk, n_boot - lo), b, rng)
        reps[lo:lo + idx.shape[0]] = _ratio(tr[idx].mean(axis=1), s[idx].mean(axis=1))
    reps.sort()
    alpha = (1.0 - ci) / 2.0
    low = float(reps[math.floor(alpha * (n_boot - 1))])
    high = float(reps[math.ceil((1.0 - alpha) * (n_boot - 1))])
    return float(_ratio(tr.mean(), s.mean())), low, high, b


def noise_scale_readout(
    trace: Any,
    signal: Any,
    *,
    steps: Any = None,
    window: int | None = None,
    beta: float = 0.95,
    ci: float = 0.95,
    n_boot: int = 2000,
    block: int | str = "auto",
    seed: int = 0,
) -> NoiseScaleReadout:
    """``B_simple`` (and so ``B_crit``, see the module docstring) from per-step estimates.

    Args:
        trace, signal: per-step unbiased ``tr(Sigma)`` and ``|G|**2`` estimates, in step order.
        steps: the step numbers (default ``0..n-1``); ``step`` of the result is the last one.
        window: use only the last ``window`` steps (None: all). The noise scale drifts during
            training; a window of a few hundred steps is a local readout.
        beta: EMA factor of ``smoothed``.
        ci, n_boot, block, seed: the bootstrap (:func:`ratio_of_means_interval`).
    """
    tr, s = _pairs(trace, signal)
    st = np.arange(tr.size) if steps is None else np.asarray(steps).ravel()
    if st.size != tr.size:
        raise ValueError(f"steps has {st.size} entries for {tr.size} values")
    if window is not None:
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window!r}")
        tr, s, st = tr[-window:], s[-window:], st[-window:]
    ok = np.isfinite(tr) & np.isfinite(s)
    est, low, high, b = ratio_of_means_interval(tr, s, ci=ci, n_boot=n_boot, block=block,
                                                seed=seed)
    smooth = smoothed_noise_scale(tr, s, beta) if tr.size else np.array([math.nan])
    return NoiseScaleReadout(
        estimate=est, ci_low=low, ci_high=high, ci=ci, smoothed=float(smooth[-1]),
        step=int(st[ok][-1]) if ok.any() else None, n_steps=int(ok.sum()), block=b,
        mean_trace=float(tr[ok].mean()) if ok.any() else math.nan,
        mean_signal=float(s[ok].mean()) if ok.any() else math.nan,
    )


def group_sums(trace: Any, signal: Any, groups: Sequence[str]
               ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-step sums over each group's layers: ``{group: (tr_sum, s_sum)}``.

    ``trace``, ``signal``: ``(steps, layers)``; ``groups[l]`` is layer ``l``'s group (a role).
    A step where any of a group's layers is non-finite is NaN for that group (a partial sum
    would mix different parameter sets across steps).
    """
    tr = np.asarray(trace, dtype=np.float64)
    s = np.asarray(signal, dtype=np.float64)
    if tr.ndim != 2 or tr.shape != s.shape or tr.shape[1] != len(groups):
        raise ValueError(f"need (steps, layers) trace and signal and one group per layer, got "
                         f"{tr.shape}, {s.shape} and {len(groups)} groups")
    out = {}
    for g in dict.fromkeys(groups):
        cols = [i for i, x in enumerate(groups) if x == g]
        out[g] = (tr[:, cols].sum(axis=1), s[:, cols].sum(axis=1))  # NaN propagates
    return out


def noise_scale_by_group(trace: Any, signal: Any, groups: Sequence[str],
                         **kwargs: Any) -> Mapping[str, NoiseScaleReadout]:
    """:func:`noise_scale_readout` of each group's per-step sums (:func:`group_sums`), plus
    ``"all"`` over every layer. ``kwargs`` go to :func:`noise_scale_readout`."""
    sums = group_sums(trace, signal, groups)
    tr = np.asarray(trace, dtype=np.float64)
    s = np.asarray(signal, dtype=np.float64)
    sums["all"] = (tr.sum(axis=1), s.sum(axis=1))
    return {g: noise_scale_readout(a, b, **kwargs) for g, (a, b) in sums.items()}
