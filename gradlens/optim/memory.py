"""Optimizer-memory accounting, predicted from a model's roles or measured on a live optimizer.

Predicted (:func:`predicted_state_bytes`, :func:`weights_plus_state_ratio`): SCALE vs Adam from
the per-role element counts, before any step. Measured (:func:`optimizer_state_bytes`,
:func:`optimizer_state_numel`): what ``optimizer.state`` holds after its steps.

The SCALE paper's claim ("35-45% of Adam") counts weights + optimizer state only, both in the
same precision (bf16), no gradients or activations:

    Adam  = P + 2P                      (first and second moment of every parameter)
    SCALE = P + |output| + 2 |vector|   (lm_head EMA buffer; AdamW moments of 1-D tensors)

where P counts every trainable parameter once (a tied embedding is one tensor).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim import Optimizer

from gradlens.roles import Role, discover_layers

__all__ = [
    "optimizer_state_bytes",
    "optimizer_state_numel",
    "predicted_state_bytes",
    "role_numels",
    "weights_plus_state_ratio",
]


def role_numels(model: nn.Module, output: str | None = None) -> dict[str, int]:
    """Trainable elements per role (``embedding``, ``output``, ``hidden``, ``vector``).

    Works on ``meta``-device models (only shapes are read). Tied tensors count once.
    """
    counts = {r.value: 0 for r in Role}
    for info in discover_layers(model, output=output, warn=False):
        counts[info.role.value] += info.numel
    return counts


def predicted_state_bytes(
    numels: dict[str, int], optimizer: str = "scale", bytes_per_element: int = 2
) -> int:
    """Optimizer-state bytes implied by the per-role counts of :func:`role_numels` (predicted;
    :func:`optimizer_state_bytes` measures a live optimizer).

    ``adam``: ``2 P``; ``scale``: ``|output| + 2 |vector|`` (the published recipe: momentum
    on the output layer only, AdamW on 1-D tensors, no state on the other matrices).
    """
    if optimizer == "adam":
        elements = 2 * sum(numels.values())
    elif optimizer == "scale":
        elements = numels["output"] + 2 * numels["vector"]
    else:
        raise ValueError(f"optimizer must be 'adam' or 'scale', got {optimizer!r}")
    return elements * bytes_per_element


def weights_plus_state_ratio(numels: dict[str, int]) -> float:
    """``(P + |output| + 2|vector|) / 3P``: SCALE's weights + state as a fraction of Adam's."""
    total = sum(numels.values())
    return (total + predicted_state_bytes(numels, "scale", 1)) / (
        total + predicted_state_bytes(numels, "adam", 1)
    )


def optimizer_state_numel(optimizer: Optimizer, include_step: bool = False) -> int:
    """Elements held in ``optimizer.state`` (after at least one step: state is lazy).

    Step counters (0-d ``step`` tensors) are left out unless ``include_step``.
    """
    total = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if key == "step" and not include_step:
                continue
            numel = getattr(value, "numel", None)
            if callable(numel):
                total += numel()
    return total


def optimizer_state_bytes(optimizer: Optimizer) -> int:
    """Bytes of the tensors held in ``optimizer.state`` (``numel * element_size``; measured,
    :func:`predicted_state_bytes` predicts them from the roles).

    0-dim tensors (step counters such as Adam's ``step``) are bookkeeping and left out, so
    AdamW's figure is exactly ``2 * params * element_size``. Lazily created state counts only
    after the first ``step()``.
    """
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0:
                total += value.numel() * value.element_size()
    return total
