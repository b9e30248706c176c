"""Spike detectors (methods.md section 3), vectorized over layers, state kept on device.

Every detector is a functional update: it takes this step's values (one per layer, a ``(L,)``
tensor, plus the global entry if the caller appends it) and the previous state tensors, and
returns the flags and the new state. Nothing syncs: the flags are device booleans the collector
transfers with everything else at its flush.

- :func:`zscore_update`: EMA z-score (ZClip-style, arXiv 2504.02507), on ``log ||g||`` by
  convention (scale-free, so one threshold fits every layer and the 100x spike of one layer
  reads the same as that of another);
- :func:`max_ratio_update`: value over the running maximum of earlier steps (the Megatron-style
  "10 x the max" rule, without the fixed reference window);
- :func:`spam_fraction`: SPAM's element-wise spike fraction ``mean(g**2 > theta v)`` against
  Adam's second moment (arXiv 2501.06842);
- :func:`attribute_spike`: the top-k layers behind a global event, static shapes.

Defaults (:class:`SpikeConfig`) were chosen on this repository's small LLaMA models: a clean
AdamW run of a few hundred steps (learning-rate warm-up included) raises no flag on any layer
or on the global norm, while a 100x gradient injected into one layer (``log 100 = 4.6``
above its level) is flagged at that step and attributed to that layer (``tests/stats``).

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

from gradlens.stats.norms import accumulation_dtype

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
    """Detector settings.

    Attributes:
        alpha: EMA factor of the running mean and variance (ZClip's 0.97: a ~33-step memory).
        threshold: z above which a value is a spike. ZClip uses 2.5 on the global raw norm;
            per layer, on the log norm, with dozens of layers tested every step, 2.5 would
            fire on clean runs; OLMo-core's 6-sigma rule is the model here.
        warmup: accepted values before any flag (ZClip: 25). During warm-up the mean and
            variance are the plain average and population variance of the values seen.
        min_std: floor on the standard deviation, in the units of the tracked value (natural
            log of the norm: 0.05 is a 5% fluctuation). A perfectly smooth series would
            otherwise turn a 10% wiggle into a "6-sigma" event. Raw losses (nats) want their
            own floor; 0.05 nats is sensible too.
        clip: clip the value entering the statistics to ``mean +- threshold * std`` (ZClip's
            rule that a spike must not inflate the variance that judges the next spike).
        spam_theta: SPAM's element threshold on ``g**2 / v`` (5000).
        top_k: layers a global spike is attributed to.
    """

    alpha: float = 0.97
    threshold: float = 6.0
    warmup: int = 25
    min_std: float = 0.05
    clip: bool = True
    spam_theta: float = 5000.0
    top_k: int = 3

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha!r}")
        if not self.threshold > 0:
            raise ValueError(f"threshold must be > 0, got {self.threshold!r}")
        if self.warmup < 1:
            raise ValueError(f"warmup must be >= 1, got {self.warmup!r}")
        if self.min_std < 0:
            raise ValueError(f"min_std must be >= 0, got {self.min_std!r}")
        if not self.spam_theta > 0:
            raise ValueError(f"spam_theta must be > 0, got {self.spam_theta!r}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k!r}")


_DEFAULT = SpikeConfig()


def zscore_init(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Initial ``(mean, var, count)`` state for :func:`zscore_update`: zeros like ``like``."""
    acc = accumulation_dtype(like.dtype)
    z = torch.zeros(like.shape, dtype=acc, device=like.device)
    return z, z.clone(), z.clone()


def zscore_update(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    count: torch.Tensor,
    config: SpikeConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EMA z-score detector, one step: ``(z, flags, mean, var, count)``.

    With ``s = max(sqrt(var), min_std)`` from the state *before* this step:

        z = (x - mean) / s,       flag = armed & (z > threshold),

    where ``armed`` means ``count >= warmup`` (z is NaN, and nothing fires, before). Then the
    state absorbs ``x`` (clipped to ``mean +- threshold * s`` once armed, when ``clip``) with
    weight ``w = max(1/(count+1), 1 - alpha)``: ``delta = x - mean``, ``mean += w delta``,
    ``var = (1 - w)(var + w delta**2)`` (the exponentially weighted mean and variance, West
    1979 / Finch 2009; the ``1/(count+1)`` start makes the first values a plain average, so no
    zero-initialization bias).

    Only upward deviations fire (a spike is a jump up; a collapsing norm is a different
    failure). Non-finite ``x`` (a NaN/Inf norm) leaves the state of that entry untouched, gets
    ``z = NaN`` and no flag here: the non-finite count reports it.

    Args:
        x: this step's values, any shape (``(L,)`` layers, ``(L+1,)`` with the global one).
            For gradient norms pass ``log(norm)`` (``torch.log(norm.clamp_min(1e-30))``).
        mean, var, count: state, same shape as ``x`` (start from :func:`zscore_init`).
        config: :class:`SpikeConfig` (defaults if None).
    """
    cfg = _DEFAULT if config is None else config
    acc = mean.dtype
    x = x.to(acc)
    finite = torch.isfinite(x)
    std = var.clamp_min(0).sqrt().clamp_min(cfg.min_std)
    if cfg.min_std == 0:
        std = std + 1e-12
    z = (x - mean) / std
    armed = count >= cfg.warmup
    nan = torch.full_like(z, math.nan)
    z = torch.where(armed & finite, z, nan)
    flags = armed & finite & (z > cfg.threshold)

    x_in = torch.where(finite, x, mean)
    if cfg.clip:
        band = cfg.threshold * std
        clipped = torch.minimum(torch.maximum(x_in, mean - band), mean + band)
        x_in = torch.where(armed, clipped, x_in)
    w = torch.clamp_min(1.0 / (count + 1.0), 1.0 - cfg.alpha)
    delta = x_in - mean
    new_mean = mean + w * delta
    new_var = (1.0 - w) * (var + w * delta.square())
    new_mean = torch.where(finite, new_mean, mean)
    new_var = torch.where(finite, new_var, var)
    new_count = count + finite.to(count.dtype)
    return z, flags, new_mean, new_var, new_count


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
    acc = accumulation_dtype(g.dtype)
    gf, vf = g.to(acc), v.to(acc)
    ok = torch.isfinite(gf) & torch.isfinite(vf)
    hit = ok & (gf.square() > theta * vf)
    return hit.sum().to(acc) / ok.sum().to(acc)


def spam_fractions(
    grads: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], theta: float = 5000.0
) -> torch.Tensor:
    """:func:`spam_fraction` for each pair, stacked: ``(L,)``."""
    if len(grads) != len(vs) or not grads:
        raise ValueError("spam_fractions needs two non-empty lists of equal length")
    rows = [spam_fraction(g, v, theta) for g, v in zip(grads, vs, strict=True)]
    acc = torch.float64 if any(r.dtype == torch.float64 for r in rows) else torch.float32
    return torch.stack([r.to(acc) for r in rows])


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
