"""Column-norm spread of each 2-D gradient, on both axes (logged steps).

``unit`` is SCALE's axis (one RMS per output unit: rows of a Linear weight, feature columns of
the embedding), ``fan`` the other; each RMS vector is summarized by its coefficient of
variation, max/min, p99/p50 and Gini (:func:`gradlens.stats.spread_batched`). Describes the
gradient the optimizer consumes (a common clipping factor leaves every spread unchanged).
"""

from __future__ import annotations

from gradlens import stats as S
from gradlens.catalog import FAMILIES
from gradlens.families.base import Statistic, StepContext


class Columns(Statistic):
    spec = FAMILIES["columns"]

    def emit(self, ctx: StepContext, red, out) -> None:
        lens, shared = self.lens, ctx.shared
        units = shared.units()
        matrices = [k for k in range(len(lens.layers)) if units[k] is not None]
        if not matrices:
            return
        unit_r = [shared.unit_rms(k) for k in matrices]
        fan_r = [shared.fan_rms(k) for k in matrices]
        spreads = S.spread_batched(unit_r + fan_r)  # (2M, 4)
        index = lens.const_index(tuple(matrices))
        nan = lens.const("nan_vec")
        for j, s in enumerate(S.SPREAD_FIELDS):
            out[f"unit_rms_{s}"] = nan.index_copy(0, index, spreads[: len(matrices), j])
            out[f"fan_rms_{s}"] = nan.index_copy(0, index, spreads[len(matrices):, j])
