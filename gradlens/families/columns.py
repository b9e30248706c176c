"""Column-norm spread of each 2-D gradient, on both axes (logged steps).

``unit`` is SCALE's axis (one RMS per output unit: rows of a Linear weight, feature columns of
the embedding), ``fan`` the other; each RMS vector is summarized by its coefficient of
variation, max/min, p99/p50 and Gini (:func:`gradlens.stats.spread_rows`, one sort per group of equal length). Describes the
gradient the optimizer consumes (a common clipping factor leaves every spread unchanged).
"""

from __future__ import annotations

import torch

from gradlens import stats as S
from gradlens.catalog import FAMILIES
from gradlens.families.base import Statistic, StepContext


class Columns(Statistic):
    spec = FAMILIES["columns"]

    def emit(self, ctx: StepContext, red, out) -> None:
        lens = self.lens
        nan = lens.const("nan_vec")
        for side, fan in (("unit", False), ("fan", True)):
            groups = ctx.shared.rms_rows(red, fan=fan)  # one spread per length, not per layer
            if not groups:
                return
            spreads = torch.cat([S.spread_rows(r) for _, r in groups])  # (M, 4)
            index = lens.const_index(tuple([k for ks, _ in groups for k in ks]))
            spreads = spreads.to(nan.dtype)
            for j, s in enumerate(S.SPREAD_FIELDS):
                out[f"{side}_rms_{s}"] = nan.index_copy(0, index, spreads[:, j])
