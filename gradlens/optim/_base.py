"""Plumbing shared by the group-wise optimizers (SCALE, SWAN, Stable-SPAM)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer


class GroupwiseOptimizer(Optimizer):
    """An ``Optimizer`` whose ``step`` runs ``_step_group`` on each param group."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimizer step over every parameter that has a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (optional).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _require_matrices(self, algorithm: str) -> None:
        """Drop the group just added and raise if it runs ``algorithm`` on a tensor of ndim < 2."""
        group = self.param_groups[-1]
        if group["algorithm"] != algorithm:
            return
        for p in group["params"]:
            if p.ndim < 2:
                self.param_groups.pop()
                raise ValueError(
                    f"algorithm={algorithm!r} needs matrices, got a {p.ndim}-D tensor of shape "
                    f"{tuple(p.shape)}; use algorithm='auto' or 'adamw' for 1-D tensors"
                )


def params_with_grad(group: dict[str, Any], sparse_error: str) -> Iterator[Tensor]:
    """The group's parameters whose ``grad`` is set; ``RuntimeError(sparse_error)`` on a sparse one."""
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(sparse_error)
        yield p


def uses_adamw(algorithm: str, p: Tensor) -> bool:
    """Whether ``algorithm`` (``adamw``, ``auto`` or a matrix rule) sends ``p`` to AdamW."""
    return algorithm == "adamw" or (algorithm == "auto" and p.ndim < 2)


def validate_adamw_split(group: dict[str, Any], algorithms: tuple[str, ...]) -> None:
    """Check ``weight_decay``, ``betas``, ``eps`` and ``algorithm`` (one of ``algorithms``), in order.

    Raises ``ValueError`` naming the first invalid one.
    """
    if not group["weight_decay"] >= 0:
        raise ValueError(
            f"Invalid weight_decay: weight_decay={group['weight_decay']} (must be >= 0)"
        )
    betas = group["betas"]
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"Invalid betas: betas={betas} (need two values in [0, 1))")
    if not group["eps"] > 0:
        raise ValueError(f"Invalid eps: eps={group['eps']} (must be > 0)")
    if group["algorithm"] not in algorithms:
        raise ValueError(
            f"Invalid algorithm: algorithm={group['algorithm']!r} (choose one of {algorithms})"
        )


def init_adamw_state(state: dict[str, Any], p: Tensor) -> None:
    """Zero ``step`` (0-d, CPU), ``exp_avg`` and ``exp_avg_sq`` (``p``'s shape and dtype)."""
    state["step"] = torch.tensor(0.0)
    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


class AdamWLists:
    """The argument lists of :func:`gradlens.optim.functional.adamw_update`, filled per tensor."""

    def __init__(self) -> None:
        self.params: list[Tensor] = []
        self.grads: list[Tensor] = []
        self.exp_avgs: list[Tensor] = []
        self.exp_avg_sqs: list[Tensor] = []
        self.steps: list[Tensor] = []

    def add(self, p: Tensor, state: dict[str, Any]) -> None:
        """Append ``p``, its grad and its AdamW state, creating the state on first use."""
        if "step" not in state:
            init_adamw_state(state, p)
        self.params.append(p)
        self.grads.append(p.grad)  # type: ignore[arg-type]
        self.exp_avgs.append(state["exp_avg"])
        self.exp_avg_sqs.append(state["exp_avg_sq"])
        self.steps.append(state["step"])

    def lists(self) -> tuple[list[Tensor], ...]:
        """``(params, grads, exp_avgs, exp_avg_sqs, steps)``, in ``adamw_update``'s order."""
        return self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.steps
