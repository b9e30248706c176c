"""Spike detectors on the per-layer and global raw gradient norms and on the loss, every step.

The gradient detectors read ``grad_norm_preclip`` (before clipping and other edits, after
the data-parallel reduction, unscaled; :mod:`gradlens.families.norms`): clipping caps the
consumed norm, so a detector on it would be blind exactly where loops clip. A forecast
z-score on ``log(grad_norm_preclip)`` (:func:`gradlens.stats.zscore_update`) and the ratio
to the running maximum; the loss gets the z-score on its value. A step that the GradScaler
skipped, or whose gradient has a non-finite entry, never enters a detector's state: its
z-scores are NaN and the warm-up counts valid steps only (the ``nonfinite`` and
``skipped_step`` events report such steps instead).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gradlens import stats as S
from gradlens.catalog import FAMILIES
from gradlens.families.base import Statistic, StepContext
from gradlens.schema import GLOBAL, SpikeEvent


class Spikes(Statistic):
    spec = FAMILIES["spikes"]
    every_step = True

    def bind(self, lens) -> None:
        super().bind(lens)
        self.state: dict[str, torch.Tensor] = {}

    def _detect(self, key: str, x: torch.Tensor, ok: torch.Tensor):
        st = self.state
        if f"{key}_mean" not in st:
            st[f"{key}_mean"], st[f"{key}_var"], st[f"{key}_count"] = S.zscore_init(x)
            st[f"{key}_max"] = S.max_ratio_init(x)
        x = torch.where(ok, x, torch.full_like(x, math.nan))
        tracked = torch.log(x.clamp_min(1e-30)) if key == "grad" else x
        tracked = torch.where(x > 0, tracked, torch.full_like(tracked, math.nan)) \
            if key == "grad" else tracked
        z, flags, st[f"{key}_mean"], st[f"{key}_var"], st[f"{key}_count"] = S.zscore_update(
            tracked, st[f"{key}_mean"], st[f"{key}_var"], st[f"{key}_count"],
            self.lens.config.spikes)
        ratio, st[f"{key}_max"] = S.max_ratio_update(x, st[f"{key}_max"])
        return z, flags, ratio

    def partials(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {} if ctx.loss is None else {"loss": ctx.loss}  # the mean over ranks

    def emit(self, ctx: StepContext, red, out) -> None:
        ok = ctx.step_ok & (not ctx.skipped)
        z, flags, ratio = self._detect("grad", out["grad_norm_preclip"], ok)
        out["grad_norm_z"] = z
        out["_flags"] = flags.float()
        if ctx.logging:
            out["grad_norm_ratio_max"] = ratio[: len(self.lens.layers)]
        loss = red.get("loss")
        if loss is not None:
            loss_z, loss_flag, _ = self._detect("loss", loss.reshape(1), ok)
            out["loss"] = loss.reshape(1)
            out["loss_z"] = loss_z
            out["_loss_flag"] = loss_flag.float()

    def events(self, step: int, values: dict[str, list[float]],
               present: list[bool]) -> list[SpikeEvent]:
        names = [i.name for i in self.lens.layers]
        L = len(names)
        out: list[SpikeEvent] = []
        flags, z, norm = values["_flags"], values["grad_norm_z"], values["grad_norm_preclip"]
        out.extend(SpikeEvent(step, names[k], "grad_norm", norm[k], z[k])
                   for k in range(L) if present[k] and flags[k] > 0)
        if flags[L] > 0:
            ranked = sorted((k for k in range(L) if present[k] and math.isfinite(z[k])),
                            key=lambda k: z[k], reverse=True)
            top = tuple(names[k] for k in ranked[: self.lens.config.spikes.top_k])
            out.append(SpikeEvent(step, GLOBAL, "grad_norm_global", norm[L], z[L], top))
        nonfinite = values["nonfinite_count"]
        out.extend(SpikeEvent(step, names[k], "nonfinite", nonfinite[k], nonfinite[k])
                   for k in range(L) if present[k] and nonfinite[k] > 0)
        if values.get("_loss_flag", [0.0])[0] > 0:
            out.append(SpikeEvent(step, GLOBAL, "loss", values["loss"][0], values["loss_z"][0]))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {k: v.detach().clone() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = {k: v.clone() for k, v in state.items()}
