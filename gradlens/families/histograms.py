"""Log-binned histograms of each matrix's per-unit RMS vector, with its moments (logged steps)."""

from __future__ import annotations

from gradlens import stats as S
from gradlens.catalog import FAMILIES
from gradlens.families.base import Statistic, StepContext


class Histograms(Statistic):
    spec = FAMILIES["histograms"]

    def emit(self, ctx: StepContext, red, out) -> None:
        lens, shared = self.lens, ctx.shared
        units = shared.units()
        ks = [k for k in range(len(lens.layers)) if units[k] is not None]
        if not ks:
            return
        rs = [shared.unit_rms(k) for k in ks]
        hists = S.log_histograms(rs, bins=lens.config.histogram_bins)
        moments = S.histograms_moments(rs)
        for j, k in enumerate(ks):
            edges, counts = hists[j]
            lens.add_histogram(ctx.step, lens.layers[k].name, edges, counts, moments[j],
                               self.spec.histograms[0])
