"""Norms and non-finite counts of the gradient the optimizer consumes, every step.

Per layer, every step: ``grad_norm = ||g||_2`` of the gradient the optimizer consumes, over
finite entries (NaN when every entry is non-finite, or the layer has no gradient),
``nonfinite_count``, and ``grad_norm_preclip``: the raw norm, at the end of the last backward
pass and its data-parallel reduction (DDP's all-reduce, FSDP2's reduce-scatter), before
clipping or any other edit, unscaled by the GradScaler (equal to ``grad_norm`` when nothing
edited the gradient; NaN where an edit was first seen at this step and nothing was measured
before it; not finite where an edited layer's raw gradient had a non-finite entry, a step
the ``nonfinite`` event reports and no detector reads). The spike detectors read the
raw norm. On logged steps also ``grad_rms = ||g|| / sqrt(numel)`` and ``grad_max_abs``. The
global row (last entry) is the norm of all tracked layers together; NaN when a layer is.
"""

from __future__ import annotations

import torch

from gradlens.catalog import FAMILIES
from gradlens.families.base import Statistic, StepContext, nan_where
from gradlens.families.raw import raw_sq


class Norms(Statistic):
    spec = FAMILIES["norms"]
    every_step = True

    def partials(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        """FSDP2: this rank's shards' sums; none where the step's gradient is whole on every
        rank (one process; DDP, whose ``p.grad`` is already all-reduced)."""
        if ctx.shards is None:
            return {}
        out = {"sq": ctx.sq, "nonfinite": ctx.nonfinite}
        if ctx.logging:
            out["max_abs"] = ctx.max_abs
        if ctx.pre_sq is not None:  # the raw norms' partial sums, as ctx.sq's
            contrib = self.lens.mask([s.contributes for s in ctx.shards])
            out["pre_sq"] = torch.where(contrib, ctx.pre_sq, 0.0)
        return out

    def emit(self, ctx: StepContext, red, out) -> None:
        lens = self.lens
        sq = red.get("sq", ctx.sq)  # absent: the step's own values are global
        nonfinite = red.get("nonfinite", ctx.nonfinite)
        numel = lens.const("numel")
        dead = nonfinite >= numel  # no finite entry: no norm
        present = lens.mask(ctx.present)
        sq = torch.where(present & ~dead, sq, lens.const("nan_vec"))
        ctx.sq_reduced, ctx.pre_sq_reduced = sq, red.get("pre_sq", ctx.pre_sq)
        norms = sq.sqrt()
        total = torch.where(present, sq, lens.const("zero")).sum().sqrt().reshape(1)
        out["grad_norm"] = torch.cat([norms, total])
        out["nonfinite_count"] = torch.cat([nonfinite, nonfinite.sum().reshape(1)])
        ctx.step_ok = nonfinite.sum() == 0  # a step with non-finite entries feeds no detector
        raw, _, ok = raw_sq(lens, ctx)
        if ctx.edited is not None and any(ctx.edited) and ctx.pre_sq is None:
            raw = nan_where(raw, ok)  # edited, not measured: unknown
        raw = torch.where(present, raw, lens.const("nan_vec"))
        total_pre = torch.where(present, raw, lens.const("zero")).sum().sqrt().reshape(1)
        out["grad_norm_preclip"] = torch.cat([raw.sqrt(), total_pre])
        if not ctx.logging:
            return
        out["grad_rms"] = norms / numel.sqrt()
        out["grad_max_abs"] = red.get("max_abs", ctx.max_abs)
