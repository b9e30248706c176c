"""Per-step intermediates shared by several families, each computed once per layer per step.

- ``raw``: the squared norms of the gradient before any edit between backward and step
  (:mod:`gradlens.families.raw`, computed every step for the detectors).
- ``units`` / ``fans``: per-unit and per-fan squared norms of the step gradient (from the
  step's summary pass, :func:`gradlens.stats.summary_and_axis_sq_norms`, where the columns
  family runs); FSDP2 shards are placed into their global vectors and summed in the
  flush's collective.
"""

from __future__ import annotations

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
    norms from the same finite copy (``{k: (units, fans)}``), else None."""
    if logging and "fan_sq_norms" in lens.intermediates and shards is None:
        summary, axis_sq = S.grad_summaries_with_axes(grads, [
            info.layout if lens.matrix[k] and present[k] else None
            for k, info in enumerate(lens.layers)])
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

    def contribute(self, pack: D.Pack) -> None:
        """FSDP2: this rank's pieces of the per-unit / per-fan vectors of sharded layers."""
        ctx, lens = self.ctx, self.lens
        if ctx.shards is None or ctx.grads is None:
            return
        for k, info in enumerate(lens.layers):
            s = ctx.shards[k]
            if not (lens.matrix[k] and ctx.present[k] and s.sharded):
                continue
            g = ctx.grads[k]
            if self.need_units:
                pack.sum(f"unit{k}", D.place(S.unit_sq_norms(g, info.layout), s.units,
                                             s.contributes))
            if self.need_fans:
                pack.sum(f"fan{k}", D.place(S.fan_sq_norms(g, info.layout), s.fan,
                                            s.contributes))
                pack.sum(f"fan_count{k}", D.place(D.fan_finite_counts(g, info.layout), s.fan,
                                                  s.contributes))

    def units(self, red: dict[str, torch.Tensor]) -> list[torch.Tensor | None]:
        """Per-unit squared norms of the step gradient per matrix layer (None elsewhere)."""
        if self._units is None:
            lens, ctx = self.lens, self.ctx
            units: list[torch.Tensor | None] = [None] * len(lens.layers)
            for k, info in enumerate(lens.layers):
                if not (lens.matrix[k] and ctx.present[k]):
                    continue
                if f"unit{k}" in red:
                    units[k] = red[f"unit{k}"]
                elif k in (ctx.data.get("axis_sq") or {}):  # from the step's summary pass
                    units[k], fans = ctx.data["axis_sq"][k]
                    if self.need_fans:
                        self._fans[k] = fans
                else:
                    units[k] = S.unit_sq_norms(ctx.grads[k], info.layout)
            self._units = units
        return self._units

    def fan_rms(self, k: int, red: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-fan RMS; a sharded layer's from its reduced sums and counts over finite entries;
        in one process from this step's squared copy (non-finite entries count as zeros)."""
        lens = self.lens
        if f"fan{k}" in red:
            return (red[f"fan{k}"] / red[f"fan_count{k}"]).sqrt()
        self.units(red)
        if k in self._fans:
            fan = self._fans[k]
            return (fan / (lens.numel[k] // fan.numel())).sqrt()
        return S.fan_rms(self.ctx.grads[k], lens.layers[k].layout)

    def unit_rms(self, k: int, red: dict[str, torch.Tensor]) -> torch.Tensor:
        u = self.units(red)[k]
        return (u / (self.lens.numel[k] // u.numel())).sqrt()

    def raw(self, red: dict[str, torch.Tensor]):
        """:func:`raw_sq` of this step."""
        return raw_sq(self.lens, self.ctx, red)
