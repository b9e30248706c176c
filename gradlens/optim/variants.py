"""SCALE's ablations as named param-group recipes (options of one class, not copies of it).

Each variant is a call of :func:`gradlens.optim.scale_param_groups` with its own
``momentum_roles`` and ``normalize``; the groups go to :class:`gradlens.optim.SCALE` as usual::

    opt = SCALE(scale_variant_groups(model, "colnorm_sgd", lr=1e-3, lr_1d=2e-2))

- ``scale``: column-normalized matrices (one RMS per output unit; the embedding one per
  feature), EMA momentum on the output layer only. The published SCALE recipe.
- ``colnorm_sgd``: column-normalized matrices, no momentum: no optimizer state on any matrix.
- ``colnorm_sgd_momentum_all``: column-normalized matrices, EMA momentum on every matrix
  (embedding, hidden, output).
- ``sgd_output_momentum``: plain SGD on the matrices (no normalization), EMA momentum on the
  output layer only.

In every variant the 1-D tensors use AdamW at ``lr_1d`` (scheduled like ``lr``), as in SCALE.
With momentum, the normalization applies to the EMA ``m``, not to the gradient.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from gradlens.optim.groups import scale_param_groups

__all__ = ["VARIANTS", "scale_variant_groups"]

VARIANTS: dict[str, dict[str, Any]] = {
    "scale": dict(momentum_roles=("output",), normalize=True),
    "colnorm_sgd": dict(momentum_roles=(), normalize=True),
    "colnorm_sgd_momentum_all": dict(
        momentum_roles=("embedding", "hidden", "output"), normalize=True
    ),
    "sgd_output_momentum": dict(momentum_roles=("output",), normalize=False),
}
"""``{variant: the scale_param_groups options that define it}``."""


def scale_variant_groups(
    model: nn.Module,
    variant: str,
    lr: float,
    lr_1d: float | None = None,
    **kw: Any,
) -> list[dict[str, Any]]:
    """Param groups for :class:`gradlens.optim.SCALE` implementing one named ablation.

    Args:
        model: any ``nn.Module`` (roles from :func:`gradlens.roles.discover_layers`).
        variant: one of :data:`VARIANTS` (see the module docstring for the rules).
        lr: peak learning rate of the matrices.
        lr_1d: peak AdamW learning rate of the 1-D tensors (None: ``lr``).
        **kw: further :func:`gradlens.optim.scale_param_groups` options (``weight_decay``,
            ``momentum``, ``overrides``, ``output``); ``momentum_roles`` and ``normalize`` are
            what the variant sets and cannot be passed.

    Raises:
        ValueError: unknown variant, or ``momentum_roles`` / ``normalize`` in ``kw``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown SCALE variant {variant!r}; choose one of {list(VARIANTS)}")
    fixed = VARIANTS[variant]
    clash = sorted(set(kw) & set(fixed))
    if clash:
        raise ValueError(
            f"variant {variant!r} sets {clash} itself; call scale_param_groups directly to "
            "choose them"
        )
    return scale_param_groups(model, lr=lr, lr_1d=lr_1d, **fixed, **kw)
