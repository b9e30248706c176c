"""Plumbing shared by the group-wise optimizers (SCALE, SWAN, Stable-SPAM)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from gradlens.optim.gate import check_step_gate


class GroupwiseOptimizer(Optimizer):
    """An ``Optimizer`` whose ``step`` runs ``_step_group`` on each param group.

    Every group takes the ``step_gate`` option (None, or a 0-d device tensor, 1.0 to step and
    0.0 to skip; :mod:`gradlens.optim.gate`). It is a live handle, not a hyperparameter:
    ``state_dict()`` leaves it out and ``load_state_dict()`` keeps each group's current gate.
    """

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
            check_step_gate(group.get("step_gate"), group["params"])
            self._step_group(group)
        return loss

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after checking its ``step_gate`` (None by default)."""
        param_group.setdefault("step_gate", None)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_step_gate(group["step_gate"], group["params"])
        except ValueError:
            self.param_groups.pop()
            raise

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict()`` without the groups' ``step_gate`` handles."""
        sd = super().state_dict()
        for group in sd["param_groups"]:
            group.pop("step_gate", None)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``, keeping each group's current ``step_gate``."""
        gates = [g.get("step_gate") for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, gate in zip(self.param_groups, gates, strict=True):
            group["step_gate"] = gate

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


def place_step_counter(state: dict[str, Any], p: Tensor, gated: bool) -> Tensor:
    """``state["step"]``, moved where the step needs it: ``p``'s device under a gate (a device
    gate cannot advance a CPU counter without a sync), else the CPU (read without a device
    sync). A move happens once, when a group switches mode (or after ``load_state_dict``,
    which puts counters on the CPU); it copies one scalar."""
    t = state["step"]
    want = p.device if gated else torch.device("cpu")
    if t.device != want:
        t = state["step"] = t.to(want)
    return t


class AdamWLists:
    """The argument lists of :func:`gradlens.optim.functional.adamw_update`, filled per tensor."""

    def __init__(self) -> None:
        self.params: list[Tensor] = []
        self.grads: list[Tensor] = []
        self.exp_avgs: list[Tensor] = []
        self.exp_avg_sqs: list[Tensor] = []
        self.steps: list[Tensor] = []

    def add(self, p: Tensor, state: dict[str, Any], gated: bool = False) -> None:
        """Append ``p``, its grad and its AdamW state, creating the state on first use
        (``gated``: the step counter on ``p``'s device, see :func:`place_step_counter`)."""
        if "step" not in state:
            init_adamw_state(state, p)
        self.params.append(p)
        self.grads.append(p.grad)  # type: ignore[arg-type]
        self.exp_avgs.append(state["exp_avg"])
        self.exp_avg_sqs.append(state["exp_avg_sq"])
        self.steps.append(place_step_counter(state, p, gated))

    def lists(self) -> tuple[list[Tensor], ...]:
        """``(params, grads, exp_avgs, exp_avg_sqs, steps)``, in ``adamw_update``'s order."""
        return self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.steps
