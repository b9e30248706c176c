"""Temporal variance across steps: EMAs of g and of SCALE's normalized G/r, every step.

``temporal_var = E||g||^2 - ||E g||^2`` under an EMA of factor ``temporal_beta``, its per-element
and noise-scale forms, and the per-element variance of ``G/r`` (what SCALE's update sees). One
exact buffer pair per matrix within ``temporal_budget_bytes`` (output and embedding first),
a count sketch beyond it (:func:`gradlens.stats.temporal_init`). The exact states of
same-shaped matrices are stacked and advance together, a few kernels per stack at every step
(:class:`gradlens.stats.temporal_groups.TemporalStack`), not per matrix. Describes the gradient the
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
from gradlens.stats.summary_plan import PLAN_STACK_ENTRIES
from gradlens.stats.temporal_groups import TemporalStack


class Temporal(Statistic):
    spec = FAMILIES["temporal"]
    every_step = True  # the EMAs advance at every step, after the detectors

    def bind(self, lens) -> None:
        super().bind(lens)
        self.buffers: dict[int, dict[str, Any]] = {}
        # exact states of same-shaped matrices, stacked (gradlens.stats.temporal_groups):
        # (layer indices, their index on device, the stack, a zero gradient for absent rows)
        self.stacks: list[tuple[list[int], torch.Tensor, TemporalStack, list]] = []
        self._single: list[int] = []  # sketched (or loaded unstackable) states, one by one
        self._order: torch.Tensor | None = None  # readout rows -> layers (last: NaN)
        self._saved: dict[int, dict[str, Any]] | None = None
        self._warned = False
        self._pending: tuple[list, torch.Tensor] | None = None

    def cost(self, k: int) -> int:
        """Bytes of layer k's exact temporal buffers: EMAs of g and of G/r, float32."""
        return 2 * self.lens.layers[k].numel * 4

    def _allocate(self) -> None:
        lens = self.lens
        saved, self._saved = self._saved, None
        matrices = [k for k in range(len(lens.layers)) if lens.matrix[k]]
        exact: dict[int, bool] = {}
        if saved is not None:  # resumed: the saved layers, each as it was saved
            exact = {k: st.get("sketch_dim") is None and "mean_n" in st
                     for k, st in saved.items()}
        else:
            budget = lens.config.temporal_budget_bytes
            if budget is None:
                budget = sum(self.cost(k) for k in matrices)
            order = sorted(matrices, key=lambda k: {Role.OUTPUT: 0, Role.EMBEDDING: 1}.get(
                lens.layers[k].role, 2))
            for k in order:
                exact[k] = self.cost(k) <= budget
                if exact[k]:
                    budget -= self.cost(k)
        groups: dict[tuple, list[int]] = {}
        for k in sorted(exact):
            p = lens.layers[k].param
            if exact[k]:
                acc = S.accumulation_dtype(p.dtype)
                groups.setdefault((tuple(p.shape), lens.layers[k].layout, acc), []).append(k)
            elif saved is not None:
                self.buffers[k] = saved[k]
            else:
                self.buffers[k] = S.temporal_init(p, sketch_dim=lens.config.sketch_dim, seed=k)
        self._single = [k for k in sorted(exact) if not exact[k]]
        numels = [i.numel for i in lens.layers]
        device = lens.device or lens.layers[0].param.device
        for (shape, layout, acc), idx in groups.items():
            for run in S.norms.chunked([idx], numels, PLAN_STACK_ENTRIES):
                stack = TemporalStack(len(run), shape, layout, acc, device, seeds=run)
                for j, k in enumerate(run):
                    if saved is not None:
                        stack.load(j, saved[k])
                    self.buffers[k] = stack.state(j)
                self.stacks.append((run, torch.tensor(run, device=device), stack, []))
        rows = [k for run, *_ in self.stacks for k in run] + self._single
        where = {k: j for j, k in enumerate(rows)}
        self._order = torch.tensor([where.get(k, len(rows)) for k in range(len(lens.layers))],
                                   device=device)

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
        if self._order is None:
            self._allocate()
        # the step summary says which gradients are finite (no entry, and no square, is not)
        finite = (ctx.nonfinite == 0) & torch.isfinite(ctx.sq)
        grads = [g if ctx.present[k] else None for k, g in enumerate(ctx.grads or [])]
        if ctx.world == 1:  # emit, at this step, applies it with the detectors' flags
            self._pending = (grads, finite)
        else:
            self._update(grads, finite)

    def _update(self, grads: list, ok: torch.Tensor) -> None:
        lens = self.lens
        beta = lens.config.temporal_beta
        for run, index, stack, zero in self.stacks:
            gs = [grads[k] for k in run]
            rows_ok = ok[index]
            if any(g is None for g in gs):  # absent rows: weight 0, a zero gradient
                rows_ok = rows_ok & lens.mask([g is not None for g in gs])
                if not zero:
                    zero.append(torch.zeros(stack.shape, dtype=stack.mean.dtype,
                                            device=stack.mean.device))
            stack.update_(gs, beta, rows_ok, zero[0] if zero else None)
        for k in self._single:
            if grads[k] is not None:
                S.temporal_update_(self.buffers[k], grads[k], lens.layers[k].layout, beta,
                                   finite=ok[k])

    def emit(self, ctx: StepContext, red, out) -> None:
        if ctx.shards is not None:
            return
        lens = self.lens
        if self._pending is not None:
            grads, ok = self._pending
            self._pending = None
            calm = spike_free(out, len(lens.layers))
            self._update(grads, ok if calm is None else ok & calm[:-1])
        if not ctx.logging or self._order is None:
            return
        nan = lens.const("nan")
        var, ns, normed = [], [], []
        for run, _, stack, _ in self.stacks:
            v, mean_sq, v_norm = stack.readout()
            var.append(v)
            ns.append(torch.where(mean_sq > 0, v / mean_sq, nan))  # no signal: no ratio
            normed.append(v_norm / lens.numel[run[0]])
        for k in self._single:
            st = self.buffers[k]
            if int(st["count"]) == 0:  # python int counter, no sync
                v = mean_sq = v_norm = nan
            else:
                v, mean_sq, v_norm = S.temporal_readout(st)
            var.append(v.reshape(1))
            ns.append(torch.where(mean_sq > 0, v / mean_sq, nan).reshape(1))
            normed.append((v_norm / lens.numel[k]).reshape(1))
        nan1 = nan.reshape(1)
        var_t = torch.cat([*var, nan1])[self._order]
        out["temporal_var"] = var_t
        out["temporal_var_per_element"] = var_t / lens.const("numel")
        out["temporal_noise_scale"] = torch.cat([*ns, nan1])[self._order]
        out["temporal_var_normalized"] = torch.cat([*normed, nan1])[self._order]

    def state_dict(self) -> dict[str, Any]:
        states = self._saved if self._saved is not None else self.buffers  # loaded, not yet used
        return {self.lens.layers[k].name: {kk: (vv.clone() if torch.is_tensor(vv) else vv)
                                           for kk, vv in st.items()}
                for k, st in states.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = {i.name: k for k, i in enumerate(self.lens.layers)}
        saved = {names[n]: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
                 for n, st in state.items() if n in names}
        self.buffers, self.stacks, self._single, self._order = {}, [], [], None
        self._saved = saved if saved else None
