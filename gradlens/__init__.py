"""gradlens: see what the gradients of a language model are doing while it trains.

The public names load on first use (PEP 562), so that ``import gradlens.report`` (or the
TensorBoard plugin) reads runs without importing the collector.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gradlens._version import __version__

if TYPE_CHECKING:
    from gradlens.actuators.guard import SpikeGuard
    from gradlens.core.lens import GradLens
    from gradlens.families import LayerStatistic, Statistic, StepContext, register_statistic
    from gradlens.families.per_example_rules import (
        register_per_example_rule,
        unregister_per_example_rule,
    )
    from gradlens.optim import SCALE, scale_param_groups
    from gradlens.roles import LayerInfo, Role, discover_layers

__all__ = ["SCALE", "GradLens", "LayerInfo", "LayerStatistic", "Role", "SpikeGuard", "Statistic",
           "StepContext", "__version__", "discover_layers", "register_per_example_rule",
           "register_statistic", "scale_param_groups", "unregister_per_example_rule"]


def _load(name: str) -> Any:
    """The public name ``name``, imported from its module (explicit imports: the layering test
    reads them)."""
    if name == "GradLens":
        import gradlens.sinks  # noqa: F401  (installs the lens's default sinks)
        from gradlens.core.lens import GradLens

        return GradLens
    if name in ("LayerStatistic", "Statistic", "StepContext", "register_statistic"):
        import gradlens.families as families

        return getattr(families, name)
    if name == "SpikeGuard":
        from gradlens.actuators.guard import SpikeGuard

        return SpikeGuard
    if name in ("register_per_example_rule", "unregister_per_example_rule"):
        import gradlens.families.per_example_rules as rules

        return getattr(rules, name)
    if name in ("SCALE", "scale_param_groups"):
        import gradlens.optim as optim

        return getattr(optim, name)
    if name in ("LayerInfo", "Role", "discover_layers"):
        import gradlens.roles as roles

        return getattr(roles, name)
    raise AttributeError(f"module 'gradlens' has no attribute {name!r}")


def __getattr__(name: str) -> Any:
    value = _load(name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
