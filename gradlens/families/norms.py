"""Norms and non-finite counts of the gradient the optimizer consumes, every step.

Per layer: ``grad_norm = ||g||_2`` over finite entries (NaN when every entry is non-finite,
or the layer has no gradient), ``nonfinite_count``, and on logged steps ``grad_rms =
||g|| / sqrt(numel)``, ``grad_max_abs``, and ``grad_norm_preclip``: the norm at the end of the
last backward pass, before clipping or any other edit, unscaled (equal to ``grad_norm`` when
nothing edited the gradient; not written under torch.distributed, where edits are not
checked). The global row (last entry) is the norm of all tracked
layers together; NaN when a layer is entirely non-finite.
"""

from __future__ import annotations

import torch

from gradlens.families.base import Statistic, StepContext, nan_where


class Norms(Statistic):
    name = "norms"
    emits = ("grad_norm", "grad_rms", "grad_max_abs", "nonfinite_count", "grad_norm_preclip")
    needs = frozenset({"step_grad"})
    every_step = True

    def contribute(self, ctx: StepContext, pack) -> None:
        if ctx.shards is not None:  # FSDP2: partial sums of this rank's shards
            pack.sum(ctx.key + "sq", ctx.sq)
            pack.sum(ctx.key + "nonfinite", ctx.nonfinite)
            if ctx.logging:
                pack.max(ctx.key + "max_abs", ctx.max_abs)

    def emit(self, ctx: StepContext, red, out) -> None:
        lens = self.lens
        sq = red.get(ctx.key + "sq", ctx.sq)
        nonfinite = red.get(ctx.key + "nonfinite", ctx.nonfinite)
        numel = lens.const("numel")
        dead = nonfinite >= numel  # no finite entry: no norm
        present = lens.mask(ctx.present)
        sq = torch.where(present & ~dead, sq, lens.const("nan_vec"))
        ctx.sq_reduced = sq
        norms = sq.sqrt()
        total = torch.where(present, sq, lens.const("zero")).sum().sqrt().reshape(1)
        out["grad_norm"] = torch.cat([norms, total])
        out["nonfinite_count"] = torch.cat([nonfinite, nonfinite.sum().reshape(1)])
        ctx.step_ok = nonfinite.sum() == 0  # a step with non-finite entries feeds no detector
        if not ctx.logging:
            return
        out["grad_rms"] = norms / numel.sqrt()
        out["grad_max_abs"] = red.get(ctx.key + "max_abs", ctx.max_abs)
        if ctx.shared is None or ctx.edited is None:
            return  # not checked (torch.distributed): no pre-clip norms
        raw, _, ok = ctx.shared.raw(red)
        if ctx.pre_sq is None:
            raw = nan_where(raw, ok)  # edited, not measured: unknown
        raw = torch.where(present, raw, lens.const("nan_vec"))
        total_pre = torch.where(present, raw, lens.const("zero")).sum().sqrt().reshape(1)
        out["grad_norm_preclip"] = torch.cat([raw.sqrt(), total_pre])
