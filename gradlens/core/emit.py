"""The deferred steps' statistics: ONE reduction of everything rank-local (each family's
declared partials, :mod:`gradlens.core.packing`), then each family emits in order from its
reduced partials, with the layers it declares invalid masked to NaN (a ``validity`` event at
the flush says why)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gradlens.core.intermediates import Intermediates
from gradlens.core.packing import INTERMEDIATES, Packing
from gradlens.core.records import StepOutput
from gradlens.families.base import mask_layers
from gradlens.schema import GLOBAL, SpikeEvent

if TYPE_CHECKING:
    from gradlens.core.lens import GradLens


def complete_steps(lens: GradLens) -> None:
    """Families' statistics of the deferred steps, in step order, after ONE reduction of
    everything rank-local (none with a single process)."""
    records, lens._deferred = lens._deferred, []
    if not records:
        return
    packing = Packing(lens.world, len(lens.layers))
    runs = []
    for j, ctx in enumerate(records):
        last = j == len(records) - 1 and ctx.logging and ctx.grads is not None
        run = [f for f in lens.families if f.every_step or last]
        if last:
            ctx.shared = Intermediates(lens, ctx, lens.intermediates)
            ctx.shared.reduced = packing.add(j, INTERMEDIATES, ctx.shared.partials(),
                                             ctx.logging)
        views = [packing.add(j, f.name, f.partials(ctx), ctx.logging) for f in run]
        runs.append((ctx, run, views, last))
    packing.reduce()  # the one collective under torch.distributed
    for ctx, run, views, last in runs:
        out: dict[str, torch.Tensor] = {}
        invalid = dict(ctx.data["host_invalid"])
        for f, red in zip(run, views, strict=True):
            before = set(out)
            f.emit(ctx, red, out)
            bad = {**(f.invalid(ctx) if last else {}), **invalid.get(f.name, {})}
            if bad:
                invalid[f.name] = bad
                mask_layers(out, set(out) - before, lens.mask(
                    [-1 not in bad and k not in bad for k in range(len(lens.layers))]))
        if last and lens.consistency_families:
            raw_ok = ctx.shared.raw()[2]
            if raw_ok is not None and ctx.pre_sq is not None:
                out["_edit_ok"] = raw_ok.to(lens.dtype)
        lens._pending.append((ctx.step, "step", StepOutput(
            out, ctx.present, ctx.micro, ctx.logging, ctx.skipped,
            batch=ctx.batch * lens.world if len(ctx.sizes) == ctx.micro else 0,
            invalid=invalid)))
        if ctx.skipped:
            lens._pending.append((ctx.step, "event", SpikeEvent(ctx.step, GLOBAL,
                                                                "skipped_step", 1.0, 1.0)))
        ctx.shared = None  # it refers back to ctx: dropped here, the step is freed at once
