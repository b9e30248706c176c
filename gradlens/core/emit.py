"""The deferred steps' statistics: ONE reduction of everything rank-local, then each family
emits in order, with the layers it declares invalid masked to NaN (a ``validity`` event at
the flush says why)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gradlens.core import distributed as D
from gradlens.core.intermediates import Intermediates
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
    pack = D.Pack(lens.world, D.rank())
    runs = []
    for j, ctx in enumerate(records):
        ctx.key = f"{j}:"
        last = j == len(records) - 1 and ctx.logging and ctx.grads is not None
        run = [f for f in lens.families if f.every_step or last]
        runs.append((ctx, run, last))
        if last:
            ctx.shared = Intermediates(lens, ctx, lens.intermediates)
            ctx.shared.contribute(pack)
        for f in run:
            f.contribute(ctx, pack)
    red = pack.reduce()  # the one collective under torch.distributed
    for ctx, run, last in runs:
        out: dict[str, torch.Tensor] = {}
        invalid = dict(ctx.data["host_invalid"])
        for f in run:
            before = set(out)
            f.emit(ctx, red, out)
            bad = {**(f.invalid(ctx) if last else {}), **invalid.get(f.name, {})}
            if bad:
                invalid[f.name] = bad
                mask_layers(out, set(out) - before, lens.mask(
                    [-1 not in bad and k not in bad for k in range(len(lens.layers))]))
        if last and lens.consistency_families:
            raw_ok = ctx.shared.raw(red)[2]
            if raw_ok is not None and ctx.pre_sq is not None:
                out["_edit_ok"] = raw_ok.to(lens.dtype)
        lens._pending.append((ctx.step, "step", StepOutput(
            out, ctx.present, ctx.micro, ctx.logging, ctx.skipped,
            batch=ctx.batch * lens.world if len(ctx.sizes) == ctx.micro else 0,
            invalid=invalid)))
        if ctx.skipped:
            lens._pending.append((ctx.step, "event", SpikeEvent(ctx.step, GLOBAL,
                                                                "skipped_step", 1.0, 1.0)))
