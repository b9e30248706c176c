"""Per-step intermediates shared by several families, each computed once per layer per step.

- ``raw``: the squared norms of the gradient before any edit between backward and step
  (:mod:`gradlens.families.raw`, computed every step for the detectors).
- ``units`` / ``fans``: per-unit and per-fan squared norms of the step gradient (from the
  step's summary pass where the columns family runs: a kept plan's stacks, one per shape,
  :meth:`gradlens.stats.summary_plan.SummaryPlan.with_axes`, read whole by the column
  spreads and gathered per width by the two-batch family); FSDP2 shards are placed into
  their global vectors and summed in the flush's collective (the partials
  ``catalog.INTERMEDIATE_PARTIALS`` declares).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from gradlens import stats as S
from gradlens.core import distributed as D
from gradlens.families.base import StepContext
from gradlens.families.raw import raw_sq

if TYPE_CHECKING:
    from gradlens.core.lens import GradLens


def step_summaries(lens: GradLens, grads: list[torch.Tensor], present: list[bool],
                   logging: bool, shards: list[D.Sharding] | None):
    """``(sq, max_abs, nonfinite, axis_sq)`` of the step's gradients: finite squared norms,
    largest finite ``|g|`` (logged steps only), non-finite counts, each ``(L,)``; on logged
    steps of a family that reads fan norms (one process), the per-unit and per-fan squared
    norms from the same finite copy, stacked per shape (``[(layers, units, fans)]``,
    :meth:`gradlens.stats.summary_plan.SummaryPlan.with_axes`), else None."""
    if logging and "fan_sq_norms" in lens.intermediates and shards is None:
        plan = lens.summary_plans.get(grads, [
            info.layout if lens.matrix[k] and present[k] else None
            for k, info in enumerate(lens.layers)])
        summary, axis_sq = plan.with_axes(grads)
    else:
        summary, axis_sq = S.grad_summaries(grads, max_abs=logging,
                                            plans=lens.summary_plans), None
    return summary[:, 0], summary[:, 1], summary[:, 2], axis_sq


class Intermediates:
    """Lazily computed shared values of one logged step (``ctx.shared``): those the enabled
    families declare (``catalog.INTERMEDIATES``)."""

    def __init__(self, lens: GradLens, ctx: StepContext, declared: frozenset[str]):
        self.lens, self.ctx = lens, ctx
        self.need_fans = "fan_sq_norms" in declared
        self.need_units = self.need_fans or "unit_sq_norms" in declared
        self._units: list[torch.Tensor | None] | None = None
        self._fans: dict[int, torch.Tensor] = {}
        self._widths: dict[int, tuple[torch.Tensor, dict[int, int]]] | None = None
        # the reduced partials, ``{"unit" | "fan" | "fan_count": {k: vector}}`` (core.emit)
        self.reduced: Mapping[str, dict[int, torch.Tensor]] = {}

    def partials(self) -> dict[str, dict[int, torch.Tensor]]:
        """FSDP2: this rank's pieces of the per-unit / per-fan vectors of sharded layers, each
        placed at its offset in the global vector (``catalog.INTERMEDIATE_PARTIALS``)."""
        ctx, lens = self.ctx, self.lens
        if ctx.shards is None or ctx.grads is None:
            return {}
        out: dict[str, dict[int, torch.Tensor]] = {}
        for k, info in enumerate(lens.layers):
            s = ctx.shards[k]
            if not (lens.matrix[k] and ctx.present[k] and s.sharded):
                continue
            g = ctx.grads[k]
            if self.need_units:
                out.setdefault("unit", {})[k] = D.place(S.unit_sq_norms(g, info.layout),
                                                        s.units, s.contributes)
            if self.need_fans:
                out.setdefault("fan", {})[k] = D.place(S.fan_sq_norms(g, info.layout), s.fan,
                                                       s.contributes)
                out.setdefault("fan_count", {})[k] = D.place(
                    D.fan_finite_counts(g, info.layout), s.fan, s.contributes)
        return out

    def units(self) -> list[torch.Tensor | None]:
        """Per-unit squared norms of the step gradient per matrix layer (None elsewhere)."""
        if self._units is None:
            lens, ctx = self.lens, self.ctx
            units: list[torch.Tensor | None] = [None] * len(lens.layers)
            missing: list[int] = []
            stacked: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            for members, u, f in self._stacks():
                stacked.update(zip(members, zip(u.unbind(0), f.unbind(0), strict=True),
                                   strict=True))
            for k in range(len(lens.layers)):
                if not (lens.matrix[k] and ctx.present[k]):
                    continue
                if k in self.reduced.get("unit", ()):
                    units[k] = self.reduced["unit"][k]
                elif k in stacked:  # from the step's summary pass
                    units[k], fans = stacked[k]
                    if self.need_fans:
                        self._fans[k] = fans
                else:
                    missing.append(k)
            if missing:  # no summary pass read them: batched per shape all the same
                _, axes = S.grad_summaries_with_axes([ctx.grads[k] for k in missing],
                                                     [lens.layers[k].layout for k in missing])
                for j, k in enumerate(missing):
                    units[k] = axes[j][0]
            self._units = units
        return self._units

    def fan_rms(self, k: int) -> torch.Tensor:
        """Per-fan RMS; a sharded layer's from its reduced sums and counts over finite entries;
        in one process from this step's squared copy (non-finite entries count as zeros)."""
        lens = self.lens
        if k in self.reduced.get("fan", ()):
            return (self.reduced["fan"][k] / self.reduced["fan_count"][k]).sqrt()
        self.units()
        if k in self._fans:
            fan = self._fans[k]
            return (fan / (lens.numel[k] // fan.numel())).sqrt()
        return S.fan_rms(self.ctx.grads[k], lens.layers[k].layout)

    def unit_rms(self, k: int) -> torch.Tensor:
        u = self.units()[k]
        return (u / (self.lens.numel[k] // u.numel())).sqrt()

    def _stacks(self) -> list:
        """The step summary's per-shape stacks of unit and fan squared norms (one process;
        none where partials were reduced)."""
        if self.reduced:
            return []
        return self.ctx.data.get("axis_sq") or []

    def _covered(self) -> bool:
        """Every matrix layer with a gradient is in the summary's stacks."""
        stacks, lens, present = self._stacks(), self.lens, self.ctx.present
        if not stacks:
            return False
        n = sum(len(members) for members, _, _ in stacks)
        return n == sum(1 for k in range(len(lens.layers)) if lens.matrix[k] and present[k])

    def units_of(self, ks: tuple[int, ...], width: int) -> torch.Tensor:
        """``(len(ks), width)``: the per-unit squared norms of layers ``ks`` (of ``width``
        units each), a NaN row for a layer without. From the summary's stacks of that width
        with one gather where they hold every ``k``, else row by row."""
        if self._widths is None:
            self._widths = {}
            by: dict[int, tuple[list[torch.Tensor], dict[int, int]]] = {}
            for members, u, _ in self._stacks():
                parts, pos = by.setdefault(u.shape[1], ([], {}))
                start = sum(len(p) for p in parts)
                pos.update((k, start + j) for j, k in enumerate(members))
                parts.append(u)
            for U, (parts, pos) in by.items():
                self._widths[U] = (torch.cat(parts) if len(parts) > 1 else parts[0], pos)
        got = self._widths.get(width)
        if got is not None and all(k in got[1] for k in ks):
            return got[0].index_select(0, self.lens.const_index(tuple(got[1][k] for k in ks)))
        units, blank = self.units(), self.lens.const("nan").expand(width)
        return torch.stack([blank if units[k] is None else units[k] for k in ks])

    def rms_rows(self, fan: bool = False) -> list[tuple[tuple[int, ...], torch.Tensor]]:
        """:meth:`unit_rms` (``fan``: :meth:`fan_rms`) of every matrix layer with a gradient,
        stacked: ``[(layers, (n, length))]``. Squared norms of one stack are divided by their
        counts and rooted at once (``sqrt(x / n)``, elementwise as per layer): the summary's
        stacks (one shape each) as they are where they hold every layer, else grouped per
        length; a sharded layer's fan RMS (finite counts per entry) is placed in its row."""
        lens = self.lens
        if self._covered():
            out = []
            for members, u, f in self._stacks():
                x = f if fan else u
                count = lens.numel[members[0]] // max(1, x.shape[1])
                out.append((tuple(members), (x / count).sqrt()))
            return out
        units = self.units()
        groups: dict[int, tuple[list[int], list[torch.Tensor], list[int], list[int]]] = {}
        for k, u in enumerate(units):
            if u is None:
                continue
            x, direct = u, False
            if fan:
                x = self._fans.get(k)
                if x is None:
                    x, direct = self.fan_rms(k), True
            ks, xs, counts, rows = groups.setdefault(x.numel(), ([], [], [], []))
            if direct:
                rows.append(len(ks))
            ks.append(k)
            xs.append(x)
            counts.append(1 if direct else lens.numel[k] // x.numel())
        out = []
        for ks, xs, counts, rows in groups.values():
            r = (torch.stack(xs) / lens.const_values(tuple(counts)).unsqueeze(1)).sqrt()
            if rows:  # RMS computed already: placed as they are
                r = r.index_copy(0, lens.const_index(tuple(rows)),
                                 torch.stack([xs[j] for j in rows]).to(r.dtype))
            out.append((tuple(ks), r))
        return out

    def raw(self):
        """:func:`raw_sq` of this step."""
        return raw_sq(self.lens, self.ctx)
