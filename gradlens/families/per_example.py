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

1-D parameters: a norm's gain gets ``g_b = sum_t d_bt * x_hat_bt`` (``x_hat`` recomputed from
the module's input as its forward does), a bias ``g_b = sum_t d_bt``
(:mod:`gradlens.stats.per_example_vector`). ``per_example_scope="norms"`` tracks the norm
gains only (the cheap gradient-noise-scale path of Gray et al. 2024).

A Linear module called several times in a micro-batch (shared weights, a block applied twice)
is exact: its per-example gradient is ``sum_c D_c^T A_c``, and the cross terms between calls
are added in the same backward. A checkpointed module's recomputation is not counted. Valid
when: the embedding lookup has one row of ids per example (a broadcast ``(1, T)`` position
lookup is NaN with a reason), it is looked up once per micro-batch, ``scale_grad_by_freq`` is
off, and the gradient at the step is the hooks' sum up to a common factor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradlens import stats as S
from gradlens.core.observer import in_backward
from gradlens.families.base import Statistic, StepContext, micro_weights, nan_where, spike_free

_MATRIX_MODULES = ("Linear", "Conv1D", "Embedding")
_BIAS_MODULES = ("Linear", "Conv1D", "LayerNorm")


def _kind(module: nn.Module, leaf: str, param: torch.Tensor, layout: str) -> str | None:
    """How layer ``module.<leaf>`` gets per-example norms: ``matrix`` (Linear / Conv1D
    weight), ``embedding``, ``gain`` (a norm's weight), ``bias``; None: not supported."""
    if getattr(module, leaf, None) is not param:
        return None
    name = type(module).__name__
    if leaf == "weight" and layout != "vector" and name in _MATRIX_MODULES:
        return "embedding" if layout == "embedding" else "matrix"
    if leaf == "weight" and S.norm_kind(module) is not None:
        return "gain"
    if leaf == "bias" and (name in _BIAS_MODULES or isinstance(module, nn.LayerNorm)):
        return "bias"
    return None


class PerExample(Statistic):
    name = "per_example"
    emits = ("pe_trace", "pe_signal", "pe_noise_scale", "pe_var_per_element",
             "critical_batch_size")
    needs = frozenset({"layer_io", "consistent_grad", "batch_size"})

    def bind(self, lens) -> None:
        super().bind(lens)
        self.tracked: dict[int, str] = {}
        self.tied: set[int] = set()
        self.state: dict[str, torch.Tensor] = {}
        self.reset()

    def install(self, lens) -> None:
        scope = lens.config.per_example_scope
        by_module: dict[int, tuple[nn.Module, list[tuple[int, str]]]] = {}
        for k, info in enumerate(lens.layers):
            if info.aliases:
                self.tied.add(k)  # a tied tensor mixes two uses: NaN with a reason
                continue
            module = lens.module_of(k)
            if module is None:
                continue
            leaf = info.name[len(info.module_name) + 1:] if info.module_name else info.name
            kind = _kind(module, leaf, info.param, info.layout)
            if kind is None or (scope == "norms" and kind != "gain"):
                continue
            self.tracked[k] = kind
            by_module.setdefault(id(module), (module, []))[1].append((k, kind))
        for module, items in by_module.values():
            lens.observer.add(module.register_forward_hook(self._forward_hook(items),
                                                           with_kwargs=True))

    def reset(self) -> None:
        L = len(self.lens.layers)
        # per layer: micro-batch index -> [sum_b q_b, examples]; the calls of that micro-batch
        self.totals: list[dict[int, list]] = [{} for _ in range(L)]
        self._open: list[tuple[int, list]] = [(-1, []) for _ in range(L)]
        self.notes: dict[int, str] = {}
        self._grams: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _forward_hook(self, items: list[tuple[int, str]]):
        def forward_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not (torch.is_grad_enabled() and torch.is_tensor(output)
                    and output.requires_grad and self.lens.logging_step()) or in_backward():
                return  # in_backward: a checkpoint's recomputation; the first call counts
            source = args[0] if args else next(
                (v for v in kwargs.values() if torch.is_tensor(v)), None)
            if source is None:
                for k, _ in items:
                    self.notes[k] = "no tensor input seen in the module's forward"
                return
            a = source.detach()
            x_hat = None
            for k, kind in items:
                if kind == "embedding" and getattr(module, "scale_grad_by_freq", False):
                    self.notes[k] = "scale_grad_by_freq: per-example gradients are not a sum"
                if kind == "gain" and x_hat is None:
                    x_hat = S.normalized_input(module, a)
            pad = getattr(module, "padding_idx", None)
            output.register_hook(lambda d: self._on_output_grad(items, source, a, x_hat, pad,
                                                                d.detach()))

        return forward_hook

    def _on_output_grad(self, items, source, a, x_hat, pad, d: torch.Tensor) -> None:
        dim = self.lens.config.batch_dim
        if dim:  # sequence-first: the kernels take the batch dimension first
            a, d = a.movedim(dim, 0), d.movedim(dim, 0)
            x_hat = None if x_hat is None else x_hat.movedim(dim, 0)
        if a.shape[0] != d.shape[0]:
            for k, _ in items:
                self.notes[k] = "the input's batch dimension is not the output gradient's"
            return
        for k, kind in items:
            if k in self.notes:
                continue
            if kind in ("gain", "bias"):
                sq = self._vector_sq(k, kind, x_hat, d)
            else:
                sq = self._matrix_sq(k, kind, source, a, d, pad)
            if sq is None:
                continue
            total = S.finite_sum(sq)
            idx = self.lens.observer.micro_seen[k]  # backward passes done for this layer
            entry = self.totals[k].get(idx)
            if entry is None:
                self.totals[k][idx] = [total, int(sq.shape[0])]
            else:
                entry[0] = entry[0] + total

    def _earlier(self, k: int) -> list:
        """The earlier calls of layer k in this backward pass (a repeated module)."""
        idx = self.lens.observer.micro_seen[k]
        open_idx, earlier = self._open[k]
        if open_idx != idx:
            earlier = []
            self._open[k] = (idx, earlier)
        return earlier

    def _vector_sq(self, k: int, kind: str, x_hat, d: torch.Tensor) -> torch.Tensor:
        """A 1-D parameter's per-example gradient is a vector ``(B, F)``: formed, squared,
        and dotted with the earlier calls' (a repeated module's cross terms)."""
        g = S.per_example_grads_norm_gain(x_hat, d) if kind == "gain" else \
            d.reshape(d.shape[0], -1, d.shape[-1]).to(self.lens.dtype).sum(1)
        sq = g.square().sum(-1)
        earlier = self._earlier(k)
        for prev in earlier:
            sq = sq + 2 * (prev * g).sum(-1)
        earlier.append(g)
        return sq

    def _matrix_sq(self, k, kind, source, a, d, pad) -> torch.Tensor | None:
        """``||g_b||^2`` contributions of this call; a second call of the same module in the
        same backward adds its cross terms with the earlier ones: the per-example gradient
        of a module called c times is ``sum_c D_c^T A_c`` (tokens concatenated), so
        ``||.||^2 = sum_c ||D_c^T A_c||^2 + 2 sum_{c<c'} <D_c^T A_c, D_c'^T A_c'>``."""
        if kind == "embedding":
            if pad is not None:  # padding rows get no gradient (nn.Embedding's padding_idx)
                d = d * (a != pad).unsqueeze(-1).to(d.dtype)
            sq = S.per_example_sq_norms_embedding(a, d)
        else:
            sq = S.per_example_sq_norms_linear(a, d, a_gram=self._input_gram(source, a, d))
        earlier = self._earlier(k)
        if earlier and kind == "embedding":
            self.notes[k] = "an embedding looked up more than once in a micro-batch"
            return None
        for a_prev, d_prev in earlier:
            sq = sq + 2 * S.per_example_cross_linear(a_prev, d_prev, a, d)
        earlier.append((a, d))
        return sq

    def _input_gram(self, source: torch.Tensor, a: torch.Tensor,
                    d: torch.Tensor) -> torch.Tensor | None:
        """The token Gram matrices of an input shared by the layers reading it (q/k/v,
        gate/up): the last two inputs are kept, none above the kernels' chunk budget."""
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
        bad = {k: "a tied tensor (two uses, e.g. embedding and output layer): its "
                  "per-example gradient sums both, which the hooks do not pair"
               for k in self.tied if ctx.present[k]}
        bad.update(self.notes)
        for k, totals in enumerate(self.totals):
            if not totals or k in bad:
                continue
            sizes = [b for _, b in self._ordered(k)]
            if len(totals) != ctx.micro:
                bad[k] = (f"the module's gradient came in {len(totals)} of {ctx.micro} "
                          "micro-batch(es)")
            elif len(ctx.sizes) == ctx.micro and sizes != ctx.sizes:
                bad[k] = (f"the module's input has batch size {sizes[0]} where the "
                          f"micro-batch has {ctx.sizes[0]} examples (a broadcast lookup such "
                          "as position ids of shape (1, T), or flattened tokens); pass "
                          "expanded ids (ids.expand(B, -1)) to get per-example values")
        return bad

    def _ordered(self, k: int) -> list:
        return [self.totals[k][i] for i in sorted(self.totals[k])]

    def _weights(self, k: int) -> tuple[list[float], float, float]:
        """``(f_j, lam, c)`` for layer k's micro-batches: ``||g_b||^2 = q_b f_j``."""
        sizes = [b for _, b in self._ordered(k)]
        v, lam, c = micro_weights(sizes, self.lens.config.loss_reduction)
        return [(b / (lam * vk)) ** 2 for b, vk in zip(sizes, v, strict=True)], lam, c

    def _sum_sq(self, k: int) -> torch.Tensor:
        """This rank's ``sum_b ||g_b||^2`` of layer k (0 when none)."""
        if not self.totals[k]:
            return self.lens.const("zero")
        f, _, _ = self._weights(k)
        entries = self._ordered(k)
        total = entries[0][0] * f[0]
        for (q, _), fj in zip(entries[1:], f[1:], strict=True):
            total = total + q * fj
        return total

    def contribute(self, ctx: StepContext, pack) -> None:
        if ctx.world > 1 and any(self.totals):
            pack.sum("pe_sq", torch.stack([self._sum_sq(k)
                                           for k in range(len(self.lens.layers))]))

    def emit(self, ctx: StepContext, red, out) -> None:
        lens = self.lens
        if not any(self.totals):
            return
        nan = lens.const("nan")
        raw, _, ok = ctx.shared.raw(red)
        scale2 = 1.0 if ctx.loss_scale is None else ctx.loss_scale**2
        W = ctx.world
        trace, signal = [], []
        for k in range(len(lens.layers)):
            n = sum(b for _, b in self._ordered(k)) * W
            if n < 2 or not ctx.present[k]:
                trace.append(nan)
                signal.append(nan)
                continue
            _, lam, c = self._weights(k)
            c = c / W
            total = red["pe_sq"][k] if "pe_sq" in red else self._sum_sq(k)
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
        calm = spike_free(out, len(lens.layers))  # no flagged step in the EMAs
        if calm is not None:
            total_t, total_s = nan_where(total_t, calm[-1:]), nan_where(total_s, calm[-1:])
        ratio, st["trace"], st["signal"], st["count"] = S.ema_ratio_update(
            total_t, total_s, st["trace"], st["signal"], st["count"], lens.config.noise_ema)
        out["critical_batch_size"] = torch.cat([torch.full_like(trace_t, float("nan")), ratio])

    def state_dict(self) -> dict[str, Any]:
        return {k: v.detach().clone() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = {k: v.clone() for k, v in state.items()}
