"""gradlens.optim: the SCALE optimizer, its parameter groups, kernels, schedule and memory
accounting.

Stands alone: nothing here imports the gradient collector.

    from gradlens.optim import SCALE, scale_param_groups
    opt = SCALE(scale_param_groups(model, lr=1e-3, lr_1d=2e-2))

Also the optimizers SCALE is compared with (SWAN, Stable-SPAM, Muon + AdamW), SCALE's ablations
as named param-group recipes, and one registry for all of them::

    from gradlens.optim import OPTIMIZERS, make_optimizer
    opt = make_optimizer("swan", model)   # default lr from OPTIMIZERS["swan"]

Every optimizer here takes a device-side ``step_gate`` group option (skip a step on device, no
host sync); :class:`GatedOptimizer` gives ``torch.optim`` optimizers the same.
"""

from gradlens.optim.chained import ChainedOptimizer
from gradlens.optim.functional import RMS_FLOOR, adamw_update, clamped_unit_rms, scale_update
from gradlens.optim.gate import GatedOptimizer, check_step_gate
from gradlens.optim.groups import GROUP_OPTIONS, scale_param_groups
from gradlens.optim.memory import (
    optimizer_state_bytes,
    optimizer_state_numel,
    predicted_state_bytes,
    role_numels,
    weights_plus_state_ratio,
)
from gradlens.optim.muon import muon_adamw
from gradlens.optim.registry import OPTIMIZERS, OptimizerSpec, make_optimizer, register_optimizer
from gradlens.optim.scale import ALGORITHMS, SCALE
from gradlens.optim.schedule import cosine_lr_factor, cosine_schedule
from gradlens.optim.stable_spam import StableSPAM
from gradlens.optim.stable_spam_functional import stable_spam_update
from gradlens.optim.swan import SWAN, swan_param_groups
from gradlens.optim.swan_functional import grad_norm, grad_whitening, swan_update
from gradlens.optim.variants import VARIANTS, scale_variant_groups

__all__ = [
    "ALGORITHMS",
    "GROUP_OPTIONS",
    "OPTIMIZERS",
    "RMS_FLOOR",
    "SCALE",
    "SWAN",
    "VARIANTS",
    "ChainedOptimizer",
    "GatedOptimizer",
    "OptimizerSpec",
    "StableSPAM",
    "adamw_update",
    "check_step_gate",
    "clamped_unit_rms",
    "cosine_lr_factor",
    "cosine_schedule",
    "grad_norm",
    "grad_whitening",
    "make_optimizer",
    "muon_adamw",
    "optimizer_state_bytes",
    "optimizer_state_numel",
    "predicted_state_bytes",
    "register_optimizer",
    "role_numels",
    "scale_param_groups",
    "scale_update",
    "scale_variant_groups",
    "stable_spam_update",
    "swan_param_groups",
    "swan_update",
    "weights_plus_state_ratio",
]
