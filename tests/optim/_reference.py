"""An independent float64 numpy reference of SCALE (arXiv 2506.16659), for the tests.

Written from the formulas, sharing no code with gradlens.optim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RefParam:
    """One parameter of the reference: its rule and its state."""

    w: np.ndarray
    rule: str  # "scale" or "adamw"
    axis: int | None = 1  # axis reduced by the RMS (None: no normalization)
    beta: float = 0.0  # EMA of the normalized matrices (0: none)
    m: np.ndarray | None = None
    v: np.ndarray | None = None
    t: int = 0


def scale_matrix_step(p: RefParam, g: np.ndarray, lr: float, wd: float) -> None:
    """W <- W (1 - lr wd) - lr U / max(sqrt(mean(U^2, axis)), 1e-8); U = EMA of G or G."""
    if p.beta > 0:
        if p.m is None:
            p.m = np.zeros_like(p.w)
        p.m = p.beta * p.m + (1.0 - p.beta) * g
        u = p.m
    else:
        u = g
    shape = u.shape
    u2 = u.reshape(shape[0], -1)
    if p.axis is None:
        step = u2
    else:
        r = np.maximum(np.sqrt(np.mean(u2**2, axis=p.axis, keepdims=True)), 1e-8)
        step = u2 / r
    p.w = p.w * (1.0 - lr * wd) - lr * step.reshape(shape)


def adamw_step(
    p: RefParam, g: np.ndarray, lr: float, wd: float,
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
) -> None:
    """Bias-corrected AdamW with eps added to sqrt(v) before the correction."""
    if p.m is None:
        p.m = np.zeros_like(p.w)
        p.v = np.zeros_like(p.w)
    p.t += 1
    p.m = b1 * p.m + (1.0 - b1) * g
    p.v = b2 * p.v + (1.0 - b2) * g * g
    size = lr * np.sqrt(1.0 - b2**p.t) / (1.0 - b1**p.t)
    p.w = p.w * (1.0 - lr * wd) - size * p.m / (np.sqrt(p.v) + eps)


def reference_step(
    params: dict[str, RefParam], grads: dict[str, np.ndarray],
    lr_t: float, lr_1d_t: float, wd: float,
) -> None:
    """One step of every parameter that has a gradient."""
    for name, g in grads.items():
        p = params[name]
        if p.rule == "adamw":
            adamw_step(p, g, lr_1d_t, wd)
        else:
            scale_matrix_step(p, g, lr_t, wd)
