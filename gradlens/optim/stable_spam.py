"""The Stable-SPAM optimizer (arXiv 2502.17055): state, hyperparameter checks, step.

The per-tensor rule, its state, the step gate, the pitfalls and the choices made where the paper
and the public code leave room are in :mod:`gradlens.optim.stable_spam_functional`.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from gradlens.optim._base import (
    GroupwiseOptimizer,
    init_adamw_state,
    params_with_grad,
    place_step_counter,
)
from gradlens.optim.stable_spam_functional import stable_spam_update

__all__ = ["StableSPAM"]

_SCALARS = ("max_ema", "norm_ema", "norm_sq_ema")


class StableSPAM(GroupwiseOptimizer):
    r"""Stable-SPAM (arXiv 2502.17055): AdaClip, AdaGN, momentum reset with warm-up, AdamW.

    The per-tensor rule, the state and the choices made where the paper and the public code
    leave room are in :mod:`gradlens.optim.stable_spam_functional`. In short, per
    tensor and step: clip entries above a bias-corrected EMA of ``max|g|`` (``gamma3``), rescale
    the gradient to the norm ratio ``a^ / (sqrt(b^) + eps)`` of two EMAs of ``||g||`` and
    ``||g||^2`` (``gamma1``, ``gamma2``), zero the Adam moments every ``update_interval`` steps
    and warm the step size up again over ``warmup_steps`` steps with a cosine from 0.01, then
    take a bias-corrected AdamW step.

    Param-group options: ``lr``, ``betas``, ``eps``, ``weight_decay``, ``gamma1``, ``gamma2``,
    ``gamma3``, ``update_interval``, ``warmup_steps``, ``total_T``, ``eta_min``, ``foreach``,
    ``step_gate`` (None, or a 0-d device tensor: 0.0 skips the step on device, see
    :mod:`gradlens.optim.stable_spam_functional`).

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
        total_T: steps of the cosine decay of ``gamma1`` and ``beta1`` (None: no decay, the
            default; the authors' training entry uses it, set to the run length).
        eta_min: the decay factor reached at ``t = total_T + 1`` (authors: 0.5).
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
        total_T: int | None = None,
        eta_min: float = 0.5,
        *,
        foreach: bool | None = None,
    ) -> None:
        defaults: dict[str, Any] = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, gamma1=gamma1,
            gamma2=gamma2, gamma3=gamma3, update_interval=update_interval,
            warmup_steps=warmup_steps, total_T=total_T, eta_min=eta_min, foreach=foreach,
        )
        _validate(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; missing options come from the constructor, then are validated."""
        _validate({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def _step_group(self, group: dict[str, Any]) -> None:
        lists: tuple[list[Tensor], ...] = ([], [], [], [], [], [], [], [])
        gate = group.get("step_gate")
        for p in params_with_grad(group, "StableSPAM does not support sparse gradients"):
            state = self.state[p]
            if "step" not in state:
                _init_state(state, p)
            step = place_step_counter(state, p, gated=gate is not None)
            for lst, x in zip(lists, (p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                                      state["max_ema"], state["norm_ema"],
                                      state["norm_sq_ema"], step), strict=True):
                lst.append(x)
        beta1, beta2 = group["betas"]
        stable_spam_update(
            *lists, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], gamma1=group["gamma1"],
            gamma2=group["gamma2"], gamma3=group["gamma3"],
            update_interval=group["update_interval"], warmup_steps=group["warmup_steps"],
            foreach=group["foreach"] is not False, total_T=group["total_T"],
            eta_min=group["eta_min"], step_gate=gate,
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
    total_t = group["total_T"]
    if total_t is not None and (isinstance(total_t, bool) or not isinstance(total_t, int)
                                or total_t < 1):
        raise ValueError(f"Invalid total_T: total_T={total_t!r} (None or an int >= 1)")
    if not 0.0 <= group["eta_min"] <= 1.0:
        raise ValueError(f"Invalid eta_min: eta_min={group['eta_min']} (must be in [0, 1])")
    if group["foreach"] not in (None, True, False):
        raise ValueError(f"Invalid foreach: foreach={group['foreach']!r} (True, False or None)")
