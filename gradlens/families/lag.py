r"""Lagged inner products of the gradient: ``<g_t, g_{t-1}>`` and ``<g_t, g_{t-2}>`` per layer.

The temporal evidence of :func:`gradlens.advise.advise_momentum`: with ``c_k = E<g_t,
g_{t-k}>`` (``c_0 = E||g||^2``, the squared ``grad_norm``) and the model ``g_t = mu + e_t``,
``e`` noise of trace ``s^2`` per step and lag correlation ``rho^k``::

    c_0 = |mu|^2 + s^2,   c_1 = |mu|^2 + rho s^2,   c_2 = |mu|^2 + rho^2 s^2
    rho = (c_1 - c_2) / (c_0 - c_1),   s^2 = (c_0 - c_1) / (1 - rho)

Cost: the gradient is copied at the two steps before each logged step (two buffers per
tracked layer, kept between steps only when ``log_every <= 2``) and two inner products are
taken at the logged step. Opt-in: ``GradLens(..., statistics=[GradLag])``. Describes the
gradient the optimizer consumes; a layer without a gradient at one of the three steps is NaN.
Not for FSDP2 shards (the inner products would need a reduction across shards per step).
"""

from __future__ import annotations

from typing import Any

import torch

from gradlens.catalog import FAMILIES
from gradlens.families.base import Statistic, StepContext, register_statistic


@register_statistic
class GradLag(Statistic):
    spec = FAMILIES["grad_lag"]

    def bind(self, lens) -> None:
        super().bind(lens)
        self.prev: list[list[torch.Tensor | None]] = [[], []]  # [g_{t-1}], [g_{t-2}]

    def observe(self, ctx: StepContext) -> None:
        lens = self.lens
        every = lens.config.log_every
        ahead = (-ctx.step) % every  # steps until the next logged one (0: this one)
        if ctx.logging and ctx.shards is None:
            nan = lens.const("nan")
            dots = []
            for lag in (0, 1):
                prev = self.prev[lag]
                dots.append(torch.stack([
                    (g.to(lens.dtype).flatten() @ prev[k].flatten())
                    if ctx.present[k] and prev and prev[k] is not None else nan
                    for k, g in enumerate(ctx.grads or [])]))
            ctx.data[self.name] = dots
        keep = ahead in (1, 2) or (every <= 2)
        if ctx.grads is None or not keep:
            if not keep:
                self.prev = [[], []]
            return
        current = [g.detach().to(lens.dtype).clone() if ctx.present[k] else None
                   for k, g in enumerate(ctx.grads)]
        self.prev = [current, self.prev[0]]

    def emit(self, ctx: StepContext, red, out) -> None:
        dots = ctx.data.get(self.name)
        if dots is not None:
            out["grad_lag1_dot"], out["grad_lag2_dot"] = dots

    def state_dict(self) -> dict[str, Any]:
        return {}
