"""gradlens: see what the gradients of a language model are doing while it trains."""

from gradlens.core.lens import GradLens
from gradlens.families import LayerStatistic, Statistic, StepContext, register_statistic
from gradlens.families.guard import SpikeGuard
from gradlens.families.per_example_rules import (
    register_per_example_rule,
    unregister_per_example_rule,
)
from gradlens.optim import SCALE, scale_param_groups
from gradlens.roles import LayerInfo, Role, discover_layers

__version__ = "0.1.0"

__all__ = ["SCALE", "GradLens", "LayerInfo", "LayerStatistic", "Role", "SpikeGuard", "Statistic",
           "StepContext", "__version__", "discover_layers", "register_per_example_rule",
           "register_statistic", "scale_param_groups", "unregister_per_example_rule"]
