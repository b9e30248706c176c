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
tokens weigh more (stated in docs/api.md).

Which modules: :mod:`gradlens.families.per_example_rules` (decided by the module's forward,
not its name; custom modules register a rule). Every tracked layer is also checked on logged
steps: :mod:`gradlens.families.per_example_check`.

1-D parameters: a norm's gain gets ``g_b = sum_t d_bt * x_hat_bt`` (``x_hat`` recomputed from
the module's input as its forward does), a bias ``g_b = sum_t d_bt``
(:mod:`gradlens.stats.per_example_vector`). ``per_example_scope="norms"`` tracks the norm
gains only (the cheap gradient-noise-scale path of Gray et al. 2024).

A Linear module called several times in a micro-batch (shared weights, a block applied twice)
is exact: its per-example gradient is ``sum_c D_c^T A_c``, and the cross terms between calls
are added in the same backward. A checkpointed module's recomputation is not counted (under
reentrant checkpointing, whose first forward runs without gradients, the recomputation is the
one counted). Valid when: the embedding's rows are examples (its ids are an integer input of
a module enclosing it, or expanded along the batch, ``ids.expand(B, -1)``: a lookup of ids
built inside the model, ``wpe(arange(T))``, a relative-position bias, is NaN with a reason
whatever T and B are), it is looked up once per micro-batch, ``scale_grad_by_freq`` is off,
and the gradient at the step is the hooks' sum up to a common factor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradlens import stats as S
from gradlens.catalog import FAMILIES
from gradlens.dtensor import is_dtensor
from gradlens.families.base import (
    Statistic,
    StepContext,
    in_backward,
    micro_weights,
    nan_where,
    spike_free,
)
from gradlens.families.per_example_check import DecompositionCheck
from gradlens.families.per_example_rules import (
    Elementwise,
    Lookup,
    Outer,
    Rule,
    Summed,
    may_look_up,
    rule_for,
)
from gradlens.families.per_example_sample import ExampleSample, take

CHECK_FAILED = ("the decomposition self-check failed: the per-example factors summed over the "
                "micro-batch are not the gradient autograd computed (probe directions u, v: "
                "sum_b (D_b u)^T (A_b v) != u^T G v beyond rounding); the module's forward is "
                "not what its per-example rule assumes, or its weight is also used outside it")
TIED = ("a tied tensor (two uses, e.g. embedding and output layer): its per-example gradient "
        "sums both, which the hooks do not pair")
_COMPUTED_IDS = ("the lookup's ids are built inside the model (not a model input, not "
                 "expanded along the batch), so its rows cannot be matched to examples (a "
                 "position lookup such as wpe(arange(T)), a relative-position bias); pass the "
                 "ids as a model input of shape (B, T), e.g. position_ids=ids.expand(B, -1)")


class PerExample(Statistic):
    spec = FAMILIES["per_example"]

    def bind(self, lens) -> None:
        super().bind(lens)
        self.tracked: dict[int, str] = {}  # layer -> its leaf name in the module
        self.unsupported: dict[int, str] = {}  # layer -> why it has no per-example values
        self.state: dict[str, torch.Tensor] = {}
        self.check = DecompositionCheck(len(lens.layers)) if lens.config.per_example_check \
            else None
        self.sample = ExampleSample(lens.config.per_example_sample)
        self.reset()

    def install(self, lens) -> None:
        norms_only = lens.config.per_example_scope == "norms"
        by_module: dict[int, tuple[nn.Module, Rule, list[tuple[int, str]]]] = {}
        for k, info in enumerate(lens.layers):
            if info.aliases:
                self.unsupported[k] = TIED
                continue
            module = lens.module_of(k)
            if module is None:
                continue
            leaf = info.name[len(info.module_name) + 1:] if info.module_name else info.name
            if norms_only and not (leaf == "weight" and S.norm_kind(module) is not None):
                continue
            rule, why = rule_for(module)
            if rule is None or getattr(module, leaf, None) is not info.param:
                self.unsupported[k] = why or (f"{info.name} is not an attribute of its module "
                                              f"{type(module).__qualname__}")
                continue
            self.tracked[k] = leaf
            by_module.setdefault(id(module), (module, rule, []))[2].append((k, leaf))
        # logged steps only (core.backward_arm); the hook functions made once (a
        # torch.compiler.disable wrapper costs ~4 us to make), registered at each logged step
        forward = [(module, self._forward_hook(rule, items, id(module)))
                   for module, rule, items in by_module.values()]
        hooks: list[Callable[[], Any]] = [
            lambda m=m, f=f: m.register_forward_hook(f, with_kwargs=True) for m, f in forward]
        if self.check is not None:
            grad = [(lens.layers[k].param, self._grad_hook(k)) for k in self.tracked
                    if not is_dtensor(lens.layers[k].param)]
            hooks += [lambda p=p, f=f: p.register_hook(f) for p, f in grad]
        # the inputs of every module enclosing a lookup (the model, a Lightning module's
        # inner model, an embeddings block): ids that share their storage are examples' ids
        lookups = {lens.layers[k].module_name for k in self.tracked
                   if may_look_up(by_module[id(lens.module_of(k))][1])}
        names = {".".join(n.split(".")[:i]) for n in lookups for i in range(n.count(".") + 1)}
        modules = dict(lens.model.named_modules())
        outer = [modules[n] for n in names if n in modules]
        outer += [lens.compiled] if lookups and lens.compiled is not None else []
        hooks += [lambda m=m: m.register_forward_pre_hook(self._model_inputs, with_kwargs=True)
                  for m in {id(m): m for m in outer}.values()]
        lens.observer.on_logged(lambda: [install() for install in hooks])

    def reset(self) -> None:
        L = len(self.lens.layers)
        # per layer: micro-batch index -> [sum_b q_b, examples]; the calls of that micro-batch
        self.totals: list[dict[int, list]] = [{} for _ in range(L)]
        self._open: list[tuple[int, list]] = [(-1, []) for _ in range(L)]
        self.notes: dict[int, str] = {}
        self.kinds: dict[int, type] = {}
        self._grams: list[tuple[tuple, torch.Tensor]] = []
        self._inputs: dict[int, torch.Tensor] = {}  # storage pointer -> a model input
        self._nograd: dict[int, int] = {}  # module -> forwards run without gradients
        if self.check is not None:
            self.check.reset()
        self.sample.reset()

    # ------------------------------------------------------------------ hooks

    @torch.compiler.disable  # eager: sees the real inputs inside a compiled step too
    def _model_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Integer tensors handed to a module enclosing a lookup, on logged steps: an
        embedding whose ids share their storage with one of them is a per-example lookup
        (ids built inside, such as ``arange(T)``, are not handed in from outside)."""
        if not self.lens.logging_step():
            return
        for v in (*args, *kwargs.values()):
            for t in (v.values() if isinstance(v, dict) else v if isinstance(v, list | tuple)
                      else (v,)):
                if torch.is_tensor(t) and not t.is_floating_point():
                    self._inputs[t.untyped_storage().data_ptr()] = t

    def _forward_hook(self, rule: Rule, items: list[tuple[int, str]], key: int):
        @torch.compiler.disable  # eager: one graph break, no guard on this state
        def forward_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not self.lens.logging_step():
                return
            if not torch.is_grad_enabled():
                if not in_backward():  # a reentrant checkpoint's first forward
                    self._nograd[key] = self._nograd.get(key, 0) + 1
                return
            if in_backward():  # a checkpoint's recomputation: counted when the first was not
                if not self._nograd.get(key):
                    return
                self._nograd[key] -= 1
            if not torch.is_tensor(output):
                for k, _ in items:
                    self.notes.setdefault(k, f"{type(module).__qualname__} returned a "
                                          f"{type(output).__name__}, not one tensor")
                return
            if not output.requires_grad:
                return
            source = args[0] if args else next(
                (v for v in kwargs.values() if torch.is_tensor(v)), None)
            if source is None:
                for k, _ in items:
                    self.notes[k] = "no tensor input seen in the module's forward"
                return
            output.register_hook(torch.compiler.disable(  # eager: no guard on this state
                lambda d: self._on_output_grad(module, rule, items, source, d.detach())))

        return forward_hook

    def _grad_hook(self, k: int):
        @torch.compiler.disable  # eager: a hook dynamo traced would guard on the lens's state
        def hook(g: torch.Tensor) -> None:
            if self.lens.logging_step():
                self.check.on_grad(k, g)

        return hook

    def _on_output_grad(self, module, rule: Rule, items, source: torch.Tensor,
                        d: torch.Tensor) -> None:
        items = [(k, leaf) for k, leaf in items if self.lens.layers[k].param.requires_grad]
        if not items:
            return  # frozen (since the lens was made): nothing to say
        x = source.detach()
        if getattr(module, "scale_grad_by_freq", False):
            for k, _ in items:
                self.notes[k] = "scale_grad_by_freq: per-example gradients are not a sum"
            return
        factors = rule(module, x, d)
        dim = self.lens.config.batch_dim
        for k, leaf in items:
            if k in self.notes:
                continue
            f = factors.get(leaf)
            if f is None:
                self.notes[k] = (f"the per-example rule of {type(module).__qualname__} gives "
                                 f"no factors for {leaf!r}")
                continue
            if self.check is not None:
                self.check.add(k, self.lens.layers[k].param, f)
            if isinstance(f, Lookup) and (why := self._rows_unmatched(f.ids)):
                self.notes[k] = why
                continue
            if dim:  # sequence-first: the kernels take the batch dimension first
                f = type(f)(*(t.movedim(dim, 0) if torch.is_tensor(t) else t for t in f))
            lead = f[0].shape[0]
            if lead != f.d.shape[0]:
                self.notes[k] = "the input's batch dimension is not the output gradient's"
                continue
            self.kinds[k] = type(f)
            idx = self.lens.observer.micro_seen[k]  # backward passes done for this layer
            pick = self.sample.indices(idx, lead, f.d.device)  # per_example_sample
            if pick is not None:
                f = take(f, pick, lead)
            sq = self._vector_sq(k, f) if isinstance(f, Elementwise | Summed) \
                else self._matrix_sq(k, f, (source, pick))
            if sq is None:
                continue
            total = S.finite_sum(sq)
            if pick is not None:  # unbiased for the sum over all `lead` examples
                total = total * (lead / pick.numel())
            entry = self.totals[k].get(idx)
            if entry is None:
                self.totals[k][idx] = [total, lead]
            else:
                entry[0] = entry[0] + total

    def _rows_unmatched(self, ids: torch.Tensor) -> str | None:
        """Why an embedding's rows are not examples (None: they are). From the layout: the
        ids are a model input (or a view of one) or expanded along the batch dimension."""
        dim = self.lens.config.batch_dim
        if ids.ndim <= dim:
            return _COMPUTED_IDS
        if ids.stride(dim) == 0 and ids.shape[dim] > 1:
            return None  # one row per example, expanded: ids.expand(B, -1)
        try:
            ptr = ids.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # a traced tensor
            ptr = None
        if ptr is None or not self._inputs:
            return ("the model's inputs were not seen on this step (a compiled step?), so the "
                    "lookup's rows cannot be matched to examples")
        return None if ptr in self._inputs else _COMPUTED_IDS

    def _earlier(self, k: int) -> list:
        """The earlier calls of layer k in this backward pass (a repeated module)."""
        idx = self.lens.observer.micro_seen[k]
        open_idx, earlier = self._open[k]
        if open_idx != idx:
            earlier = []
            self._open[k] = (idx, earlier)
        return earlier

    def _vector_sq(self, k: int, f: Elementwise | Summed) -> torch.Tensor:
        """A 1-D parameter's per-example gradient is a vector ``(B, F)``: formed, squared,
        and dotted with the earlier calls' (a repeated module's cross terms)."""
        numel = self.lens.layers[k].param.numel()
        if isinstance(f, Elementwise):
            g = S.per_example_grads_norm_gain(f.x, f.d, feature_ndim=f.x.ndim - 1) \
                if f.x.shape[1:].numel() == numel else \
                S.per_example_grads_norm_gain(f.x.reshape(f.x.shape[0], -1, numel),
                                              f.d.reshape(f.d.shape[0], -1, numel))
        else:
            g = f.d.reshape(f.d.shape[0], -1, numel).to(self.lens.dtype).sum(1)
        sq = g.square().sum(-1)
        earlier = self._earlier(k)
        for prev in earlier:
            sq = sq + 2 * (prev * g).sum(-1)
        earlier.append(g)
        return sq

    def _matrix_sq(self, k, f: Outer | Lookup, source: tuple) -> torch.Tensor | None:
        """``||g_b||^2`` contributions of this call; a second call of the same module in the
        same backward adds its cross terms with the earlier ones: the per-example gradient
        of a module called c times is ``sum_c D_c^T A_c`` (tokens concatenated), so
        ``||.||^2 = sum_c ||D_c^T A_c||^2 + 2 sum_{c<c'} <D_c^T A_c, D_c'^T A_c'>``."""
        earlier = self._earlier(k)
        if isinstance(f, Lookup):
            if earlier:
                self.notes[k] = "an embedding looked up more than once in a micro-batch"
                return None
            d = f.d
            if f.padding_idx is not None:  # padding rows get no gradient
                d = d * (f.ids != f.padding_idx).unsqueeze(-1).to(d.dtype)
            earlier.append(None)
            return S.per_example_sq_norms_embedding(f.ids, d)
        a, d = f.a, f.d
        sq = S.per_example_sq_norms_linear(a, d, a_gram=self._input_gram(source, a, d))
        for a_prev, d_prev in earlier:
            sq = sq + 2 * S.per_example_cross_linear(a_prev, d_prev, a, d)
        earlier.append((a, d))
        return sq

    def _input_gram(self, source: tuple, a: torch.Tensor,
                    d: torch.Tensor) -> torch.Tensor | None:
        """The token Gram matrices of an input shared by the layers reading it (q/k/v,
        gate/up): the last two inputs are kept, none above the kernels' chunk budget.
        ``source``: the input tensor and the examples read (``per_example_sample``)."""
        for src, gram in self._grams:
            if src[0] is source[0] and src[1] is source[1]:
                return gram
        B, fin, fout = a.shape[0], a.shape[-1], d.shape[-1]
        T = a.numel() // max(B * fin, 1)
        if B * T * T > S.DEFAULT_CHUNK_ELEMS or S.choose_per_example_method(T, fin, fout) != "gram":
            return None
        gram = S.token_grams(a)
        self._grams = [*self._grams[-1:], (source, gram)]
        return gram

    def invalid(self, ctx: StepContext) -> dict[int, str]:
        bad = {k: why for k, why in {**self.unsupported, **self.notes}.items()
               if ctx.present[k]}
        for k in self.tracked:
            totals = self.totals[k]
            if k in bad or not ctx.present[k]:
                continue
            sizes = [b for _, b in self._ordered(k)]
            if not totals:
                bad[k] = ("the module's forward was not seen with gradients on this step "
                          "(no output gradient reached the hooks)")
            elif len(totals) != ctx.micro:
                bad[k] = (f"the module's gradient came in {len(totals)} of {ctx.micro} "
                          "micro-batch(es)")
            elif len(ctx.sizes) == ctx.micro and sizes != ctx.sizes:
                bad[k] = (f"the module's input has batch size {sizes[0]} where the "
                          f"micro-batch has {ctx.sizes[0]} examples: " + (
                              "a broadcast lookup such as position ids of shape (1, T); pass "
                              "expanded ids (ids.expand(B, -1))"
                              if self.kinds.get(k) is Lookup else
                              "flattened tokens (B*T, features) or another layout; the "
                              "example must be the input's batch_dim"))
            elif sum(sizes) * ctx.world < 2:
                bad[k] = "one example in the step: a per-example variance needs two"
        return bad

    def device_reasons(self, values: dict[str, list[float]]) -> dict[int, str]:
        """Reasons found on device (the self-check), read from the flushed values."""
        flags = values.get("_pe_check")
        return {} if flags is None else {k: CHECK_FAILED for k, ok in enumerate(flags)
                                         if ok == 0}

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

    def partials(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        if ctx.world > 1 and any(self.totals):  # one process reads its own in emit
            return {"sq": torch.stack([self._sum_sq(k) for k in range(len(self.lens.layers))])}
        return {}

    def emit(self, ctx: StepContext, red, out) -> None:
        lens = self.lens
        if not any(self.totals):
            return
        nan = lens.const("nan")
        raw, _, ok = ctx.shared.raw()
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
            total = red["sq"][k] if "sq" in red else self._sum_sq(k)
            m = total / scale2 / n
            y = raw[k] / lam**2
            t = (m - y) / (1.0 - c)
            trace.append(t)
            signal.append(y - c * t)
        trace_t = nan_where(torch.stack(trace), ok)
        signal_t = nan_where(torch.stack(signal), ok)
        passed = None if self.check is None else self.check.ok(lens.device, lens.dtype)
        if passed is not None:
            out["_pe_check"] = passed
            trace_t = nan_where(trace_t, passed > 0)
            signal_t = nan_where(signal_t, passed > 0)
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
