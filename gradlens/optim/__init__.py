"""gradlens.optim: the SCALE optimizer, its parameter groups, kernels and memory accounting.

Stands alone: nothing here imports the gradient collector.

    from gradlens.optim import SCALE, scale_param_groups
    opt = SCALE(scale_param_groups(model, lr=1e-3, lr_1d=2e-2))
"""

from gradlens.optim.functional import RMS_FLOOR, adamw_update, scale_update, unit_rms
from gradlens.optim.groups import GROUP_OPTIONS, scale_param_groups
from gradlens.optim.memory import (
    optimizer_state_bytes,
    optimizer_state_numel,
    role_numels,
    weights_plus_state_ratio,
)
from gradlens.optim.scale import ALGORITHMS, SCALE

__all__ = [
    "ALGORITHMS",
    "GROUP_OPTIONS",
    "RMS_FLOOR",
    "SCALE",
    "adamw_update",
    "optimizer_state_bytes",
    "optimizer_state_numel",
    "role_numels",
    "scale_param_groups",
    "scale_update",
    "unit_rms",
    "weights_plus_state_ratio",
]
