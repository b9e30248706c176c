"""Temporal variance across steps: EMAs of g and of SCALE's normalized G/r, every step.

``temporal_var = E||g||^2 - ||E g||^2`` under an EMA of factor ``temporal_beta``, its per-element
and noise-scale forms, and the per-element variance of ``G/r`` (what SCALE's update sees). One
exact buffer pair per matrix within ``temporal_budget_bytes`` (output and embedding first),
a count sketch beyond it (:func:`gradlens.stats.temporal_init`). Describes the gradient the
optimizer consumes. Off for FSDP2 shards (the per-unit RMS of ``G/r`` would need a collective
at every step). A step with a non-finite gradient entry, or whose norm the spike detector
flagged (the layer's or the global one), leaves that layer's EMAs as they were (its weight
is a device-side 0). Single process: the update waits for the detectors' flags of the same
step (``emit``, still before the optimizer steps); under torch.distributed the detectors
run at the flush, so there only non-finite steps are left out.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from gradlens import stats as S
from gradlens.catalog import FAMILIES
from gradlens.families.base import Statistic, StepContext, spike_free
from gradlens.roles import Role


class Temporal(Statistic):
    spec = FAMILIES["temporal"]
    every_step = True  # the EMAs advance at every step, after the detectors

    def bind(self, lens) -> None:
        super().bind(lens)
        self.buffers: dict[int, dict[str, Any]] = {}
        self._warned = False
        self._pending: tuple[list, torch.Tensor] | None = None

    def cost(self, k: int) -> int:
        """Bytes of layer k's exact temporal buffers: EMAs of g and of G/r, float32."""
        return 2 * self.lens.layers[k].numel * 4

    def _allocate(self) -> None:
        lens = self.lens
        matrices = [k for k in range(len(lens.layers)) if lens.matrix[k]]
        budget = lens.config.temporal_budget_bytes
        if budget is None:
            budget = sum(self.cost(k) for k in matrices)
        order = sorted(matrices, key=lambda k: {Role.OUTPUT: 0, Role.EMBEDDING: 1}.get(
            lens.layers[k].role, 2))
        for k in order:
            exact = self.cost(k) <= budget
            if exact:
                budget -= self.cost(k)
            self.buffers[k] = S.temporal_init(
                lens.layers[k].param, sketch_dim=None if exact else lens.config.sketch_dim,
                seed=k)

    def observe(self, ctx: StepContext) -> None:
        if ctx.shards is not None:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    "gradlens: temporal variance is off for sharded (FSDP2) gradients: its G/r "
                    "buffers would need the per-unit RMS reduced across shards at every step "
                    "(one collective per step), against the lens's one collective per flush",
                    RuntimeWarning, stacklevel=2)
            return
        if not self.buffers:
            self._allocate()
        # the step summary says which gradients are finite (no entry, and no square, is not)
        finite = (ctx.nonfinite == 0) & torch.isfinite(ctx.sq)
        grads = [g if ctx.present[k] else None for k, g in enumerate(ctx.grads or [])]
        if ctx.world == 1:  # emit, at this step, applies it with the detectors' flags
            self._pending = (grads, finite)
        else:
            self._update(grads, finite)

    def _update(self, grads: list, ok: torch.Tensor) -> None:
        for k, st in self.buffers.items():
            if grads[k] is not None:
                S.temporal_update_(st, grads[k], self.lens.layers[k].layout,
                                   self.lens.config.temporal_beta, finite=ok[k])

    def emit(self, ctx: StepContext, red, out) -> None:
        if ctx.shards is not None:
            return
        lens = self.lens
        if self._pending is not None:
            grads, ok = self._pending
            self._pending = None
            calm = spike_free(out, len(lens.layers))
            self._update(grads, ok if calm is None else ok & calm[:-1])
        if not ctx.logging:
            return
        nan = lens.const("nan")
        var, ns, normed = [], [], []
        for k in range(len(lens.layers)):
            st = self.buffers.get(k)
            if st is None or int(st["count"]) == 0:  # python int counter, no sync
                var.append(nan)
                ns.append(nan)
                normed.append(nan)
                continue
            v, mean_sq, v_norm = S.temporal_readout(st)
            var.append(v)
            ns.append(torch.where(mean_sq > 0, v / mean_sq, nan))  # no signal: no ratio
            normed.append(v_norm / lens.numel[k])
        var_t = torch.stack(var)
        out["temporal_var"] = var_t
        out["temporal_var_per_element"] = var_t / lens.const("numel")
        out["temporal_noise_scale"] = torch.stack(ns)
        out["temporal_var_normalized"] = torch.stack(normed)

    def state_dict(self) -> dict[str, Any]:
        return {self.lens.layers[k].name: {kk: (vv.clone() if torch.is_tensor(vv) else vv)
                                           for kk, vv in st.items()}
                for k, st in self.buffers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = {i.name: k for k, i in enumerate(self.lens.layers)}
        self.buffers = {names[n]: {k: (v.clone() if torch.is_tensor(v) else v)
                                   for k, v in st.items()}
                        for n, st in state.items() if n in names}
