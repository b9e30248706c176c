r"""Stable-SPAM's functional kernel: AdaClip + AdaGN + momentum reset + AdamW, per tensor.

The optimizer class over it is :class:`gradlens.optim.stable_spam.StableSPAM`.

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

with ``g1 = gamma1 s(t)`` and ``b1 = beta1 s(t)`` (the EMA weights *and* the ``g1^t`` / ``b1^t``
bias corrections use the decayed value at the current ``t``; ``gamma2``, ``gamma3`` and ``beta2``
never decay), where ``s`` is the authors' cosine decay over ``total_T`` steps::

    s(t) = eta_min + (1 - eta_min) (1 + cos(pi t / (total_T + 1))) / 2     (1 if total_T is None)

``s(0) = 1`` and ``s(total_T + 1) = eta_min``. After that the cosine is *not* held: as in the
authors' code (``CosineAnnealingLR(T_max=total_T + 1)`` stepped with the closed form), ``s``
rises again towards 1 at ``t = 2 (total_T + 1)``, and so on periodically; set ``total_T`` to the
number of steps of the run. ``t`` is the tensor's own step count (the authors count the
optimizer's steps: the same when every tensor gets a gradient at every step). Further,
``||.||`` is the Frobenius norm of the whole tensor, ``max|g|`` its largest entry, the
clipped gradient feeds AdaGN, and the warm-up factor is (``W = warmup_steps``,
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
      follows SPAM (Huang et al., arXiv 2501.06842).
    - ``eps`` is added after the second-moment bias correction (torch ``AdamW`` and the
      Stable-SPAM code), and AdaGN reuses the same ``eps``.
    - Weight decay is decoupled and uses the scheduled ``lr`` without the warm-up factor.
    - SPAM's fixed spike threshold ``theta`` does not exist here: AdaClip's adaptive ``M^``
      replaces it.
    - Counters are per tensor (``state["step"]``): a tensor that misses a step (grad None)
      shifts its own reset schedule, never the others'.

Published code defaults: g1 = 0.7, g2 = 0.9, g3 = 0.999, DeltaT = 1000, eps = 1e-8; SPAM's
warm-up: 150 steps. The cosine decay: the authors' optimizer class defaults to ``total_T=None``
(off) and ``eta_min=0.5``; their training entry turns it on by default (``--total_T 20000``,
``--eta 0.5``) and their scripts set ``--total_T`` to the run's step count. gradlens defaults to
``total_T=None`` (off), like the class: the decay horizon is a property of the run, which an
optimizer cannot know, and a fixed 20000 is wrong for any other run length (far longer runs
see the factor rise again, see above; a 1000-step run decays ``gamma1`` by only 0.3%). Pass
``total_T=<steps of the run>`` (``eta_min`` 0.5 is already the default) to train as the
authors did.

Step gate (``step_gate`` group option, :mod:`gradlens.optim.gate`): a 0-d device tensor, 1.0 to
step and 0.0 to skip. A skipped step leaves the parameters (weight decay included) and every
state entry bit-identical: ``exp_avg``, ``exp_avg_sq``, ``max_ema``, ``norm_ema``,
``norm_sq_ema`` and ``step``, which carries the reset schedule, the warm-up, the cosine decay
and every bias correction. Under a gate ``step`` lives on the parameter's device and those
scalars are computed there from it (same formulas; nothing read on the host): a Python or CPU
counter could not be advanced conditionally on a device value without a sync, whereas a device
counter that the gate restores *is* the effective step count.

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
from itertools import chain

import torch
from torch import Tensor

from gradlens.optim.functional import addcdiv_scaled_, sqrt, step_count
from gradlens.optim.gate import gate_restore, gate_snapshot

__all__ = ["WARMUP_FLOOR", "decay_factor", "stable_spam_update", "warmup_factor"]

WARMUP_FLOOR = 0.01
"""Warm-up factor at a reset step (SPAM's code: ``1 - 0.99``)."""

_TINY = 1e-30  # floor of ||g|| and max|g| in divisions: a zero gradient stays zero, no host sync


def warmup_factor(t: int | Tensor, update_interval: int, warmup_steps: int) -> float | Tensor:
    """Step-size factor ``w(t)`` of the cosine warm-up after a momentum reset (module docstring).

    ``t`` is a Python int, or a tensor counter (gated steps: computed on device, same formula).
    """
    if update_interval <= 0 or warmup_steps <= 0:
        return 1.0
    if isinstance(t, Tensor):
        k = torch.remainder(t, update_interval)
        w = 1.0 - (1.0 - WARMUP_FLOOR) * 0.5 * (1.0 + torch.cos(math.pi * k / warmup_steps))
        return torch.where((t >= update_interval) & (k < warmup_steps), w, torch.ones_like(w))
    if t < update_interval:
        return 1.0
    k = t % update_interval
    if k >= warmup_steps:
        return 1.0
    return 1.0 - (1.0 - WARMUP_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * k / warmup_steps))


def decay_factor(t: int | Tensor, total_T: int | None, eta_min: float) -> float | Tensor:
    """Cosine factor ``s(t)`` that multiplies ``gamma1`` and ``beta1`` (module docstring).

    ``s(t) = eta_min + (1 - eta_min) (1 + cos(pi t / (total_T + 1))) / 2``; 1 when ``total_T``
    is None. A Python int ``t`` or a tensor counter (gated steps).
    """
    if total_T is None:
        return 1.0
    phase = math.pi * t / (total_T + 1)
    cos = torch.cos(phase) if isinstance(phase, Tensor) else math.cos(phase)
    return eta_min + (1.0 - eta_min) * (1.0 + cos) / 2


class _Coefficients:
    """The per-tensor scalars of one step at count ``t`` (floats, or 0-d tensors when gated)."""

    def __init__(self, t: int | Tensor, *, lr: float, beta1: float, beta2: float,
                 gamma1: float, gamma2: float, gamma3: float, update_interval: int,
                 warmup_steps: int, total_T: int | None, eta_min: float) -> None:
        decay = decay_factor(t, total_T, eta_min)
        g1, b1 = gamma1 * decay, beta1 * decay  # the decayed EMA coefficients
        self.g1_weight, self.b1_weight = 1.0 - g1, 1.0 - b1
        self.bc3 = 1.0 - gamma3**t
        self.bc_a = 1.0 - g1**t
        self.bc_b = 1.0 - gamma2**t
        self.sqrt_bc2 = sqrt(1.0 - beta2**t)
        self.size = -lr * warmup_factor(t, update_interval, warmup_steps) / (1.0 - b1**t)
        if update_interval <= 0:
            self.reset: bool | Tensor = False
        elif isinstance(t, Tensor):
            self.reset = torch.remainder(t, update_interval) == 0
        else:
            self.reset = t % update_interval == 0


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
    total_T: int | None = None,
    eta_min: float = 0.5,
    step_gate: Tensor | None = None,
) -> None:
    """One Stable-SPAM step of every tensor in the lists, in place (module docstring).

    ``grads`` are read, never written. ``steps`` are 0-d counters, incremented first (so
    ``t = 1`` on a tensor's first step): on the CPU without a gate (reading them is not a device
    sync), on the gate's device with one. ``max_emas``, ``norm_emas`` and ``norm_sq_emas`` are
    0-d tensors on the parameters' devices. ``total_T`` (None: off) and ``eta_min``: the cosine
    decay of ``gamma1`` and ``beta1``.

    ``step_gate`` (None, or a 0-d device tensor): where it is 0 the step is undone, every list
    bit-identical (:mod:`gradlens.optim.gate`); every coefficient is then computed on device
    from the counter, with the same formulas, and nothing is read on the host.

    ``foreach=True`` runs the statistics and the AdamW step as ``torch._foreach_*`` ops over
    the whole list; only AdaClip's element-wise select is a per-tensor ``torch.where``.
    """
    if not params:
        return
    lists = (params, exp_avgs, exp_avg_sqs, max_emas, norm_emas, norm_sq_emas, steps)
    snapshot = gate_snapshot(step_gate, *lists)
    for s in steps:
        s += 1
    cs = [
        _Coefficients(step_count(s, p, step_gate), lr=lr, beta1=beta1, beta2=beta2,
                      gamma1=gamma1, gamma2=gamma2, gamma3=gamma3,
                      update_interval=update_interval, warmup_steps=warmup_steps,
                      total_T=total_T, eta_min=eta_min)
        for s, p in zip(steps, params, strict=True)
    ]
    decay = 1.0 - lr * weight_decay
    if foreach:
        _foreach_path(params, grads, exp_avgs, exp_avg_sqs, max_emas, norm_emas, norm_sq_emas,
                      cs, beta2=beta2, eps=eps, weight_decay=weight_decay, decay=decay,
                      gamma2=gamma2, gamma3=gamma3)
    else:
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            _one_tensor(p, g, exp_avgs[i], exp_avg_sqs[i], max_emas[i], norm_emas[i],
                        norm_sq_emas[i], cs[i], beta2=beta2, eps=eps,
                        weight_decay=weight_decay, decay=decay, gamma2=gamma2, gamma3=gamma3)
    gate_restore(step_gate, snapshot, *lists)


def _one_tensor(p: Tensor, g: Tensor, m: Tensor, v: Tensor, big_m: Tensor, a: Tensor,
                b: Tensor, c: _Coefficients, *, beta2: float, eps: float,
                weight_decay: float, decay: float, gamma2: float, gamma3: float) -> None:
    # AdaClip
    gmax = torch.linalg.vector_norm(g, ord=math.inf).to(big_m.dtype)
    big_m.lerp_(gmax, 1.0 - gamma3)
    m_hat = big_m / c.bc3
    ratio = m_hat / gmax.clamp_min(_TINY)
    g = torch.where(g.abs() > m_hat, g * ratio, g)
    # AdaGN
    norm = torch.linalg.vector_norm(g).to(a.dtype)
    a.lerp_(norm, c.g1_weight)
    b.lerp_(norm * norm, 1.0 - gamma2)
    scale = (a / c.bc_a) / ((b / c.bc_b).sqrt() + eps)
    g.mul_(scale / norm.clamp_min(_TINY))
    # momentum reset, then AdamW
    _reset_(m, v, c.reset)
    m.lerp_(g, _weight(c.b1_weight, m))
    v.lerp_(g * g, 1.0 - beta2)
    if weight_decay != 0:
        p.mul_(decay)
    denom = v.sqrt().div_(c.sqrt_bc2).add_(eps)
    addcdiv_scaled_(p, m, denom, c.size)


def _weight(w: float | Tensor, like: Tensor) -> float | Tensor:
    """A lerp weight usable with ``like``: a tensor weight must share its dtype."""
    return w.to(like.dtype) if isinstance(w, Tensor) else w


def _reset_(m: Tensor, v: Tensor, reset: bool | Tensor) -> None:
    """Zero ``m`` and ``v`` at a reset step (a device bool under a gate: a masked fill)."""
    if isinstance(reset, Tensor):
        m.masked_fill_(reset, 0.0)
        v.masked_fill_(reset, 0.0)
    elif reset:
        m.zero_()
        v.zero_()


def _foreach_lerp_(dst: list[Tensor], src: list[Tensor], weights: list[float | Tensor]) -> None:
    """``dst[i].lerp_(src[i], weights[i])`` batched: one scalar weight when all are the same
    float, a tensor list when they are tensors (gated), else a loop."""
    if all(isinstance(w, Tensor) for w in weights):
        torch._foreach_lerp_(dst, src, [_weight(w, d) for w, d in zip(weights, dst, strict=True)])
    elif len(set(weights)) == 1:  # type: ignore[arg-type]
        torch._foreach_lerp_(dst, src, weights[0])  # type: ignore[arg-type]
    else:
        for d, s_, w in zip(dst, src, weights, strict=True):
            d.lerp_(s_, w)


def _foreach_path(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_emas: list[Tensor],
    norm_emas: list[Tensor],
    norm_sq_emas: list[Tensor],
    cs: list[_Coefficients],
    *,
    beta2: float,
    eps: float,
    weight_decay: float,
    decay: float,
    gamma2: float,
    gamma3: float,
) -> None:
    # AdaClip
    gmax = [x.to(m.dtype) for x, m in
            zip(torch._foreach_norm(grads, ord=math.inf), max_emas, strict=True)]
    torch._foreach_lerp_(max_emas, gmax, 1.0 - gamma3)
    m_hat = torch._foreach_div(max_emas, [c.bc3 for c in cs])
    ratio = torch._foreach_div(m_hat, torch._foreach_clamp_min(gmax, _TINY))
    clipped = [torch.where(g.abs() > mh, g * r, g)
               for g, mh, r in zip(grads, m_hat, ratio, strict=True)]
    # AdaGN
    norms = [x.to(a.dtype) for x, a in
             zip(torch._foreach_norm(clipped), norm_emas, strict=True)]
    _foreach_lerp_(norm_emas, norms, [c.g1_weight for c in cs])
    torch._foreach_lerp_(norm_sq_emas, torch._foreach_mul(norms, norms), 1.0 - gamma2)
    denom_n = torch._foreach_sqrt(torch._foreach_div(norm_sq_emas, [c.bc_b for c in cs]))
    torch._foreach_add_(denom_n, eps)
    scale = torch._foreach_div(torch._foreach_div(norm_emas, [c.bc_a for c in cs]), denom_n)
    torch._foreach_mul_(clipped, torch._foreach_div(scale, torch._foreach_clamp_min(norms, _TINY)))
    # momentum reset, then AdamW
    if any(isinstance(c.reset, Tensor) for c in cs):
        for m, v, c in zip(exp_avgs, exp_avg_sqs, cs, strict=True):
            _reset_(m, v, c.reset)
    else:
        zeroed = [t for t, c in chain(zip(exp_avgs, cs, strict=True),
                                                 zip(exp_avg_sqs, cs, strict=True)) if c.reset]
        if zeroed:
            torch._foreach_zero_(zeroed)
    _foreach_lerp_(exp_avgs, clipped, [c.b1_weight for c in cs])
    torch._foreach_lerp_(exp_avg_sqs, torch._foreach_mul(clipped, clipped), 1.0 - beta2)
    if weight_decay != 0:
        torch._foreach_mul_(params, decay)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [c.sqrt_bc2 for c in cs])
    torch._foreach_add_(denom, eps)
    sizes = [c.size for c in cs]
    if all(isinstance(x, Tensor) for x in sizes):  # gated: (size * m) / denom, addcdiv's rounding
        torch._foreach_addcdiv_(params, torch._foreach_mul(exp_avgs, sizes), denom)
    else:
        torch._foreach_addcdiv_(params, exp_avgs, denom, sizes)
