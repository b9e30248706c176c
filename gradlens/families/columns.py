"""Column-norm spread of each 2-D gradient, on both axes (logged steps).

``unit`` is SCALE's axis (one RMS per output unit: rows of a Linear weight, feature columns of
the embedding), ``fan`` the other; each RMS vector is summarized by its coefficient of
variation, max/min, p99/p50 and Gini (:func:`gradlens.stats.spread_rows`: the vectors of one
length stacked, one sort for all of them). Describes the gradient the optimizer consumes (a
common clipping factor leaves every spread unchanged).
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
        sides = [ctx.shared.rms_rows(fan=fan) for fan in (False, True)]
        if not sides[0]:
            return
        # rows of one length, unit and fan sides together: one spread (one sort) per length
        by_length: dict[int, list[tuple[int, tuple[int, ...], torch.Tensor]]] = {}
        for side, groups in enumerate(sides):
            for ks, r in groups:
                by_length.setdefault(r.shape[1], []).append((side, ks, r))
        order: tuple[list[int], list[int]] = ([], [])
        parts: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for members in by_length.values():
            rows = members[0][2] if len(members) == 1 else torch.cat([m[2] for m in members])
            spreads, start = S.spread_rows(rows), 0
            for side, ks, _ in members:
                parts[side].append(spreads[start:start + len(ks)])
                order[side].extend(ks)
                start += len(ks)
        nan = lens.const("nan_vec")
        for side, name in enumerate(("unit", "fan")):
            spreads = torch.cat(parts[side]).to(nan.dtype)  # (matrices, 4)
            index = lens.const_index(tuple(order[side]))
            for j, field in enumerate(S.SPREAD_FIELDS):
                out[f"{name}_rms_{field}"] = nan.index_copy(0, index, spreads[:, j])
