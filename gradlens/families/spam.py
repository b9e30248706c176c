"""SPAM's element fraction ``mean(g_i^2 > theta v_i)`` against the optimizer's Adam second
moment ``exp_avg_sq`` (logged steps; layers whose optimizer keeps no ``v`` are NaN). Under
FSDP2 each rank counts its shards and the counts are summed in the flush's collective. In one
process the layers of one shape are counted together (:func:`gradlens.stats.spam_fractions`)."""

from __future__ import annotations

import torch

from gradlens import stats as S
from gradlens.catalog import FAMILIES
from gradlens.dtensor import local_tensor
from gradlens.families.base import Statistic, StepContext
from gradlens.stats.shards import spam_counts


class Spam(Statistic):
    spec = FAMILIES["spam"]

    def _v(self, ctx: StepContext, k: int) -> torch.Tensor | None:
        opt = self.lens.optimizer
        if opt is None or not ctx.present[k]:
            return None
        v = opt.state.get(self.lens.layers[k].param, {}).get("exp_avg_sq")
        return local_tensor(v) if torch.is_tensor(v) else None

    def partials(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        """FSDP2: this rank's counts (one process and DDP compute the fraction directly)."""
        if ctx.shards is None or self.lens.optimizer is None:
            return {}
        lens = self.lens
        zero = lens.const("zero")
        hits, oks = [], []
        for k in range(len(lens.layers)):
            v = self._v(ctx, k)
            if v is None or v.shape != ctx.grads[k].shape or not ctx.shards[k].contributes:
                hits.append(zero)
                oks.append(zero)
                continue
            h, ok = spam_counts(ctx.grads[k], v, lens.config.spikes.spam_theta)
            hits.append(h.to(lens.dtype))
            oks.append(ok.to(lens.dtype))
        return {"hits": torch.stack(hits), "ok": torch.stack(oks)}

    def emit(self, ctx: StepContext, red, out) -> None:
        if "hits" in red:
            if bool(self._any_state(ctx)):
                out["spam_fraction"] = red["hits"] / red["ok"]
            return
        if ctx.shards is not None or self.lens.optimizer is None:
            return
        lens = self.lens
        ks, vs = [], []
        for k in range(len(lens.layers)):
            v = self._v(ctx, k)
            if v is not None and v.shape == ctx.grads[k].shape:
                ks.append(k)
                vs.append(v)
        if not ks:
            return
        fractions = S.spam_fractions([ctx.grads[k] for k in ks], vs,
                                     lens.config.spikes.spam_theta).to(lens.dtype)
        if len(ks) == len(lens.layers):
            out["spam_fraction"] = fractions
        else:  # NaN where the optimizer keeps no v
            out["spam_fraction"] = lens.const("nan_vec").index_copy(
                0, lens.const_index(tuple(ks)), fractions)

    def _any_state(self, ctx: StepContext) -> bool:
        return any(self._v(ctx, k) is not None for k in range(len(self.lens.layers)))
