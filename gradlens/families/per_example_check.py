"""The per-example family's decomposition self-check, along fixed random probe directions.

The per-example kernels assume that a layer's gradient in one backward pass is the sum of its
per-example factors (:mod:`gradlens.families.per_example_rules`), e.g. ``G = sum_b D_b^T A_b``
for a linear weight. With Rademacher probes ``u``, ``v`` drawn once per layer this is
checked in ``O(B T (d_in + d_out))`` on the hooks' side and ``O(numel)`` on the gradient's:

    s_hooks = sum_t (d_t . u)(a_t . v)      (Outer; Lookup: u[id_t] (d_t . v);
                                             Elementwise: (d_t * x_t) . u; Summed: d_t . u)
    s_grad  = u^T G v                        (G: the gradient autograd hands the parameter)

Rounding bound per backward: ``16 eps (||G||_F + sqrt(n + width) R)``, ``R^2 = sum_t
||d_t||^2 ||a_t||^2`` (estimated by ``sum_t term_t^2``, whose expectation it is), ``n`` the
tokens, ``width`` the widest feature dimension, ``eps`` the machine epsilon of the least
precise of the factors and the gradient (bf16 under autocast); ``||G||_F`` is estimated by
``||u^T G||``, the intermediate of ``u^T G v``. A random probe sees a relative error ``r`` of
the decomposition as ``~ r ||G||_F``, so any mismatch above ~``16 eps`` is caught (a muP
multiplier, a weight also used outside the module). The first backward pass of each logged step is
checked (the decomposition is a property of the forward, not of the data: one pass shows a
wrong rule, and the cost does not grow with gradient accumulation): two matrix-vector products
per call and two per gradient; the comparison runs once per step, vectorized over every (layer, backward
pass), on device, no sync: the verdict travels with the flush (``_pe_check``).

The check runs on the first logged step and then on every ``every``-th (:data:`EVERY`), and a
layer that failed once stays failed (its per-example values NaN from then on): a wrong rule or
a weight used outside its module is a property of the model, so checking each logged step
would only repeat the answer at ``every`` times the cost.
"""

from __future__ import annotations

import torch

from gradlens import stats as S
from gradlens.families.per_example_rules import Elementwise, Lookup, Outer, Summed

_C = 16.0  # headroom over the typical rounding
EVERY = 10  # logged steps per check (the first logged step is always checked)


def _eps(*dtypes: torch.dtype) -> float:
    return max(torch.finfo(t).eps if t.is_floating_point else 0.0 for t in dtypes)


class DecompositionCheck:
    """Collects, per layer and backward pass, the hooks' probe sums and the gradient's probe
    product; :meth:`ok` compares them all at once."""

    def __init__(self, n_layers: int, seed: int = 0, every: int = EVERY) -> None:
        self.seed, self.every = seed, every
        self.logged = 0  # logged steps finalized so far
        self.failed: torch.Tensor | None = None  # (L,) 1 where a check ever failed
        self.probes: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._vectors: dict[tuple, torch.Tensor] = {}
        self.flat: dict[int, bool] = {}
        self.n = n_layers
        self.reset()

    def reset(self) -> None:
        self.passes = [0] * self.n  # gradients seen per layer in this step
        # the first pass's hooks: layer -> [per-token terms of each call], width, eps
        self.hooked: dict[int, list] = {}
        self.grads: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []  # k, w * v, w, eps
        self._inputs: list[tuple] = []

    def _probe(self, k: int, shape: torch.Size, device, dtype) -> tuple:
        """``(u, v)``: Rademacher vectors over the rows and the other dimensions of a matrix
        parameter; ``(u, None)`` over every entry of a vector one (gains, biases). Drawn once
        per (length, side), so layers reading one input share its probe (and its product)."""
        p = self.probes.get(k)
        if p is None or p[0].device != device or p[0].dtype != dtype:
            flat = self.flat.get(k, len(shape) < 2)
            if flat:
                p = (self._rad(shape.numel(), 0, device, dtype), None)
            else:
                p = (self._rad(shape[0], 0, device, dtype),
                     self._rad(shape[1:].numel(), 1, device, dtype))
            self.probes[k] = p
        return p

    def _rad(self, m: int, side: int, device, dtype) -> torch.Tensor:
        key = (m, side, device, dtype)
        vec = self._vectors.get(key)
        if vec is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + 2 * m + side)
            vec = (torch.randint(0, 2, (m,), generator=g) * 2 - 1).to(device, dtype)
            self._vectors[key] = vec
        return vec

    def _input_side(self, a: torch.Tensor, a2: torch.Tensor, probe: torch.Tensor):
        """``A probe`` of an input shared by the layers reading it (q/k/v, gate/up): the last
        two inputs are kept (with a reference, so their storage is not reused meanwhile)."""
        key = (a.data_ptr(), tuple(a.shape), a._version, id(probe))
        for cached, value, _ in self._inputs:
            if cached == key:
                return value
        value = a2 @ probe
        self._inputs = [*self._inputs[-1:], (key, value, a)]
        return value

    @property
    def active(self) -> bool:
        """Whether this logged step is checked."""
        return self.logged % self.every == 0

    def add(self, k: int, param: torch.Tensor, factor) -> None:
        """The hooks' side of one call of layer k (in the accumulation dtype)."""
        if self.passes[k] or not self.active:
            return  # the first backward pass of the step is the one checked
        d = factor.d
        acc = S.accumulation_dtype(d.dtype)
        self.flat[k] = isinstance(factor, Elementwise | Summed)
        u, v = self._probe(k, param.shape, d.device, acc)
        F = param.numel() if self.flat[k] else d.shape[-1]
        d2 = d.reshape(-1, F).to(acc)
        width, eps = F, _eps(d.dtype)
        if isinstance(factor, Outer):
            a2 = factor.a.reshape(-1, factor.a.shape[-1]).to(acc)
            if factor.transposed:
                terms = self._input_side(factor.a, a2, u) * (d2 @ v)
            else:
                terms = (d2 @ u) * self._input_side(factor.a, a2, v)
            width, eps = max(F, a2.shape[-1]), max(eps, _eps(factor.a.dtype))
        elif isinstance(factor, Lookup):
            ids = factor.ids.reshape(-1)
            dv = d2 @ v
            if factor.padding_idx is not None:
                dv = dv * (ids != factor.padding_idx).to(acc)
            terms = u[ids] * dv
        elif isinstance(factor, Elementwise):
            terms = (d2 * factor.x.reshape(-1, F).to(acc)) @ u
            eps = max(eps, _eps(factor.x.dtype))
        elif isinstance(factor, Summed):
            terms = d2 @ u
        else:
            raise TypeError(f"unknown per-example factor {type(factor).__name__}")
        entry = self.hooked.setdefault(k, [[], 0, 0.0])
        entry[0].append(terms)
        entry[1], entry[2] = max(entry[1], width), max(entry[2], eps)

    def on_grad(self, k: int, g: torch.Tensor) -> None:
        """The parameter's gradient of one backward pass (its tensor hook): ``u^T G v`` and
        ``||u^T G||^2`` (whose expectation is ``||G||_F^2``)."""
        if not self.active:
            return
        self.passes[k] += 1
        if self.passes[k] > 1:
            return
        acc = S.accumulation_dtype(g.dtype)
        u, v = self._probe(k, g.shape, g.device, acc)
        g2 = g.detach().to(acc)
        # w = u^T G (a matrix) or u * g (a vector): u^T G v = sum(w v), ||w||^2 ~ ||G||_F^2
        w = g2.reshape(-1) * u if v is None else u @ g2.reshape(u.shape[0], -1)
        self.grads.append((k, w if v is None else w * v, w, _eps(g.dtype)))

    def ok(self, device, dtype) -> torch.Tensor | None:
        """``(L,)`` at the end of a logged step: 1 where no check of the run has failed (None:
        nothing checked yet). Checked steps compare ``|s_hooks - u^T G v| <= 16 eps (||G||_F +
        sqrt(n + width) R)``, all layers at once: ``E[term_t^2] = ||d_t||^2 ||a_t||^2`` for
        Rademacher probes, so ``sum_t term_t^2`` estimates ``R^2``. A gradient with no hooked
        call is all unexplained."""
        checked = self.active and bool(self.grads)
        self.logged += 1
        if checked:
            fails = self._fails(device, dtype)
            self.failed = fails if self.failed is None else torch.maximum(
                self.failed.to(device, dtype), fails)
        return None if self.failed is None else (self.failed == 0).to(dtype)

    def _fails(self, device, dtype) -> torch.Tensor:
        """``(L,)``: 1 where this step's checked backward pass did not match."""
        terms, t_seg, wv, w, g_seg, scale, layer = [], [], [], [], [], [], []
        for k, wv_k, w_k, eps_g in self.grads:
            parts, width, eps = self.hooked.get(k, [[], 0, 0.0])
            n = sum(p.numel() for p in parts)
            terms += parts
            t_seg.append(n)
            wv.append(wv_k)
            w.append(w_k)
            g_seg.append(w_k.numel())
            scale.append((_C * max(eps, eps_g), (n + width) ** 0.5))
            layer.append(k)
        G = len(self.grads)

        def segment_sums(xs: list, counts: list[int]) -> torch.Tensor:
            if not xs:
                return torch.zeros(G, device=device, dtype=dtype)
            ids = torch.repeat_interleave(torch.arange(G, device=device),
                                          torch.tensor(counts, device=device))
            return torch.zeros(G, device=device, dtype=dtype).index_add_(
                0, ids, torch.cat(xs).to(dtype))

        t = torch.cat(terms).to(dtype) if terms else None
        s_hooks = segment_sums([t] if terms else [], t_seg)
        r2 = segment_sums([t * t] if terms else [], t_seg)
        s_grad = segment_sums(wv, g_seg)
        g_sq = segment_sums([x * x for x in w], g_seg)
        c = torch.tensor(scale, device=device, dtype=dtype)
        err = (s_hooks - s_grad).abs()
        tol = c[:, 0] * (g_sq.sqrt() + c[:, 1] * r2.sqrt())
        bad = torch.isfinite(err) & (err > tol)  # non-finite gradients: the norms report it
        fails = torch.zeros(self.n, device=device, dtype=dtype).index_add_(
            0, torch.tensor(layer, device=device), bad.to(dtype))
        return (fails > 0).to(dtype)
