"""Statistic families: one module each, the collector calls them in order.

What each family emits, needs and reads, and the presets that run it, are declared in
:mod:`gradlens.catalog` (``FAMILIES[name]``, each class's ``spec``); this table summarizes it.

==============  ===============================================  ===========================
family          statistics                                       needs
==============  ===============================================  ===========================
norms           grad_norm/rms/max_abs, nonfinite_count,          p.grad at the step
                grad_norm_preclip
spikes          grad_norm_z, grad_norm_ratio_max, loss, loss_z   the raw norms; the loss
columns         unit_/fan_rms_{cv,max_min,p99_p50,gini}          p.grad at the step
twobatch        twobatch_*, noise_scale, var_per_element,        micro-batch gradients,
                unit_nsr_*                                       sizes, consistent gradient
per_example     pe_trace, pe_noise_scale, pe_var_per_element     layer inputs and output
                                                                 gradients, sizes
temporal        temporal_var(_per_element, _noise_scale,         p.grad every step
                _normalized)
histograms      unit_rms_hist                                    p.grad at the step
spam            spam_fraction                                    the optimizer's exp_avg_sq
grad_lag        grad_lag1_dot, grad_lag2_dot (opt-in,            p.grad every step
                ``statistics=[GradLag]``)
==============  ===============================================  ===========================
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from gradlens import catalog
from gradlens.families.base import LayerStatistic, Statistic, StepContext, register_statistic

if TYPE_CHECKING:
    from gradlens.core.config import LensConfig

__all__ = ["LayerStatistic", "Statistic", "StepContext", "builtin_families", "family_class",
           "register_statistic"]


def family_class(name: str) -> type[Statistic]:
    """The torch side of a declared family (``catalog.FAMILIES[name].impl``)."""
    module, _, cls = catalog.FAMILIES[name].impl.partition(":")
    return getattr(importlib.import_module(module), cls)


def builtin_families(config: LensConfig) -> list[Statistic]:
    """The built-in families a configuration enables, in the order they run."""
    return [family_class(name)() for name in catalog.enabled(vars(config))]
