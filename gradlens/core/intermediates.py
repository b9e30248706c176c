"""Per-step intermediates shared by several families, each computed once per layer per step.

- ``raw``: the squared norm of the gradient *before* any edit between the last backward and
  the step (clipping), and the per-layer factor ``c2 = after / before``, unscaled with the
  GradScaler's scale (whose in-place unscaling leaves no trace on the tensors: the scaler's
  own state says whether the step gradient is unscaled). One common factor (norm clipping)
  is exact: every family describes the raw gradient. Per-layer factors that differ mean a non-uniform edit (value clipping,
  per-layer edits): the edited layers are invalid (NaN, with a validity event).
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
from gradlens.families.base import StepContext, edit_tolerance

if TYPE_CHECKING:
    from gradlens.core.lens import GradLens


class Intermediates:
    """Lazily computed shared values of one logged step (``ctx.shared``)."""

    def __init__(self, lens: GradLens, ctx: StepContext, need_units: bool, need_fans: bool):
        self.lens, self.ctx = lens, ctx
        self.need_units, self.need_fans = need_units or need_fans, need_fans
        self._units: list[torch.Tensor | None] | None = None
        self._fans: dict[int, torch.Tensor] = {}
        self._raw: tuple | None = None

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
        """``(raw_sq, unit_factor, ok)``: squared norms before edits, unscaled when a
        GradScaler was given; the factor that turns the step gradient's per-unit squared
        norms into raw ones (None: 1); and the validity mask (None: all valid)."""
        if self._raw is not None:
            return self._raw
        ctx, lens = self.ctx, self.lens
        sq = ctx.sq_reduced
        factor = ok = None
        scaled = False  # raw still carries the loss scale
        if ctx.world > 1 or ctx.edited is None or not any(ctx.edited):
            raw = sq  # not checked under torch.distributed (see the README)
            scaled = not ctx.step_unscaled
        elif ctx.pre_sq is None:  # edited where nothing was measured: unknown
            raw = sq
            scaled = not ctx.step_unscaled
            ok = lens.mask([not e for e in ctx.edited])
        else:
            pre = ctx.pre_sq
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
        self._raw = (raw, factor, ok)
        return self._raw
