"""gradlens: see what the gradients of a language model are doing while it trains.

The names below are imported on first use, so that reading a run's files (the TensorBoard
tab, :mod:`gradlens.report`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "GradLens": "gradlens.core.lens",
    "LayerStatistic": "gradlens.families",
    "Statistic": "gradlens.families",
    "StepContext": "gradlens.families",
    "register_statistic": "gradlens.families",
    "SpikeGuard": "gradlens.families.guard",
    "register_per_example_rule": "gradlens.families.per_example_rules",
    "unregister_per_example_rule": "gradlens.families.per_example_rules",
    "SCALE": "gradlens.optim",
    "scale_param_groups": "gradlens.optim",
    "LayerInfo": "gradlens.roles",
    "Role": "gradlens.roles",
    "discover_layers": "gradlens.roles",
}

__all__ = ["SCALE", "GradLens", "LayerInfo", "LayerStatistic", "Role", "SpikeGuard", "Statistic",
           "StepContext", "__version__", "discover_layers", "register_per_example_rule",
           "register_statistic", "scale_param_groups", "unregister_per_example_rule"]

if TYPE_CHECKING:
    from gradlens.core.lens import GradLens
    from gradlens.families import LayerStatistic, Statistic, StepContext, register_statistic
    from gradlens.families.guard import SpikeGuard
    from gradlens.families.per_example_rules import (
        register_per_example_rule,
        unregister_per_example_rule,
    )
    from gradlens.optim import SCALE, scale_param_groups
    from gradlens.roles import LayerInfo, Role, discover_layers


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gradlens' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
