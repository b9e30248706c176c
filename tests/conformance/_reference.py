"""Independent references for the conformance matrix: per-micro-batch and per-example backward
passes on a float64 shadow copy of the model, and the estimators computed from them.

A case describes one optimizer step: its micro-batches, how the loop turns a micro-batch into
its loss (``loss``), and each example's share of that loss (``shares``: a ``(b,)`` tensor that
sums to the loss). The per-example gradient is ``b_k`` times the gradient of its share, the
lens's definition (``gradlens.families.per_example``), which is the example's own mean-loss
gradient when every example has the same number of counted tokens.

With ``G_k`` the mean gradient of micro-batch k (``b_k`` examples, ``B = sum b_k``), ``G =
sum_k v_k G_k`` (``v_k = 1/K`` for ``mean``, ``b_k/B`` for ``global_mean``), ``c = sum_k v_k^2 /
b_k``:

    twobatch_trace  = (sum_k b_k ||G_k||^2 - B ||G||^2) / (K - B c)
    twobatch_signal = ||G||^2 - c twobatch_trace
    pe_trace        = (mean_b ||g_b||^2 - ||G||^2) / (1 - c)
    pe_signal       = ||G||^2 - c pe_trace
    unit_nsr_median = median over units of trace_i / signal_i (same estimator per unit; units
                      whose signal is zero within rounding, 32 eps of its terms, excluded)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from gradlens import stats as S

UNIT_FLOOR = 32.0  # multiples of eps: the rounding floor of a unit's signal
ESTIMATORS = ("grad_norm", "grad_norm_preclip", "twobatch_trace", "twobatch_signal",
              "unit_nsr_median", "pe_trace", "pe_signal")


@dataclass
class Case:
    """One step of a training loop, as the lens and the reference both run it."""

    build: Callable[[], nn.Module]
    batches: Sequence[Any]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    shares: Callable[[nn.Module, Any], torch.Tensor]
    size: Callable[[Any], int]
    reduction: str = "mean"
    options: dict[str, Any] = field(default_factory=dict)


def causal_shares(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each example's share of an HF causal LM's token-mean loss (labels -100 ignored)."""
    kw = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**kw).logits.double()
    labels = batch["labels"][:, 1:]
    tok = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels,
                                      ignore_index=-100, reduction="none")
    return tok.sum(1) / (labels != -100).sum()


def mlm_shares(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each example's share of a masked LM's loss (mean over the labelled positions)."""
    kw = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**kw).logits.double()
    labels = batch["labels"]
    tok = nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100,
                                      reduction="none")
    return tok.sum(1) / (labels != -100).sum()


def hf_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def param_map(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every name a parameter is reached by (tied names included), ``_orig_mod.`` dropped."""
    out: dict[str, torch.Tensor] = {}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            out[full.replace("_orig_mod.", "")] = p
    return out


def _grads(loss: torch.Tensor, params: list[torch.Tensor], retain: bool = False):
    gs = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(p, dtype=torch.float64) if g is None
            else g.detach().double() for g, p in zip(gs, params,
                                                                              strict=True)]


def _median(r: np.ndarray) -> float:
    r = r[np.isfinite(r)]
    return float(np.median(r)) if r.size else math.nan


def reference(case: Case, layers: Sequence[tuple[str, str]], *, clip: float | None = None,
              shadow: nn.Module | None = None, keep_dtype: bool = False
              ) -> dict[str, dict[str, float]]:
    """Exact estimators of one step for ``layers`` (``(name, layout)``) from a float64 shadow.

    ``clip``: max total norm of a ``clip_grad_norm_`` between backward and step (over every
    parameter of the model), for ``grad_norm``; every other estimator describes the raw
    gradient. ``keep_dtype``: run the shadow in its own dtype (a replay under autocast); the
    estimators are still computed in float64 from its gradients.
    """
    model = shadow if shadow is not None else case.build()
    if not keep_dtype:
        model = model.double()
    pmap = param_map(model)
    names = [n for n, _ in layers]
    params = [pmap[n] for n in names]
    sizes = [case.size(b) for b in case.batches]
    K, B = len(sizes), float(sum(sizes))
    v = [1.0 / K] * K if case.reduction == "mean" else [b / B for b in sizes]
    c = sum(vk * vk / b for vk, b in zip(v, sizes, strict=True))
    gk, pe_sq = [], [0.0] * len(names)
    for batch, b in zip(case.batches, sizes, strict=True):
        shares = case.shares(model, batch)
        gk.append(_grads(shares.sum(), params, retain=True))
        for j in range(b):
            for i, g in enumerate(_grads(shares[j] * b, params, retain=j < b - 1)):
                pe_sq[i] += float(g.pow(2).sum())
    allp = list({id(p): p for p in model.parameters()}.values())
    coef = 1.0
    if clip is not None:
        # the total norm over every parameter, as clip_grad_norm_(model.parameters())
        tot = [sum(vk * g for vk, g in zip(v, gs, strict=True))
               for gs in zip(*[_grads(case.shares(model, bt).sum(), allp)
                               for bt in case.batches], strict=True)]
        total = math.sqrt(sum(float(t.pow(2).sum()) for t in tot))
        coef = min(1.0, clip / (total + 1e-6))
    out: dict[str, dict[str, float]] = {}
    for i, (name, layout) in enumerate(layers):
        G = sum(vk * g[i] for vk, g in zip(v, gk, strict=True))
        y = float(G.pow(2).sum())
        a = sum(b * float(g[i].pow(2).sum()) for b, g in zip(sizes, gk, strict=True))
        tr = (a - B * y) / (K - B * c) if K > 1 else math.nan
        m = pe_sq[i] / B
        pe_tr = (m - y) / (1 - c) if B > 1 else math.nan
        row = {"grad_norm": math.sqrt(y) * coef, "grad_norm_preclip": math.sqrt(y),
               "twobatch_trace": tr, "twobatch_signal": y - c * tr,
               "pe_trace": pe_tr, "pe_signal": y - c * pe_tr, "unit_nsr_median": math.nan,
               "unit_nsr_mean": math.nan}
        if layout != "vector" and K > 1:
            u_y = S.unit_sq_norms(G, layout).numpy()
            u_a = sum(b * S.unit_sq_norms(g[i], layout).numpy()
                      for b, g in zip(sizes, gk, strict=True))
            u_tr = (u_a - B * u_y) / (K - B * c)
            u_sig = u_y - c * u_tr
            # the documented floor (gradlens.stats.unit_noise): a signal within the rounding
            # of its two terms, (K y - c a) / (K - B c), is zero
            floor = UNIT_FLOOR * np.finfo(np.float64).eps * (K * u_y + c * u_a) / (K - B * c)
            with np.errstate(divide="ignore", invalid="ignore"):
                r = np.where(u_sig > floor, u_tr / u_sig, np.nan)
            row["unit_nsr_median"] = _median(r)
            fin = r[np.isfinite(r)]
            row["unit_nsr_mean"] = float(fin.mean()) if fin.size else math.nan
        out[name] = row
    return out


def rel_err(got: float, want: float, floor: float = 0.0) -> float:
    """``|got - want| / max(|want|, floor)``; inf when exactly one is NaN."""
    if math.isnan(got) and math.isnan(want):
        return 0.0
    if math.isnan(got) or math.isnan(want):
        return math.inf
    return abs(got - want) / max(abs(want), floor, 1e-300)
