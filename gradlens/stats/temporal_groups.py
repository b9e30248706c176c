"""Exact temporal-variance states of same-shaped matrices, stacked and updated together.

:func:`gradlens.stats.temporal_update_` advances one matrix's EMAs with about 15 kernels; at
every step of a model with hundreds of matrices that is thousands of launches. A
:class:`TemporalStack` keeps the exact states of ``n`` matrices of one shape, layout and
dtype in stacked buffers (``mean``, ``mean_n``: ``(n, *shape)``; ``sq``, ``sq_n``, ``n``:
``(n,)``) and updates all of them with the same kernels on the stacked gradients, each
layer with its own weight ``w_k = (1 - beta) [finite_k]``:

    m_k <- m_k + w_k (g_k - m_k)            q_k <- q_k + w_k (||g_k||^2 - q_k)
    m_n,k <- (1 - w_k) m_n,k + (w_k / r_k) G_k        (r_k: per-unit RMS of G_k)
    q_n,k <- q_n,k + w_k (sum_i ||G_k,i||^2 / r_k,i^2 - q_n,k)

exactly :func:`~gradlens.stats.temporal_update_`'s arithmetic, element for element. Each
layer's state dict (:meth:`TemporalStack.state`) holds views of its rows, so
:func:`~gradlens.stats.temporal_readout`, ``state_dict`` and a per-layer update see the same
numbers. A layer absent at a step takes weight 0 with a zero gradient: its state is unchanged
bit for bit. :meth:`TemporalStack.readout` is ``temporal_readout`` for every row at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from gradlens.stats.variance import _variance

__all__ = ["TemporalStack"]

_BY_COLUMN = ("conv1d", "embedding")  # units are columns (see gradlens.roles)


class TemporalStack:
    """The exact, normalized temporal states of ``n`` matrices of one ``shape``, ``layout``
    and accumulation dtype ``acc``, on ``device``."""

    def __init__(self, n: int, shape: Sequence[int], layout: str, acc: torch.dtype,
                 device: torch.device, seeds: Sequence[int]) -> None:
        if len(shape) < 2:
            raise ValueError(f"TemporalStack holds matrices, got shape {tuple(shape)}")
        self.layout, self.shape, self.size = layout, tuple(shape), n
        kw: dict[str, Any] = {"dtype": acc, "device": device}
        self.mean = torch.zeros((n, *shape), **kw)
        self.mean_n = torch.zeros((n, *shape), **kw)
        self.sq = torch.zeros(n, **kw)
        self.sq_n = torch.zeros(n, **kw)
        self.n = torch.zeros(n, **kw)
        self.beta: float | None = None
        self._states = [{"mean": self.mean[j], "sq": self.sq[j], "n": self.n[j], "count": 0,
                         "beta": None, "sketch_dim": None, "seed": int(seeds[j]),
                         "mean_n": self.mean_n[j], "sq_n": self.sq_n[j]} for j in range(n)]

    def state(self, j: int) -> dict[str, Any]:
        """Row ``j``'s state in :func:`~gradlens.stats.temporal_init`'s format (views)."""
        return self._states[j]

    def load(self, j: int, state: dict[str, Any]) -> None:
        """Copy a saved exact state into row ``j``."""
        if state.get("sketch_dim") is not None or "mean_n" not in state:
            raise ValueError("a TemporalStack row takes an exact, normalized state")
        for key in ("mean", "sq", "n", "mean_n", "sq_n"):
            self._states[j][key].copy_(state[key].reshape(self._states[j][key].shape))
        self._states[j]["count"] = int(state["count"])
        self._states[j]["beta"] = state["beta"]
        if state["beta"] is not None:
            self.beta = float(state["beta"])

    def update_(self, grads: Sequence[torch.Tensor | None], beta: float, ok: torch.Tensor,
                zero: torch.Tensor) -> None:
        """Advance every row with its gradient. ``ok``: ``(n,)`` bool, whether that gradient
        is finite (and the step's detectors were calm), False where it is None (the row is
        then left as it is); ``zero``: a zero tensor of the rows' shape."""
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        if self.beta is not None and self.beta != float(beta):
            raise ValueError(f"temporal state was built with beta={self.beta}, got beta={beta}")
        self.beta = float(beta)
        acc, n = self.mean.dtype, self.size
        present = [g is not None for g in grads]
        c = torch.stack([g if g is not None else zero for g in grads])
        c = c.to(acc) if c.dtype != acc else c
        c.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        okf = ok.to(acc)
        w = okf * (1.0 - beta)  # this step's EMA weights, 0 where not finite or absent
        rows = c.reshape(n, c.shape[1], -1)
        by_column = self.layout in _BY_COLUMN
        if by_column:
            unit_sq, fan = (rows * rows).sum(dim=1), rows.shape[1]
        else:
            unit_sq, fan = torch.linalg.vector_norm(rows, dim=2, dtype=acc).square(), rows.shape[2]
        zero0 = torch.zeros((), dtype=acc, device=c.device)
        wide = w.view(n, *([1] * (c.ndim - 1)))
        self.mean.lerp_(c, wide)
        self.sq.lerp_(torch.where(ok, unit_sq.sum(dim=1), zero0), w)
        r = (unit_sq / fan).sqrt().clamp_min(1e-8)
        scale = (w.view(n, 1) / r).reshape((n, 1, -1) if by_column else (n, -1, 1))
        m_n = self.mean_n.view(rows.shape)
        m_n.mul_((1.0 - w).view(n, 1, 1)).addcmul_(rows, scale)
        self.sq_n.lerp_(torch.where(ok, (unit_sq / r.square()).sum(dim=1), zero0), w)
        self.n.add_(okf)
        for st, p in zip(self._states, present, strict=True):
            st["beta"] = self.beta
            st["count"] += p

    def readout(self, unbiased: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:func:`~gradlens.stats.temporal_readout` of every row: ``(var, mean_sq,
        var_normalized)``, each ``(n,)`` (NaN before the first update)."""
        if self.beta is None:
            nan = torch.full((self.size,), math.nan, dtype=self.n.dtype, device=self.n.device)
            return nan, nan, nan
        m = self.mean.reshape(self.size, -1)
        m_n = self.mean_n.reshape(self.size, -1)
        var, signal = _variance(self.sq, torch.linalg.vecdot(m, m), self.n, self.beta,
                                unbiased)
        var_n, _ = _variance(self.sq_n, torch.linalg.vecdot(m_n, m_n), self.n, self.beta,
                             unbiased)
        return var, signal, var_n
