r"""Stable-SPAM: AdaClip + AdaGN + momentum reset + AdamW, per tensor.

Huang et al., "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam",
arXiv 2502.17055; the momentum reset and its warm-up come from SPAM (Huang et al., "SPAM:
Spike-Aware Adam with Momentum Reset for Stable LLM Training", arXiv 2501.06842).

Per tensor, at its ``t``-th step (``t = 1, 2, ...``; ``g`` its gradient)::

    AdaClip   M <- g3 M + (1 - g3) max|g|;     M^ = M / (1 - g3^t)
              g_i <- g_i * M^ / max|g|   where |g_i| > M^       (other entries unchanged)
    AdaGN     a <- g1 a + (1 - g1) ||g||;      b <- g2 b + (1 - g2) ||g||^2
              a^ = a / (1 - g1^t);  b^ = b / (1 - g2^t)
              g <- g / ||g|| * a^ / (sqrt(b^) + eps)             (g stays 0 when ||g|| = 0)
    reset     if t % DeltaT == 0:  m <- 0,  v <- 0               (before this step's update)
    AdamW     m <- lerp(m, g, 1 - b1);   v <- lerp(v, g*g, 1 - b2)
              p <- p (1 - lr wd) - lr * w(t) / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

with ``||.||`` the Frobenius norm of the whole tensor, ``max|g|`` its largest entry, the
clipped gradient feeding AdaGN, and the warm-up factor (``W = warmup_steps``,
``k = t mod DeltaT``, the steps since the last reset)::

    w(t) = 1 - 0.99 * (1 + cos(pi k / W)) / 2    if t >= DeltaT and k < W   (0.01 at the reset
                                                                              step, rising to 1)
    w(t) = 1                                      otherwise (no warm-up before the first reset)

Choices, where the sources leave room:
    - The momentum reset and its cosine warm-up of the step size follow SPAM's public code: the
      bias corrections keep the running ``t`` (they are ~1 after a reset, so the first steps
      after it are large, which the warm-up damps), the warm-up starts at 0.01 at the reset
      step, and only ``m`` and ``v`` are zeroed (``M``, ``a``, ``b`` keep their history).
      SPAM's code evaluates the cosine over ``W + 1`` instead of ``W`` and jumps to 1 at
      ``k = W`` (the factors differ by at most 0.006 at W = 150); here ``w`` is continuous at
      ``k = W``. Stable-SPAM's public code restarts its step counter at a reset instead (which
      also restarts the AdaClip/AdaGN bias corrections) and has no cosine warm-up; this module
      follows SPAM, as methods.md section 3 asks.
    - ``eps`` is added after the second-moment bias correction (torch ``AdamW`` and the
      Stable-SPAM code), and AdaGN reuses the same ``eps``.
    - Weight decay is decoupled and uses the scheduled ``lr`` without the warm-up factor.
    - SPAM's fixed spike threshold ``theta`` does not exist here: AdaClip's adaptive ``M^``
      replaces it.
    - Counters are per tensor (``state["step"]``): a tensor that misses a step (grad None)
      shifts its own reset schedule, never the others'.

Published code defaults: g1 = 0.7, g2 = 0.9, g3 = 0.999, DeltaT = 1000, eps = 1e-8; SPAM's
warm-up: 150 steps.

State per tensor: ``step`` (0-d, CPU), ``exp_avg`` and ``exp_avg_sq`` (the parameter's shape and
dtype), and three 0-d scalars on the parameter's device: ``max_ema`` (``M``), ``norm_ema``
(``a``), ``norm_sq_ema`` (``b``) in ``promote(dtype, float32)``: a bf16 EMA with g3 = 0.999 could
not move (its increments fall below bf16 resolution), so they stay in fp32 across
``load_state_dict`` too.

Pitfalls:
    - AdaGN replaces each tensor's norm by the EMA ratio ``a^ / sqrt(b^)`` (about 1 when the
      norm is steady), and AdaClip and AdamW are scale-free too: a constant loss scale (mean
      vs sum reduction, accumulation count) changes nothing but the weight of ``eps``. A scale
      that varies between steps (AMP's dynamic loss scale if not unscaled, a summed loss over
      varying token counts) does enter, through the EMAs.
    - Global clipping before ``step()`` rescales the gradient, which AdaGN then undoes up to
      the EMA history; it does change which entries AdaClip clips.
    - The step is sync-free: every statistic stays on the device.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from gradlens.optim._base import GroupwiseOptimizer, init_adamw_state, params_with_grad

__all__ = ["StableSPAM", "stable_spam_update", "warmup_factor"]

WARMUP_FLOOR = 0.01
"""Warm-up factor at a reset step (SPAM's code: ``1 - 0.99``)."""

_TINY = 1e-30  # floor of ||g|| and max|g| in divisions: a zero gradient stays zero, no host sync
_SCALARS = ("max_ema", "norm_ema", "norm_sq_ema")


def warmup_factor(t: int, update_interval: int, warmup_steps: int) -> float:
    """Step-size factor ``w(t)`` of the cosine warm-up after a momentum reset (module docstring)."""
    if update_interval <= 0 or warmup_steps <= 0 or t < update_interval:
        return 1.0
    k = t % update_interval
    if k >= warmup_steps:
        return 1.0
    return 1.0 - (1.0 - WARMUP_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * k / warmup_steps))


def stable_spam_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_emas: list[Tensor],
    norm_emas: list[Tensor],
    norm_sq_emas: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    gamma1: float,
    gamma2: float,
    gamma3: float,
    update_interval: int,
    warmup_steps: int,
    foreach: bool,
) -> None:
    """One Stable-SPAM step of every tensor in the lists, in place (module docstring).

    ``grads`` are read, never written. ``steps`` are 0-d CPU counters, incremented first (so
    ``t = 1`` on a tensor's first step); reading them is not a device sync. ``max_emas``,
    ``norm_emas`` and ``norm_sq_emas`` are 0-d tensors on the parameters' devices.

    ``foreach=True`` runs the statistics and the AdamW step as ``torch._foreach_*`` ops over
    the whole list; only AdaClip's element-wise select is a per-tensor ``torch.where``.
    """
    if not params:
        return
    for s in steps:
        s += 1
    ts = [int(s.item()) for s in steps]  # CPU counters, no device sync
    bc3 = [1.0 - gamma3**t for t in ts]
    bc_a = [1.0 - gamma1**t for t in ts]
    bc_b = [1.0 - gamma2**t for t in ts]
    sqrt_bc2 = [math.sqrt(1.0 - beta2**t) for t in ts]
    sizes = [-lr * warmup_factor(t, update_interval, warmup_steps) / (1.0 - beta1**t)
             for t in ts]
    resets = [update_interval > 0 and t % update_interval == 0 for t in ts]
    decay = 1.0 - lr * weight_decay
    if foreach:
        _foreach_path(params, grads, exp_avgs, exp_avg_sqs, max_emas, norm_emas, norm_sq_emas,
                      bc3, bc_a, bc_b, sqrt_bc2, sizes, resets, beta1=beta1, beta2=beta2,
                      eps=eps, weight_decay=weight_decay, decay=decay, gamma1=gamma1,
                      gamma2=gamma2, gamma3=gamma3)
        return
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        m, v = exp_avgs[i], exp_avg_sqs[i]
        big_m, a, b = max_emas[i], norm_emas[i], norm_sq_emas[i]
        # AdaClip
        gmax = torch.linalg.vector_norm(g, ord=math.inf).to(big_m.dtype)
        big_m.lerp_(gmax, 1.0 - gamma3)
        m_hat = big_m / bc3[i]
        ratio = m_hat / gmax.clamp_min(_TINY)
        g = torch.where(g.abs() > m_hat, g * ratio, g)
        # AdaGN
        norm = torch.linalg.vector_norm(g).to(a.dtype)
        a.lerp_(norm, 1.0 - gamma1)
        b.lerp_(norm * norm, 1.0 - gamma2)
        c = (a / bc_a[i]) / ((b / bc_b[i]).sqrt() + eps)
        g.mul_(c / norm.clamp_min(_TINY))
        # momentum reset, then AdamW
        if resets[i]:
            m.zero_()
            v.zero_()
        m.lerp_(g, 1.0 - beta1)
        v.lerp_(g * g, 1.0 - beta2)
        if weight_decay != 0:
            p.mul_(decay)
        denom = v.sqrt().div_(sqrt_bc2[i]).add_(eps)
        p.addcdiv_(m, denom, value=sizes[i])


def _foreach_path(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_emas: list[Tensor],
    norm_emas: list[Tensor],
    norm_sq_emas: list[Tensor],
    bc3: list[float],
    bc_a: list[float],
    bc_b: list[float],
    sqrt_bc2: list[float],
    sizes: list[float],
    resets: list[bool],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decay: float,
    gamma1: float,
    gamma2: float,
    gamma3: float,
) -> None:
    # AdaClip
    gmax = [x.to(m.dtype) for x, m in
            zip(torch._foreach_norm(grads, ord=math.inf), max_emas, strict=True)]
    torch._foreach_lerp_(max_emas, gmax, 1.0 - gamma3)
    m_hat = torch._foreach_div(max_emas, bc3)
    ratio = torch._foreach_div(m_hat, torch._foreach_clamp_min(gmax, _TINY))
    clipped = [torch.where(g.abs() > mh, g * r, g)
               for g, mh, r in zip(grads, m_hat, ratio, strict=True)]
    # AdaGN
    norms = [x.to(a.dtype) for x, a in
             zip(torch._foreach_norm(clipped), norm_emas, strict=True)]
    torch._foreach_lerp_(norm_emas, norms, 1.0 - gamma1)
    torch._foreach_lerp_(norm_sq_emas, torch._foreach_mul(norms, norms), 1.0 - gamma2)
    denom_n = torch._foreach_sqrt(torch._foreach_div(norm_sq_emas, bc_b))
    torch._foreach_add_(denom_n, eps)
    c = torch._foreach_div(torch._foreach_div(norm_emas, bc_a), denom_n)
    torch._foreach_mul_(clipped, torch._foreach_div(c, torch._foreach_clamp_min(norms, _TINY)))
    # momentum reset, then AdamW
    zeroed = [t for t, r in zip(chain(exp_avgs, exp_avg_sqs), resets + resets, strict=True) if r]
    if zeroed:
        torch._foreach_zero_(zeroed)
    torch._foreach_lerp_(exp_avgs, clipped, 1.0 - beta1)
    torch._foreach_lerp_(exp_avg_sqs, torch._foreach_mul(clipped, clipped), 1.0 - beta2)
    if weight_decay != 0:
        torch._foreach_mul_(params, decay)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, sqrt_bc2)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, sizes)


class StableSPAM(GroupwiseOptimizer):
    r"""Stable-SPAM (arXiv 2502.17055): AdaClip, AdaGN, momentum reset with warm-up, AdamW.

    The per-tensor rule, the state and the choices made where the paper and the public code
    leave room are in the module docstring (:mod:`gradlens.optim.stable_spam`). In short, per
    tensor and step: clip entries above a bias-corrected EMA of ``max|g|`` (``gamma3``), rescale
    the gradient to the norm ratio ``a^ / (sqrt(b^) + eps)`` of two EMAs of ``||g||`` and
    ``||g||^2`` (``gamma1``, ``gamma2``), zero the Adam moments every ``update_interval`` steps
    and warm the step size up again over ``warmup_steps`` steps with a cosine from 0.01, then
    take a bias-corrected AdamW step.

    Param-group options: ``lr``, ``betas``, ``eps``, ``weight_decay``, ``gamma1``, ``gamma2``,
    ``gamma3``, ``update_interval``, ``warmup_steps``, ``foreach``.

    Args:
        params: parameters or param-group dicts (or ``(name, tensor)`` pairs).
        lr: learning rate.
        betas: AdamW ``(b1, b2)``.
        eps: added to ``sqrt(v^)`` in AdamW and to ``sqrt(b^)`` in AdaGN.
        weight_decay: decoupled weight decay.
        gamma1: EMA coefficient of the gradient norm (AdaGN's ``a``), published 0.7.
        gamma2: EMA coefficient of the squared gradient norm (AdaGN's ``b``), published 0.9.
        gamma3: EMA coefficient of ``max|g|`` (AdaClip's ``M``), published 0.999.
        update_interval: DeltaT, steps between momentum resets (published 1000; 0 disables
            resets and the warm-up).
        warmup_steps: length of the cosine warm-up after each reset (SPAM: 150; 0 disables it;
            at most ``update_interval``).
        foreach: True or None (default): ``torch._foreach_*`` path; False: per-tensor loop.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        gamma1: float = 0.7,
        gamma2: float = 0.9,
        gamma3: float = 0.999,
        update_interval: int = 1000,
        warmup_steps: int = 150,
        *,
        foreach: bool | None = None,
    ) -> None:
        defaults: dict[str, Any] = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, gamma1=gamma1,
            gamma2=gamma2, gamma3=gamma3, update_interval=update_interval,
            warmup_steps=warmup_steps, foreach=foreach,
        )
        _validate(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; missing options come from the constructor, then are validated."""
        _validate({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def _step_group(self, group: dict[str, Any]) -> None:
        lists: tuple[list[Tensor], ...] = ([], [], [], [], [], [], [], [])
        for p in params_with_grad(group, "StableSPAM does not support sparse gradients"):
            state = self.state[p]
            if "step" not in state:
                _init_state(state, p)
            for lst, x in zip(lists, (p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                                      state["max_ema"], state["norm_ema"],
                                      state["norm_sq_ema"], state["step"]), strict=True):
                lst.append(x)
        beta1, beta2 = group["betas"]
        stable_spam_update(
            *lists, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], gamma1=group["gamma1"],
            gamma2=group["gamma2"], gamma3=group["gamma3"],
            update_interval=group["update_interval"], warmup_steps=group["warmup_steps"],
            foreach=group["foreach"] is not False,
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``, keeping the scalar EMAs in fp32 or wider.

        torch casts every state tensor but ``step`` to its parameter's dtype; the three 0-d
        statistics are restored here in ``promote(dtype, float32)`` from the saved values.
        """
        saved_state = state_dict["state"]
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        super().load_state_dict(state_dict)
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for idx, p in zip(saved_ids, params, strict=True):
            saved = saved_state.get(idx)
            if not saved:
                continue
            for key in _SCALARS:
                if key in saved:
                    self.state[p][key] = saved[key].detach().to(
                        device=p.device, dtype=_stat_dtype(p), copy=True
                    )


def _stat_dtype(p: Tensor) -> torch.dtype:
    return torch.promote_types(p.dtype, torch.float32)


def _init_state(state: dict[str, Any], p: Tensor) -> None:
    init_adamw_state(state, p)
    for key in _SCALARS:
        state[key] = torch.zeros((), dtype=_stat_dtype(p), device=p.device)


def _validate(group: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first invalid hyperparameter of ``group``."""
    if not group["lr"] >= 0:
        raise ValueError(f"Invalid learning rate: lr={group['lr']} (must be >= 0)")
    betas = group["betas"]
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"Invalid betas: betas={betas} (need two values in [0, 1))")
    if not group["eps"] > 0:
        raise ValueError(f"Invalid eps: eps={group['eps']} (must be > 0)")
    if not group["weight_decay"] >= 0:
        raise ValueError(
            f"Invalid weight_decay: weight_decay={group['weight_decay']} (must be >= 0)"
        )
    for key in ("gamma1", "gamma2", "gamma3"):
        if not 0.0 <= group[key] < 1.0:
            raise ValueError(f"Invalid {key}: {key}={group[key]} (must be in [0, 1))")
    for key in ("update_interval", "warmup_steps"):
        value = group[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"Invalid {key}: {key}={value!r} (must be an int >= 0)")
    interval, warmup = group["update_interval"], group["warmup_steps"]
    if interval > 0 and warmup > interval:
        raise ValueError(
            f"Invalid warmup_steps: warmup_steps={warmup} exceeds update_interval={interval} "
            "(the warm-up after one reset would run into the next)"
        )
    if group["foreach"] not in (None, True, False):
        raise ValueError(f"Invalid foreach: foreach={group['foreach']!r} (True, False or None)")
