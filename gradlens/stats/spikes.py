"""Spike detectors, vectorized over layers, state kept on device (papers cited per detector).

Every detector is a functional update: it takes this step's values (one per layer, a ``(L,)``
tensor, plus the global entry if the caller appends it) and the previous state tensors, and
returns the flags and the new state. Nothing syncs: the flags are device booleans the collector
transfers with everything else at its flush.

- :func:`zscore_update`: forecast z-score (ZClip's EMA z-score, arXiv 2504.02507, with a
  Holt slope so that early-training trends do not inflate the scale), on ``log ||g||`` by
  convention (scale-free: one threshold fits every layer, and a 100x jump reads the same in
  any layer);
- :func:`max_ratio_update`: value over the running maximum of earlier steps (the Megatron-style
  "10 x the max" rule, without the fixed reference window);
- :func:`spam_fraction`: SPAM's element-wise spike fraction ``mean(g**2 > theta v)`` against
  Adam's second moment (arXiv 2501.06842);
- :func:`attribute_spike`: the top-k layers behind a global event, static shapes.

Defaults (:class:`SpikeConfig`) come from measurement on this repository's LLaMA builders
(AdamW, linear warm-up then cosine; ``tiny`` for 200-400 steps at lr 1e-3..3e-3, ``small``
for 300 steps at lr 1e-3), every parameter plus the global norm tracked on ``log ||g||``:

- clean runs: largest z 4.0-4.4 on ``tiny``; 7.6 on ``small``, at a genuine 8x jump of the
  embedding (and global) gradient norm at step 108 of a very noisy early phase;
- a 100x gradient injected into any one parameter at any step from 25 on (~30,000 cases):
  smallest z 10.1 for matrices, 9.1 for the 32-entry norm gains of ``tiny``; no other flag
  fired in any of these runs (clipping keeps the spike out of the state);
- ZClip's plain EMA (``trend=0``, ``alpha = level_alpha = 0.97``) separates worse on
  ``small``: early-training trends inflate its variance and a 100x spike at step ~50 scores
  only z 4.9 while the clean run reaches 5.4.

Hence ``threshold=9``, between the two. ``tests/stats/test_spikes.py`` replays the ``tiny``
case (clean run: no flag; live 100x injection: flagged at that step, on that layer, no
aftershock, attributed to it).

Scale: z-scores on the *log* norm do not depend on the loss reduction, the ``1/K``
accumulation factor or a constant AMP loss scale, but a change of any of them mid-run (a
GradScaler backing off by 2x) moves ``log ||g||`` by a constant: read gradients after
unscaling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gradlens import _args as A
from gradlens.stats.norms import accumulation_dtype, chunked, order_index

__all__ = [
    "SpikeConfig",
    "attribute_spike",
    "max_ratio_init",
    "max_ratio_update",
    "spam_fraction",
    "spam_fractions",
    "zscore_init",
    "zscore_update",
]


@dataclass(frozen=True)
class SpikeConfig:
    """Detector settings (defaults chosen by measurement, see the module docstring).

    Attributes:
        threshold: a value fires when its forecast residual exceeds ``threshold`` residual
            standard deviations. Higher than ZClip's 2.5 (a global raw norm): here dozens of
            layers are tested every step on a log scale and the residual scale adapts slowly.
        alpha: EMA factor of the residual variance (ZClip: 0.97 for mean and variance; a
            slower 0.99, ~100-step memory, keeps the scale steady through noisy stretches).
        level_alpha: EMA factor of the level (the forecast's mean). A fast level (0.9) plus a
            slope follows early-training trends without inflating the residual scale.
        trend: smoothing weight of the slope (Holt's linear method: the slope is an EMA of
            the level's step-to-step changes). ``0`` disables it: with ``level_alpha =
            alpha`` the detector is then ZClip's EMA mean/variance z-score.
        warmup: accepted values before any flag (ZClip: 25). During warm-up the level is the
            plain running average and the variance the plain mean of squared residuals.
        min_std: floor on the residual standard deviation, in the tracked value's units
            (natural log of the norm: 0.05 is a 5% fluctuation); keeps a very smooth series
            from turning a small wiggle into a many-sigma event. Raw losses (nats) can share
            it.
        clip: clip the residual entering the state to ``+- threshold * std`` once armed
            (ZClip's rule: a spike must not inflate the scale that judges the next one, nor
            drag the level and slope).
        spam_theta: SPAM's element threshold on ``g**2 / v`` (5000).
        top_k: layers a global spike is attributed to.
    """

    threshold: float = 9.0
    alpha: float = 0.99
    level_alpha: float = 0.9
    trend: float = 0.05
    warmup: int = 25
    min_std: float = 0.05
    clip: bool = True
    spam_theta: float = 5000.0
    top_k: int = 3

    def __post_init__(self) -> None:
        A.check_real("SpikeConfig.threshold", self.threshold, 0.0, low_open=True)
        for name in ("alpha", "level_alpha"):
            A.check_real(f"SpikeConfig.{name}", getattr(self, name), 0.0, 1.0, high_open=True)
        A.check_real("SpikeConfig.trend", self.trend, 0.0, 1.0)
        A.check_int("SpikeConfig.warmup", self.warmup, 1)
        A.check_real("SpikeConfig.min_std", self.min_std, 0.0)
        A.check_bool("SpikeConfig.clip", self.clip)
        A.check_real("SpikeConfig.spam_theta", self.spam_theta, 0.0, low_open=True)
        A.check_int("SpikeConfig.top_k", self.top_k, 1)


_DEFAULT = SpikeConfig()


def zscore_init(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Initial ``(forecast, var, count)`` state for :func:`zscore_update`.

    ``forecast`` has shape ``like.shape + (2,)``: the level and the slope of each series;
    ``var`` and ``count`` have ``like``'s shape. All zeros, float32 (float64 for float64).
    """
    acc = accumulation_dtype(like.dtype)
    z = torch.zeros(like.shape, dtype=acc, device=like.device)
    return torch.zeros((*like.shape, 2), dtype=acc, device=like.device), z, z.clone()


def zscore_update(
    x: torch.Tensor,
    forecast: torch.Tensor,
    var: torch.Tensor,
    count: torch.Tensor,
    config: SpikeConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forecast z-score detector, one step: ``(z, flags, forecast, var, count)``.

    Each series keeps a level ``l``, a slope ``b`` and the mean squared one-step forecast
    residual ``v`` (Holt's linear exponential smoothing, with ZClip's z-score, warm-up and
    clipping on top). With the state *before* this step:

        f = l + b,   r = x - f,   s = max(sqrt(v), min_std),   z = r / s,
        flag = armed & (z > threshold),    armed = count >= warmup

    (``z`` is NaN and nothing fires before ``armed``). The state then absorbs the residual,
    clipped to ``+- threshold * s`` once armed (``clip``):

        v <- (1 - w_v) v + w_v r**2,       w_v = max(1/count, 1 - alpha)
        l' = f + w_l r,                    w_l = max(1/(count + 1), 1 - level_alpha)
        b <- b + trend * ((l' - l) - b)

    The ``1/count`` weights make warm-up a plain running average (no zero-initialization
    bias): the first value sets ``l = x``, ``b = 0``, ``v = 0``; ``v`` is then the plain mean
    of the squared residuals seen, ``l`` the plain mean of the values, until the EMA weights
    take over. With
    ``trend = 0`` and ``level_alpha = alpha`` this is ZClip's EMA mean/variance z-score
    (arXiv 2504.02507), the variance being that of the one-step residual.

    Only upward deviations fire (a spike is a jump up; a collapsing norm is a different
    failure). A non-finite ``x`` leaves its series' state untouched, gets ``z = NaN`` and no
    flag: the non-finite count reports it.

    Args:
        x: this step's values, any shape (``(L,)`` layers, ``(L+1,)`` with the global one).
            For gradient norms pass ``log(norm)`` (``torch.log(norm.clamp_min(1e-30))``).
        forecast, var, count: the state (start from :func:`zscore_init`).
        config: :class:`SpikeConfig` (defaults if None).
    """
    cfg = _DEFAULT if config is None else config
    acc = var.dtype
    x = x.to(acc)
    level, slope = forecast[..., 0], forecast[..., 1]
    finite = torch.isfinite(x)
    std = var.clamp_min(0).sqrt().clamp_min(cfg.min_std)
    if cfg.min_std == 0:
        std = std + 1e-12
    pred = level + slope
    r = x - pred
    armed = count >= cfg.warmup
    z = torch.where(armed & finite, r / std, torch.full_like(r, math.nan))
    flags = armed & finite & (z > cfg.threshold)

    r_in = torch.where(finite, r, torch.zeros_like(r))
    if cfg.clip:
        band = cfg.threshold * std
        r_in = torch.where(armed, torch.minimum(torch.maximum(r_in, -band), band), r_in)
    n = count + 1.0
    first = count == 0
    w_v = torch.clamp_min(1.0 / count.clamp_min(1.0), 1.0 - cfg.alpha)  # count residuals
    w_l = torch.clamp_min(1.0 / n, 1.0 - cfg.level_alpha)
    new_var = torch.where(first, torch.zeros_like(var), (1.0 - w_v) * var + w_v * r_in.square())
    new_level = torch.where(first, x, pred + w_l * r_in)
    new_slope = torch.where(first, torch.zeros_like(slope),
                            slope + cfg.trend * ((new_level - level) - slope))
    new_forecast = torch.stack([new_level, new_slope], dim=-1)
    new_forecast = torch.where(finite.unsqueeze(-1), new_forecast, forecast)
    new_var = torch.where(finite, new_var, var)
    new_count = count + finite.to(count.dtype)
    return z, flags, new_forecast, new_var, new_count


def max_ratio_init(like: torch.Tensor) -> torch.Tensor:
    """Initial running maximum for :func:`max_ratio_update`: NaN (no earlier step)."""
    return torch.full(like.shape, math.nan, dtype=accumulation_dtype(like.dtype),
                      device=like.device)


def max_ratio_update(
    x: torch.Tensor, running_max: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ratio, running_max)``: ``x / max(earlier finite x)``, then the maximum absorbs ``x``.

    ``ratio`` is NaN at the first step (no earlier value) and for non-finite ``x``; a
    non-finite ``x`` does not enter the maximum. A ratio far above 1 (Megatron flags 10) is a
    spike; the ratio never adapts downwards, so it suits norms that shrink or stay flat over
    training (late training), not a rising early phase.
    """
    x = x.to(running_max.dtype)
    finite = torch.isfinite(x)
    ratio = torch.where(finite, x / running_max, torch.full_like(x, math.nan))
    new_max = torch.where(finite, torch.fmax(running_max, x), running_max)
    return ratio, new_max


def spam_fraction(g: torch.Tensor, v: torch.Tensor, theta: float = 5000.0) -> torch.Tensor:
    """SPAM's spike fraction ``mean_i [g_i**2 > theta v_i]`` over finite entries (0-d).

    ``v`` is Adam's second moment (``exp_avg_sq``) *before* this step's update, as SPAM
    compares it (an optimizer step pre-hook sees exactly that). Entries where ``g`` or ``v``
    is not finite are left out of numerator and denominator (NaN when none is left).

    Pitfalls: torch's ``exp_avg_sq`` is not bias-corrected: after ``k`` steps it is about
    ``(1 - beta2**k) E[g**2]``, so early in training (and at step 1, where ``v = 0`` and every
    non-zero entry counts) the fraction is inflated; read it after a few hundred steps or
    after a momentum reset's warm-up. ``g`` and ``v`` must be on the same scale: both
    unscaled (AMP), ``g`` the gradient the optimizer consumes (after clipping).
    """
    if theta <= 0:
        raise ValueError(f"theta must be positive, got {theta!r}")
    acc = accumulation_dtype(g.dtype)
    # x = v - g**2 / theta is negative exactly at the hits, finite exactly where g and v are
    # (an entry whose square overflows counts as non-finite). Float passes only: boolean
    # comparisons are several times slower than arithmetic on CPU.
    x = torch.addcmul(v.to(acc), g.to(acc), g.to(acc), value=-1.0 / theta)
    bad = (x * 0).nan_to_num_(nan=1.0).sum()  # x * 0 is NaN exactly where x is not finite
    # -sign of the clamped values: 1 at a hit, 0 elsewhere (summed in place, no boolean)
    hits = -x.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).clamp_(max=0.0).sign_().sum()
    return hits / (x.numel() - bad)


def spam_fractions(
    grads: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], theta: float = 5000.0
) -> torch.Tensor:
    """:func:`spam_fraction` for each pair, stacked: ``(L,)``. Pairs of one shape and dtypes
    are stacked and counted together (the same float passes, row by row: a few kernels per
    shape, not per tensor; the counts are sums of 0/1, exact in any order)."""
    if len(grads) != len(vs) or not grads:
        raise ValueError("spam_fractions needs two non-empty lists of equal length")
    if theta <= 0:
        raise ValueError(f"theta must be positive, got {theta!r}")
    acc = (torch.float64 if any(g.dtype == torch.float64 or v.dtype == torch.float64
                                for g, v in zip(grads, vs, strict=True)) else torch.float32)
    groups: dict[tuple, list[int]] = {}
    for k, (g, v) in enumerate(zip(grads, vs, strict=True)):
        if g.shape != v.shape:
            raise ValueError(f"spam_fractions: gradient {k} has shape {tuple(g.shape)}, its "
                             f"second moment {tuple(v.shape)}")
        groups.setdefault((tuple(g.shape), g.dtype, v.dtype), []).append(k)
    parts, order = [], []
    for idx in chunked(list(groups.values()), [g.numel() for g in grads]):
        n, numel = len(idx), grads[idx[0]].numel()
        g = torch.stack([grads[k] for k in idx]).reshape(n, numel).to(acc)
        x = torch.stack([vs[k] for k in idx]).reshape(n, numel).to(acc)
        x.addcmul_(g, g, value=-1.0 / theta)  # v - g^2 / theta: negative at the hits
        bad = torch.mul(x, 0, out=g).nan_to_num_(nan=1.0).sum(dim=1)
        hits = -x.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).clamp_(max=0.0).sign_().sum(dim=1)
        parts.append(hits / (numel - bad))
        order += idx
    rows = torch.cat(parts) if len(parts) > 1 else parts[0]
    return rows[order_index(order, rows.device)]


def attribute_spike(
    flag: torch.Tensor, scores: torch.Tensor, k: int = 3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` layers with the highest scores, for a global event: ``(indices, values, active)``.

    Always returns ``min(k, L)`` entries (static shapes): ``indices`` (int64) and ``values``
    of ``scores.topk`` (NaN scores rank last and come back as NaN), and ``active = flag &
    ~isnan(values)``: the collector reads the indices only where ``active`` holds. Any
    per-layer score works; the per-layer z-score of the log norm at the same step is the
    natural one (the layer whose own norm jumped most, relative to its own history).

    Args:
        flag: 0-d boolean, the global spike flag of this step.
        scores: ``(L,)`` per-layer scores.
        k: how many layers.
    """
    if scores.ndim != 1 or scores.numel() == 0:
        raise ValueError(f"scores must be a non-empty (L,) vector, got shape {tuple(scores.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    k = min(k, scores.numel())
    ranked = torch.where(torch.isnan(scores), torch.full_like(scores, -math.inf), scores)
    _, indices = torch.topk(ranked, k)
    values = scores.gather(0, indices)
    active = flag.to(torch.bool) & ~torch.isnan(values)
    return indices, values, active
