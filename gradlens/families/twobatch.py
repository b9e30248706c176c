"""Two-batch (micro-batch) variance: McCandlish et al.'s estimator, for micro-batches of any size.

The hooks see each micro-batch's gradient ``h_k`` (rank-local under torch.distributed); the
step's raw gradient is ``p.grad`` before clipping (see ``core.intermediates``). Write
``h_k = lam v_k G_k`` with ``G_k`` the mean gradient of micro-batch k (``b_k`` examples,
``B = sum b_k``) and ``G = sum_k v_k G_k = p.grad / lam`` the step's big-batch gradient
(``sum v_k = 1``):

    loss_reduction   lam   v_k        (the loss each backward sees)
    mean             1     1/K        mean over the micro-batch, divided by K
    global_mean      1     b_k / B    sum over the micro-batch / B (HF's num_items_in_batch)
    sum              B     b_k / B    sum over the micro-batch

With independent examples, ``E||G_k||^2 = |G|^2 + tr/b_k`` and ``E||G||^2 = |G|^2 + c tr``,
``c = sum_k v_k^2 / b_k``. So ``E[sum_k b_k ||G_k||^2] = B |G|^2 + K tr`` and

    tr(Sigma) ~ (sum_k b_k ||G_k||^2 - B ||G||^2) / (K - B c),    |G|^2 ~ ||G||^2 - c tr,

unbiased for any sizes; equal sizes give the two-batch formula (``B c = 1``). With W ranks
the (rank, micro-batch) pairs are the small batches: ``K -> W K``, ``B -> W B``, ``c -> c/W``
(ranks must have equal micro-batch sizes). The per-unit noise-to-signal applies the same
estimator to each output unit, excluding units whose signal is zero within rounding
(:mod:`gradlens.stats.unit_noise`). Valid when: >= 2 small batches in the step; the gradient at
the step is the sum of what the hooks saw up to a common factor; micro-batch sizes are known
(from the tracked layers' inputs, or the ``batch_size`` option).

``noise_scale`` is the ratio of EMAs of ``tr`` and ``|G|^2``; a step whose gradient norm the
spike detector flagged (the layer's or the global one), or whose gradient is not finite,
does not enter them (its per-step ``twobatch_*`` rows are still written).
"""

from __future__ import annotations

from typing import Any

import torch

from gradlens import stats as S
from gradlens.catalog import FAMILIES
from gradlens.families.base import (
    Statistic,
    StepContext,
    micro_weights,
    nan_where,
    spike_free,
)
from gradlens.stats.microbatch import MicroNorms, micro_sq_norm_stacks
from gradlens.stats.shards import unit_count

#: Bytes of micro-batch gradients held at most during a logged step's backward pass before
#: they are reduced (the memory the batching costs; one gradient more at worst).
BUFFER_BYTES = 32 << 20
#: Device index patterns the two-batch scatter keeps (a graph that changes every step makes
#: new ones: the cache stays bounded).
INDEX_PATTERNS = 64


class TwoBatch(Statistic):
    spec = FAMILIES["twobatch"]

    def bind(self, lens) -> None:
        super().bind(lens)
        self.state: dict[str, torch.Tensor] = {}
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}
        self._sum_plans: dict = {}  # MicroNorms.sums' scatter layouts, per pattern
        self._unit_rows: dict[int, tuple[int, ...]] | None = None
        self.reset()

    def install(self, lens) -> None:
        lens.observer.on_microbatch(self._on_grad)
        lens.observer.on_backward_end(self._drain)

    def reset(self) -> None:
        self.norms = MicroNorms(len(self.lens.layers))
        self._buffer: list[tuple[int, int, torch.Tensor]] = []
        self._bytes = 0
        self._stash_pos: dict[int, int] = {}
        self._stash_ms: list[int] = []
        self._stash_task = -1
        self._sums_of: tuple | None = None

    def _on_grad(self, k: int, g: torch.Tensor, first: torch.Tensor | None) -> None:
        """One micro-batch's gradient of layer k (on logged steps); a non-finite entry makes
        the layer's estimates NaN at that step (the step's ``nonfinite`` event says why).

        ``first``: ``p.grad`` holding the first micro-batch (one process, with the second),
        about to be accumulated into: read now, for every layer at once at the first such call
        of the backward pass (no tracked ``p.grad`` has been added to yet), each layer's entry
        counted when its own call confirms it (a layer whose hook comes in another pass is
        read alone). Other gradients are kept by reference and reduced in batches: at the
        end of the backward pass, or once :data:`BUFFER_BYTES` are held."""
        count = self.norms.count  # the layer's gradients in arrival order: m = count[k]
        if first is not None:
            task = torch._C._current_graph_task_id()
            if task != self._stash_task:
                self._stash_task = task
                params = [info.param for info in self.lens.layers]
                ks = [j for j, p in enumerate(params) if p.grad is not None]
                self._stash_pos = {j: i for i, j in enumerate(ks)}
                self._stash_ms = [-1] * len(ks)  # -1 until the layer's own call
                self._add(ks, self._stash_ms, [params[j].grad.detach() for j in ks])
            pos = self._stash_pos.pop(k, None)
            m = count[k]
            count[k] = m + 1
            if pos is None:
                self._add([k], [m], [first])
            else:
                self._stash_ms[pos] = m
        m = count[k]
        count[k] = m + 1
        if self.lens.world > 1:  # DDP's reducer reads the same tensors: nothing held
            self._add([k], [m], [g])
        else:
            self._buffer.append((k, m, g))
            self._bytes += g.numel() * g.element_size()
            if self._bytes >= BUFFER_BYTES:
                self._drain()

    def _add(self, ks: list[int], ms: list[int], gs: list[torch.Tensor]) -> None:
        layers, matrix = self.lens.layers, self.lens.matrix
        self.norms.add(ks, ms, micro_sq_norm_stacks(
            gs, [layers[k].layout if matrix[k] else None for k in ks]))

    def _drain(self) -> None:
        """Reduce the held micro-batch gradients (one batched pass for all of them)."""
        if not self._buffer:
            return
        buffer, self._buffer, self._bytes = self._buffer, [], 0
        self._add([k for k, _, _ in buffer], [m for _, m, _ in buffer],
                  [g for _, _, g in buffer])

    @property
    def unit_rows(self) -> dict[int, tuple[int, ...]]:
        """The matrix layers by number of output units (fixed with the layer set)."""
        rows = self._unit_rows
        if rows is None:
            lens = self.lens
            by: dict[int, list[int]] = {}
            for k, info in enumerate(lens.layers):
                if lens.matrix[k]:
                    by.setdefault(unit_count(info.param.shape, info.layout), []).append(k)
            rows = self._unit_rows = {U: tuple(ks) for U, ks in by.items()}
        return rows

    def _sums(self, w: list[float]):
        """:meth:`MicroNorms.sums` of this step (once per step)."""
        if self._sums_of is None or self._sums_of[0] != w:
            lens = self.lens
            self._drain()
            self._sums_of = (w, self.norms.sums(w, self.unit_rows, lens.dtype,
                                                self._index, lens.device, self._sum_plans))
        return self._sums_of[1]

    def _index(self, positions: tuple[int, ...]) -> torch.Tensor:
        """A device index for the step's scatter, made once per pattern (a new list each step
        would be a host-to-device copy). Patterns follow the order gradients arrive in, the
        same every step unless the graph changes: at most :data:`INDEX_PATTERNS` are kept."""
        cache = self._indices
        index = cache.get(positions)
        if index is None:
            if len(cache) >= INDEX_PATTERNS:
                cache.clear()
            index = cache[positions] = torch.tensor(positions, dtype=torch.long,
                                                    device=self.lens.device)
        return index

    def _weights(self, ctx: StepContext) -> tuple[list[float], float, float]:
        """``(w_k, lam, c)``: ``sum_k b_k ||G_k||^2 = sum_k w_k ||h_k||^2``."""
        v, lam, c = micro_weights(ctx.sizes, self.lens.config.loss_reduction)
        return [b / (lam * vk) ** 2 for b, vk in zip(ctx.sizes, v, strict=True)], lam, c

    def invalid(self, ctx: StepContext) -> dict[int, str]:
        if ctx.micro * ctx.world < 2:
            return {}
        if len(ctx.sizes) != ctx.micro:
            return {-1: f"micro-batch sizes unknown ({len(ctx.sizes)} sizes seen for "
                        f"{ctx.micro} backward passes); pass batch_size= to the lens"}
        if ctx.world > 1 and not ctx.equal_sizes:
            return {-1: "micro-batches of unequal size under torch.distributed"}
        return {}

    def partials(self, ctx: StepContext) -> dict[str, Any]:
        """Under torch.distributed: this rank's weighted micro-batch sums (one process reads
        its own in :meth:`emit`)."""
        self._drain()
        if ctx.world == 1 or ctx.micro == 0 or len(ctx.sizes) != ctx.micro:
            return {}
        lens = self.lens
        w, _, _ = self._weights(ctx)
        a, counts, units, _ = self._sums(w)
        unit = {k: units[U][j] for U, ks in self.unit_rows.items() for j, k in enumerate(ks)}
        return {"a": a, "has": lens.flags([c > 0 for c in counts]), "unit": unit}

    def emit(self, ctx: StepContext, red, out) -> None:
        self._drain()
        lens = self.lens
        if ctx.micro * ctx.world < 2 or not any(self.norms.count) \
                or len(ctx.sizes) != ctx.micro:
            return
        L, W = len(lens.layers), ctx.world
        nan = lens.const("nan")
        w, lam, c = self._weights(ctx)
        K, B, c = W * ctx.micro, float(W * ctx.batch), c / W
        raw, unit_factor, ok = ctx.shared.raw()
        scale2 = 1.0 if ctx.loss_scale is None else ctx.loss_scale**2  # the hooks' scale
        if "a" in red:
            has = red["has"] > 0  # a rank without the layer adds a zero gradient
            a = torch.where(has, red["a"], nan)
        else:
            has = None
            a, counts, local_units, unit_counts = self._sums(w)
            a = torch.where(lens.mask([n > 0 for n in counts]), a, nan)
        a = a / scale2
        y = raw / lam**2
        trace = (a - B * y) / (K - B * c)
        trace = torch.where(torch.isfinite(a), trace, nan)  # a non-finite micro-batch
        signal = y - c * trace
        trace, signal = nan_where(trace, ok), nan_where(signal, ok)
        st = self.state
        if "trace" not in st:
            st["trace"] = torch.zeros(L, device=lens.device, dtype=lens.dtype)
            st["signal"] = torch.zeros(L, device=lens.device, dtype=lens.dtype)
            st["count"] = torch.zeros((), device=lens.device, dtype=lens.dtype)
        calm = spike_free(out, L)  # a flagged step stays out of the EMAs (its rows remain)
        calm = None if calm is None else calm[:L]
        noise_scale, st["trace"], st["signal"], st["count"] = S.ema_ratio_update(
            nan_where(trace, calm), nan_where(signal, calm), st["trace"], st["signal"],
            st["count"], lens.config.noise_ema)
        out.update({"twobatch_trace": trace, "twobatch_signal": signal,
                    "noise_scale": noise_scale, "var_per_element": trace / lens.const("numel")})
        units_red = red.get("unit", {})  # reduced per-unit sums (torch.distributed)
        meds, means, order = [], [], []
        for U, ks in self.unit_rows.items():  # layers of equal width: batched, one sort
            idx = lens.const_index(ks)
            blank = nan.expand(U)
            if has is not None:
                u_a = torch.stack([units_red.get(k, blank) for k in ks])
                u_a = torch.where(has[idx].unsqueeze(1), u_a, nan)
            else:  # a layer without an entry for every micro-batch: NaN
                u_a = torch.where(lens.mask([unit_counts[k] == ctx.micro for k in ks])
                                  .unsqueeze(1), local_units[U], nan)
            u_y = ctx.shared.units_of(ks, U)  # NaN rows for a layer without a gradient
            if unit_factor is not None:
                u_y = u_y * (unit_factor[idx].unsqueeze(1) if torch.is_tensor(unit_factor)
                             and unit_factor.ndim else unit_factor)
            u_y = u_y / lam**2
            u_trace = (u_a / scale2 - B * u_y) / (K - B * c)
            # signal = (K y - c a) / (K - B c): zero within the rounding of its two terms
            floor = S.signal_floor(K * u_y, c * u_a / scale2, K - B * c, lens.grad_dtype)
            m, mu = S.noise_to_signal_summary(u_trace, u_y - c * u_trace, floor)
            meds.append(m)
            means.append(mu)
            order += ks
        med = mean = lens.const("nan_vec")
        if order:
            idx = lens.const_index(tuple(order))
            med = med.index_copy(0, idx, torch.cat(meds).to(med.dtype))
            mean = mean.index_copy(0, idx, torch.cat(means).to(mean.dtype))
        out["unit_nsr_median"] = nan_where(med, ok)
        out["unit_nsr_mean"] = nan_where(mean, ok)

    def state_dict(self) -> dict[str, Any]:
        return {k: v.detach().clone() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = {k: v.clone() for k, v in state.items()}
