"""Functional kernels of SCALE: the normalized matrix update and the 1-D AdamW update.

Both kernels update tensors in place and hold no state of their own: the caller passes the
buffers. Each has two paths that compute the same numbers, a per-tensor for-loop
(``foreach=False``) and a batched path over the whole list with ``torch._foreach_*`` ops
(``foreach=True``); a float64 test proves them equal.

Normalized update (one output unit per row of an ``(out, in)`` weight when ``norm_dim=1``)::

    m  <- lerp(m, G, 1 - beta)                   only when beta > 0 (EMA, zero-initialised,
                                                 no bias correction); then U = m, else U = G
    r  =  sqrt(mean(U**2, dim=norm_dim)).clamp_min(1e-8)     one RMS per output unit
    W  <- W * (1 - lr * wd) - lr * U / r

1-D AdamW (``t`` counts this tensor's steps)::

    m  <- lerp(m, g, 1 - b1);   v <- lerp(v, g*g, 1 - b2)
    p  <- p * (1 - lr * wd) - lr * sqrt(1 - b2**t) / (1 - b1**t) * m / (sqrt(v) + eps)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["RMS_FLOOR", "adamw_update", "scale_update", "unit_rms"]

RMS_FLOOR = 1e-8
"""Lower clamp of the per-unit RMS, as in the SCALE authors' code."""


def unit_rms(g: Tensor, norm_dim: int) -> Tensor:
    """One RMS per output unit: ``sqrt(mean(g**2, dim=norm_dim, keepdim=True)).clamp_min(1e-8)``.

    ``g`` is 2-D (callers view ndim > 2 tensors as ``(size0, -1)``). Computed as
    ``||g||_2 / sqrt(n)`` along ``norm_dim``, which makes no temporary the size of ``g``;
    except on the CPU across a strided axis (the embedding's ``dim=0``, GPT-2 ``Conv1D``),
    where ``vector_norm`` is ~12x slower than ``sum(g**2)`` (3 ms vs 0.25 ms for 4096 x 256,
    torch 2.13), so the sum of squares is taken directly.
    This is the only place that reduces over a unit: a sharded (FSDP / tensor-parallel)
    version must all-reduce the per-unit sum of squares across the shards that split
    ``norm_dim`` here, and divide by the full, unsharded ``n``.
    """
    n = g.shape[norm_dim]
    if g.device.type == "cpu" and g.stride(norm_dim) != 1:
        mean_sq = g.square().sum(dim=norm_dim, keepdim=True).div_(n)
        return mean_sq.sqrt_().clamp_min_(RMS_FLOOR)
    return (
        torch.linalg.vector_norm(g, dim=norm_dim, keepdim=True)
        .div_(math.sqrt(n))
        .clamp_min_(RMS_FLOOR)
    )


def _rms_for(u: Tensor, norm_dim: int) -> Tensor:
    """:func:`unit_rms` of ``u`` viewed as ``(size0, -1)``, shaped to broadcast against ``u``."""
    if u.ndim == 2:
        return unit_rms(u, norm_dim)
    r = unit_rms(u.reshape(u.shape[0], -1), norm_dim)
    if norm_dim == 1:
        return r.view((u.shape[0],) + (1,) * (u.ndim - 1))
    return r.view((1, *u.shape[1:]))


def scale_update(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    norm_dim: int | None,
    foreach: bool,
) -> None:
    """Apply SCALE's normalized update to matrices (ndim >= 2), in place.

    Args:
        params, grads: same-length lists; all share the options below.
        momentum_buffers: one zero-initialised EMA buffer per param when ``momentum > 0``,
            else ``None``.
        lr: the current (scheduled) learning rate.
        weight_decay: decoupled decay, ``W <- W * (1 - lr * wd)``.
        momentum: EMA coefficient beta; 0 means the raw gradient is normalized.
        norm_dim: axis reduced by the RMS (1: one scale per row of an ``(out, in)`` weight;
            0: one per column); ``None`` skips normalization (plain SGD, for ablations).
        foreach: batched ``torch._foreach_*`` path instead of the per-tensor loop.
    """
    if not params:
        return
    if momentum > 0 and momentum_buffers is None:
        raise ValueError("scale_update: momentum > 0 needs momentum_buffers")
    decay = 1.0 - lr * weight_decay
    if foreach:
        if momentum > 0:
            torch._foreach_lerp_(momentum_buffers, grads, 1.0 - momentum)
            updates = momentum_buffers
        else:
            updates = grads
        if weight_decay != 0:
            torch._foreach_mul_(params, decay)
        if norm_dim is None:
            torch._foreach_add_(params, updates, alpha=-lr)
            return
        rms = [_rms_for(u, norm_dim) for u in updates]
        torch._foreach_addcdiv_(params, updates, rms, -lr)
        return
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        u = momentum_buffers[i].lerp_(g, 1.0 - momentum) if momentum > 0 else g
        if weight_decay != 0:
            p.mul_(decay)
        if norm_dim is None:
            p.add_(u, alpha=-lr)
        else:
            p.addcdiv_(u, _rms_for(u, norm_dim), value=-lr)


def adamw_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    weight_decay: float,
    beta1: float,
    beta2: float,
    eps: float,
    foreach: bool,
) -> None:
    """AdamW as in the SCALE authors' code (used for 1-D parameters), in place.

    ``steps`` are per-parameter 0-d step counters (on the CPU, as in ``torch.optim``); each is
    incremented before use, so ``t = 1`` on a tensor's first step. ``eps`` is added to
    ``sqrt(v)`` before the bias correction, which is folded into the step size. ``lr`` is the
    current 1-D learning rate (SCALE passes ``lr_1d * lr_t / lr_peak``).
    """
    if not params:
        return
    decay = 1.0 - lr * weight_decay
    if foreach:
        torch._foreach_add_(steps, 1)
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_lerp_(exp_avg_sqs, torch._foreach_mul(grads, grads), 1.0 - beta2)
        if weight_decay != 0:
            torch._foreach_mul_(params, decay)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denom, eps)
        # step counters live on the CPU: reading them is not a device sync
        sizes = [_step_size(lr, beta1, beta2, int(t.item())) for t in steps]
        torch._foreach_addcdiv_(params, exp_avgs, denom, sizes)
        return
    for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        t += 1
        m.lerp_(g, 1.0 - beta1)
        v.lerp_(g * g, 1.0 - beta2)
        if weight_decay != 0:
            p.mul_(decay)
        size = _step_size(lr, beta1, beta2, int(t.item()))  # CPU counter, no device sync
        p.addcdiv_(m, v.sqrt().add_(eps), value=size)


def _step_size(lr: float, beta1: float, beta2: float, t: int) -> float:
    """Negative AdamW step size with both bias corrections: ``-lr * sqrt(1-b2^t) / (1-b1^t)``."""
    return -lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
