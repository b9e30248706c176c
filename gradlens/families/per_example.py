"""Per-example variance from layer inputs and output gradients (no per-example gradients).

For ``Linear``/``Conv1D`` weights and ``Embedding`` tables a forward hook keeps the layer's
input ``A`` and a hook on its output gets ``D``; :func:`gradlens.stats.per_example_sq_norms_linear`
(``_embedding``) give ``q_b = ||D_b^T A_b||^2`` per example. With the conventions of
``families.twobatch`` (micro-batch k of ``b_k`` examples contributes ``lam v_k G_k``), example
b of micro-batch k has its own-loss gradient ``g_b`` with ``||g_b||^2 = q_b (b_k/(lam v_k))^2``,
and the step's gradient is ``G = sum_b u_b g_b``, ``u_b = v_k / b_k``. Then, with
``M = mean_b ||g_b||^2`` over the step's ``n`` examples, ``Y = ||G||^2`` (raw, before
clipping) and ``c = sum_b u_b^2 = sum_k v_k^2 / b_k``,

    E M = |G|^2 + tr,  E Y = |G|^2 + c tr   =>   tr ~ (M - Y) / (1 - c),  |G|^2 ~ Y - c tr,

which is the within-batch ``n/(n-1) (M - Y)`` when ``u_b = 1/n``, exact for unequal
micro-batches. A token-mean loss with padding (labels -100) gives padded tokens a zero output
gradient: an example's loss is the mean over its own non-padded tokens only when every
micro-batch's loss is normalized per example, so the per-example definition here is "the
example's share of the micro-batch loss, times b_k": with ragged padding, examples with more
tokens weigh more (stated in the README).

Valid when: each tracked module runs once per micro-batch (a module called several times, as
with shared weights, is NaN with a reason); the embedding lookup has one row of ids per
example (a broadcast ``(1, T)`` position lookup is NaN with a reason); ``scale_grad_by_freq``
is off; the gradient at the step is the hooks' sum up to a common factor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradlens import stats as S
from gradlens.families.base import Statistic, StepContext, nan_where

_MODULES = ("Linear", "Conv1D", "Embedding")


class PerExample(Statistic):
    name = "per_example"
    emits = ("pe_trace", "pe_signal", "pe_noise_scale", "pe_var_per_element",
             "critical_batch_size")
    needs = frozenset({"layer_io", "consistent_grad", "batch_size"})

    def bind(self, lens) -> None:
        super().bind(lens)
        self.tracked: dict[int, nn.Module] = {}
        self.state: dict[str, torch.Tensor] = {}
        self.reset()

    def install(self, lens) -> None:
        owners: dict[int, tuple[nn.Module, int]] = {}
        for k, info in enumerate(lens.layers):
            if info.aliases or info.layout == "vector":
                continue  # a tied tensor mixes two uses; per-example norms would be wrong
            module = lens.module_of(k)
            if module is None or type(module).__name__ not in _MODULES:
                continue
            if getattr(module, "weight", None) is not info.param:
                continue
            owners[id(module)] = (module, k)
        for module, k in owners.values():
            self.tracked[k] = module
            lens.observer.add(module.register_forward_hook(self._forward_hook(k),
                                                           with_kwargs=True))

    def reset(self) -> None:
        L = len(self.lens.layers)
        self.calls: list[list[tuple[torch.Tensor, int]]] = [[] for _ in range(L)]
        self.notes: dict[int, str] = {}
        self._grams: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _forward_hook(self, k: int):
        kind = self.lens.layers[k].layout

        def forward_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not (torch.is_grad_enabled() and torch.is_tensor(output)
                    and output.requires_grad and self.lens.logging_step()):
                return
            source = args[0] if args else next(
                (v for v in kwargs.values() if torch.is_tensor(v)), None)
            if source is None:
                self.notes[k] = "no tensor input seen in the module's forward"
                return
            a = source.detach()
            if kind == "embedding":
                if getattr(module, "scale_grad_by_freq", False):
                    self.notes[k] = "scale_grad_by_freq: per-example gradients are not a sum"
                    return
                pad = getattr(module, "padding_idx", None)
                keep = (a != pad) if pad is not None else None
            output.register_hook(lambda d: self._on_output_grad(k, kind, source, a, d, keep
                                                                if kind == "embedding" else None))

        return forward_hook

    def _on_output_grad(self, k: int, kind: str, source: torch.Tensor, a: torch.Tensor,
                        d: torch.Tensor, keep: torch.Tensor | None) -> None:
        d = d.detach()
        if a.shape[0] != d.shape[0]:
            self.notes[k] = "the input's batch dimension is not the output gradient's"
            return
        if kind == "embedding":
            if keep is not None:  # padding rows get no gradient (nn.Embedding's padding_idx)
                d = d * keep.unsqueeze(-1).to(d.dtype)
            sq = S.per_example_sq_norms_embedding(a, d)
        else:
            sq = S.per_example_sq_norms_linear(a, d, a_gram=self._input_gram(source, a, d))
        self.calls[k].append((S.finite_sum(sq), int(sq.shape[0])))

    def _input_gram(self, source: torch.Tensor, a: torch.Tensor,
                    d: torch.Tensor) -> torch.Tensor | None:
        """The token Gram matrices of a layer input (``S.token_grams``), shared by the layers
        that read the same tensor (query/key/value, gate/up): computed by the first of them
        whose own cheaper method is Gram, kept for the next ones (the last two inputs; none
        above the per-example kernels' chunk budget)."""
        for src, gram in self._grams:
            if src is source:
                return gram
        B, fin, fout = a.shape[0], a.shape[-1], d.shape[-1]
        T = a.numel() // max(B * fin, 1)
        if B * T * T > S.DEFAULT_CHUNK_ELEMS or S.choose_per_example_method(T, fin, fout) != "gram":
            return None
        gram = S.token_grams(a)
        self._grams = [*self._grams[-1:], (source, gram)]
        return gram

    def invalid(self, ctx: StepContext) -> dict[int, str]:
        bad = dict(self.notes)
        for k, calls in enumerate(self.calls):
            if not calls or k in bad:
                continue
            if len(calls) != ctx.micro:
                bad[k] = (f"the module ran {len(calls)} times in {ctx.micro} micro-batch(es) "
                          "(shared or repeated module)")
            elif len(ctx.sizes) == ctx.micro and [b for _, b in calls] != ctx.sizes:
                bad[k] = (f"the module's input has batch size {calls[0][1]} where the "
                          f"micro-batch has {ctx.sizes[0]} examples (a broadcast lookup such "
                          "as position ids of shape (1, T), or flattened tokens); pass "
                          "expanded ids (ids.expand(B, -1)) to get per-example values")
        return bad

    def _weights(self, ctx: StepContext, k: int) -> tuple[list[float], float, float] | None:
        """``(f_j, lam, c)`` for layer k's calls: ``||g_b||^2 = q_b f_j``."""
        calls = self.calls[k]
        sizes = [b for _, b in calls]
        K, n = len(sizes), float(sum(sizes))
        red = self.lens.config.loss_reduction
        lam = n if red == "sum" else 1.0
        v = [1.0 / K] * K if red == "mean" else [b / n for b in sizes]
        f = [(b / (lam * vk)) ** 2 for b, vk in zip(sizes, v, strict=True)]
        c = sum(vk * vk / b for vk, b in zip(v, sizes, strict=True))
        return f, lam, c

    def _mean_sq(self, ctx: StepContext, k: int) -> torch.Tensor:
        """This rank's ``sum_b ||g_b||^2`` of layer k (0 when none)."""
        if not self.calls[k]:
            return self.lens.const("zero")
        f, _, _ = self._weights(ctx, k)
        total = self.calls[k][0][0] * f[0]
        for (q, _), fj in zip(self.calls[k][1:], f[1:], strict=True):
            total = total + q * fj
        return total

    def contribute(self, ctx: StepContext, pack) -> None:
        if ctx.world > 1 and any(self.calls):
            pack.sum("pe_sq", torch.stack([self._mean_sq(ctx, k)
                                           for k in range(len(self.lens.layers))]))

    def emit(self, ctx: StepContext, red, out) -> None:
        lens = self.lens
        if not any(self.calls):
            return
        nan = lens.const("nan")
        raw, _, ok = ctx.shared.raw(red)
        scale2 = 1.0 if ctx.loss_scale is None else ctx.loss_scale**2
        W = ctx.world
        trace, signal = [], []
        for k in range(len(lens.layers)):
            n = sum(b for _, b in self.calls[k]) * W
            if n < 2 or not ctx.present[k]:
                trace.append(nan)
                signal.append(nan)
                continue
            _, lam, c = self._weights(ctx, k)
            c = c / W
            total = red["pe_sq"][k] if "pe_sq" in red else self._mean_sq(ctx, k)
            m = total / scale2 / n
            y = raw[k] / lam**2
            t = (m - y) / (1.0 - c)
            trace.append(t)
            signal.append(y - c * t)
        trace_t = nan_where(torch.stack(trace), ok)
        signal_t = nan_where(torch.stack(signal), ok)
        out["pe_trace"] = trace_t
        out["pe_signal"] = signal_t
        out["pe_noise_scale"] = trace_t / signal_t
        out["pe_var_per_element"] = trace_t / lens.const("numel")
        # B_crit ~ B_simple of the whole model: ratio of EMAs of the sums over the layers
        # that have per-example values (a fixed set: the hooked, valid ones)
        total_t, total_s = trace_t.nansum().reshape(1), signal_t.nansum().reshape(1)
        st = self.state
        if "trace" not in st:
            st["trace"], st["signal"], st["count"] = (
                torch.zeros(1, device=lens.device, dtype=lens.dtype) for _ in range(3))
        ratio, st["trace"], st["signal"], st["count"] = S.ema_ratio_update(
            total_t, total_s, st["trace"], st["signal"], st["count"], lens.config.noise_ema)
        out["critical_batch_size"] = torch.cat([torch.full_like(trace_t, float("nan")), ratio])

    def state_dict(self) -> dict[str, Any]:
        return {k: v.detach().clone() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = {k: v.clone() for k, v in state.items()}
