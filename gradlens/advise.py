"""Which layers benefit from momentum, from a run's own per-layer statistics: the public name of
:mod:`gradlens.report.advice` (the criterion and its evidence are documented there; the report's
momentum section uses the same functions)."""

from __future__ import annotations

from gradlens.report.advice import (
    MomentumAdvice,
    advise_momentum,
    ema_mse_ratio,
    momentum_table,
    within_budget,
)

__all__ = ["MomentumAdvice", "advise_momentum", "ema_mse_ratio", "momentum_table",
           "within_budget"]
