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
multiplier, a weight also used outside the module). Two matrix-vector products per call and
one per gradient, all on device, no sync: the verdict travels with the flush
(``_pe_check``).
"""

from __future__ import annotations

import math

import torch

from gradlens import stats as S
from gradlens.families.per_example_rules import Elementwise, Lookup, Outer, Summed

_C = 16.0  # headroom over the typical rounding


def _eps(*dtypes: torch.dtype) -> float:
    return max(torch.finfo(t).eps if t.is_floating_point else 0.0 for t in dtypes)


class DecompositionCheck:
    """Accumulates, per layer and backward pass, the hooks' probe sum and compares it with
    the parameter's gradient when its hook fires."""

    def __init__(self, n_layers: int, seed: int = 0) -> None:
        self.seed = seed
        self.probes: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.flat: dict[int, bool] = {}
        self.n = n_layers
        self.reset()

    def reset(self) -> None:
        self.pending: dict[int, list] = {}  # k -> [s, R^2, tokens, eps] of this backward
        self.err: dict[int, torch.Tensor] = {}
        self.tol: dict[int, torch.Tensor] = {}

    def _probe(self, k: int, shape: torch.Size, device, dtype) -> tuple:
        """``(u, v)``: Rademacher vectors over the rows and the other dimensions of a matrix
        parameter; ``(u, None)`` over every entry of a vector one (gains, biases)."""
        p = self.probes.get(k)
        if p is None or p[0].device != device or p[0].dtype != dtype:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
            flat = self.flat.get(k, len(shape) < 2)
            rows = shape.numel() if flat else shape[0]
            cols = 0 if flat else shape[1:].numel()

            def rad(m):
                return (torch.randint(0, 2, (m,), generator=g) * 2 - 1).to(device, dtype)

            p = (rad(rows), rad(cols) if cols else None)
            self.probes[k] = p
        return p

    def add(self, k: int, param: torch.Tensor, factor) -> None:
        """The hooks' side of one call of layer k (in the accumulation dtype)."""
        d = factor.d
        acc = S.accumulation_dtype(d.dtype)
        self.flat[k] = isinstance(factor, Elementwise | Summed)
        u, v = self._probe(k, param.shape, d.device, acc)
        F = param.numel() if self.flat[k] else d.shape[-1]
        d2 = d.reshape(-1, F).to(acc)
        width, eps = F, _eps(d.dtype)
        if isinstance(factor, Outer):
            a2 = factor.a.reshape(-1, factor.a.shape[-1]).to(acc)
            terms = a2 @ u * (d2 @ v) if factor.transposed else d2 @ u * (a2 @ v)
            width, eps = max(F, a2.shape[-1]), max(eps, _eps(factor.a.dtype))
        elif isinstance(factor, Lookup):
            dv = d2 @ v
            if factor.padding_idx is not None:
                dv = dv * (factor.ids.reshape(-1) != factor.padding_idx).to(acc)
            terms = u[factor.ids.reshape(-1)] * dv
        elif isinstance(factor, Elementwise):
            terms = (d2 * factor.x.reshape(-1, F).to(acc)) @ u
            eps = max(eps, _eps(factor.x.dtype))
        elif isinstance(factor, Summed):
            terms = d2 @ u
        else:
            raise TypeError(f"unknown per-example factor {type(factor).__name__}")
        terms = S.finite_copy(terms)
        # E[term_t^2] = ||d_t||^2 ||a_t||^2 for Rademacher probes: sum terms^2 estimates R^2
        s, r2 = terms.sum(), terms.square().sum()
        entry = self.pending.get(k)
        if entry is None:
            self.pending[k] = [s, r2, terms.numel(), width, eps]
        else:
            entry[0], entry[1] = entry[0] + s, entry[1] + r2
            entry[2] += terms.numel()
            entry[3], entry[4] = max(entry[3], width), max(entry[4], eps)

    def on_grad(self, k: int, g: torch.Tensor) -> None:
        """The parameter's gradient of this backward pass (its tensor hook):
        ``|s_hooks - u^T G v| <= 16 eps (||G||_F + sqrt(n + width) R)``, with ``||u^T G||``
        (whose square has expectation ``||G||_F^2``) standing for ``||G||_F``."""
        entry = self.pending.pop(k, None)
        acc = S.accumulation_dtype(g.dtype)
        if entry is None:  # a gradient with no hooked call: all of it is unexplained
            zero = g.new_zeros((), dtype=acc)
            entry = [zero, zero, 0, 0, 0.0]
        s, r2, n, width, eps = entry
        u, v = self._probe(k, g.shape, g.device, acc)
        g2 = g.detach().to(acc)
        if v is None:
            g1 = g2.reshape(-1)
            sg, gnorm = g1 @ u, g1.square().sum().sqrt()
        else:
            w = u @ g2.reshape(u.shape[0], -1)
            sg, gnorm = w @ v, w.square().sum().sqrt()
        eps = max(eps, _eps(g.dtype))
        tol = _C * eps * (gnorm + math.sqrt(n + width) * r2.to(acc).sqrt())
        err = (s.to(acc) - sg).abs()
        err = torch.where(torch.isfinite(err), err, torch.zeros_like(err))  # norms report it
        self.err[k] = err + self.err[k] if k in self.err else err
        self.tol[k] = tol + self.tol[k] if k in self.tol else tol

    def ok(self, device, dtype) -> torch.Tensor:
        """``(L,)``: 1 where every checked backward pass matched (or nothing was checked)."""
        one = torch.ones((), device=device, dtype=dtype)
        return torch.stack([(self.err[k] <= self.tol[k]).to(dtype) if k in self.err else one
                            for k in range(self.n)])
