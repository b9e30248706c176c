"""The raw gradient: squared norms before any edit between the last backward and the step.

The observer (:mod:`gradlens.core.observer`) measures ``pre = ||g||^2`` per layer at the end
of the last backward, after DDP's all-reduce or FSDP2's reduce-scatter (FSDP2: partial sums
of the shards, reduced in the flush's collective as the step's own norms are), whenever the
loop edits. At the step, ``sq`` is the squared norm of what the optimizer consumes and
``c2 = sq / pre`` the per-layer factor of the edit. One common factor over the edited layers
(norm clipping; GradScaler unscaling, whose scale is known) is exact: the raw gradient is the
consumed one times ``1 / c2``, and every family describes it. Factors that differ by more
than the rounding of the gradient's dtype (value clipping, per-layer edits) make the edited
layers invalid: NaN with a validity event. Same rule in one process and under
torch.distributed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gradlens.families.base import StepContext, edit_tolerance

if TYPE_CHECKING:
    from gradlens.core.lens import GradLens


def raw_sq(lens: GradLens, ctx: StepContext):
    """``(raw_sq, unit_factor, ok)`` of a step (cached in ``ctx.data``): per-layer squared norms
    before edits (after the data-parallel reduction; FSDP2: the reduced sums of the shards'),
    unscaled when a GradScaler was given; the factor that turns the step gradient's per-unit
    squared norms into raw ones (None: 1); and the validity mask (None: all valid). Needs
    ``ctx.sq_reduced`` and ``ctx.pre_sq_reduced`` (the norms family)."""
    if "raw" in ctx.data:
        return ctx.data["raw"]
    sq = ctx.sq_reduced
    pre = ctx.pre_sq_reduced
    factor = ok = None
    scaled = False  # raw still carries the loss scale
    if ctx.edited is None or not any(ctx.edited):
        raw = sq
        scaled = not ctx.step_unscaled
    elif pre is None:  # edited where nothing was measured: unknown
        raw = sq
        scaled = not ctx.step_unscaled
        ok = lens.mask([not e for e in ctx.edited])
    else:
        edited = lens.mask(ctx.edited)
        c2 = torch.where(edited & (pre > 0), sq / pre, torch.ones_like(sq))
        both = torch.where(edited, sq, lens.const("zero")).nansum()
        ref = both / torch.where(edited, pre, lens.const("zero")).nansum()
        tol = edit_tolerance(lens.grad_dtype)
        spread = torch.where(edited, (c2 / ref - 1).abs(), lens.const("zero"))
        ok = (spread <= tol).all() | ~edited
        # unedited layers: their step gradient is what backward left (scaled or not)
        raw = torch.where(edited, pre, sq)
        factor = 1.0 / c2
        if ctx.loss_scale is not None:
            s2 = ctx.loss_scale**2
            unedited_scaled = not ctx.step_unscaled
            raw = torch.where(edited | unedited_scaled, raw / s2, raw)
            factor = torch.where(edited | unedited_scaled, factor / s2, factor)
    if scaled and ctx.loss_scale is not None:
        raw = raw / ctx.loss_scale**2
        factor = 1.0 / ctx.loss_scale**2
    ctx.data["raw"] = (raw, factor, ok)
    return ctx.data["raw"]
