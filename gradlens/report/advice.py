r"""Which layers benefit from momentum, from a run's own per-layer statistics.

The criterion. Per layer, the gradient of step ``t`` is ``g_t = mu_t + e_t``: ``mu_t`` the
expected gradient, ``e_t`` noise of trace ``s^2`` per step with lag correlation
``E<e_t, e_{t-k}> = rho^k s^2``, and ``mu`` drifting as a random walk with
``E||mu_t - mu_{t-1}||^2 = d^2``. The update direction is either the raw gradient (squared
error ``E||g_t - mu_t||^2 = s^2``) or its EMA ``m_t = beta m_{t-1} + (1 - beta) g_t``, whose
error ``m_t - mu_t = sum_j w_j e_{t-j} - sum_i beta^{i+1} delta_{t-i}`` (``w_j = (1-beta)
beta^j``, ``delta`` the drift increments) has

    E||m_t - mu_t||^2 = s^2 (1-beta)/(1+beta) (1+beta rho)/(1-beta rho)    (averaged noise)
                      + d^2 beta^2 / (1 - beta^2)                           (lag behind mu)

(the noise sum: ``sum_{i,j} w_i w_j rho^|i-j|``; the drift sum: ``sum_i beta^{2(i+1)}``). In
units of ``|mu|^2``, with ``n = s^2/|mu|^2`` the per-step noise-to-signal ratio and
``delta = d^2/|mu|^2`` the relative drift per step::

    raw: n            EMA: n V + delta beta^2/(1-beta^2),   V = (1-beta)(1+beta rho) /
                                                                ((1+beta)(1-beta rho))

so momentum helps when ``n (1 - V) > delta beta^2/(1-beta^2)``: a noise-to-signal ratio that
is large against the drift, and noise that is not persistent (``rho`` well below 1; for white
noise ``V = (1-beta)/(1+beta)``, 0.053 at ``beta = 0.9``; at ``rho = 0.95`` it is 0.67). A
layer is advised momentum when its noise matters (``n >= min_noise``) and the EMA at least
halves the squared error (``EMA / raw <= max_ratio``).

The evidence (in order of preference):

- :class:`gradlens.families.lag.GradLag` (``statistics=[GradLag]``): ``c_0 = ||g_t||^2``,
  ``c_1 = <g_t, g_{t-1}>``, ``c_2 = <g_t, g_{t-2}>`` averaged over the window give
  ``rho = (c_1 - c_2)/(c_0 - c_1)``, ``s^2 = (c_0 - c_1)/(1 - rho)``, ``|mu|^2 = c_0 - s^2``;
- else a within-step noise-to-signal ratio, ``n = B_simple / B`` (``pe_noise_scale`` or
  ``noise_scale`` over the ``batch_size`` row), or ``temporal_noise_scale`` (which includes
  the drift within its EMA window), assuming white noise (``rho = 0``); the evidence says so.

The drift ``delta`` is not identifiable from these statistics: pass it (default 0). Noise
that persists for a good part of the window (``rho`` near 1) is partly indistinguishable from
signal there: ``rho`` and ``n`` then read low (measured: ``rho`` 0.95 with a 20-step memory
reads 0.84 and ``n`` 4 reads 0.35 over 300 steps), which advises against momentum, as the
true values would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from gradlens.kinds import layer_kind
from gradlens.schema import GLOBAL

__all__ = ["MomentumAdvice", "advise_momentum", "ema_mse_ratio", "momentum_table",
           "within_budget"]


def ema_mse_ratio(beta: float, rho: float) -> float:
    """``V``: the EMA's noise error over the raw gradient's, for lag correlation ``rho``."""
    return (1 - beta) * (1 + beta * rho) / ((1 + beta) * (1 - beta * rho))


@dataclass(frozen=True)
class MomentumAdvice:
    """The advice for one layer.

    ``noise_to_signal`` is ``n``, ``rho`` the noise's lag-1 correlation (0 when assumed),
    ``mse_ratio`` the EMA's squared direction error over the raw gradient's, ``buffer_bytes``
    the memory of one float32 momentum buffer, ``evidence`` the numbers it rests on.
    """

    layer: str
    role: str
    momentum: bool
    noise_to_signal: float
    rho: float
    mse_ratio: float
    buffer_bytes: int
    evidence: dict[str, Any] = field(default_factory=dict)
    matrix: bool | None = None  # None: unknown, decided by the role (1-D: norms / vector)


def _numels(meta: dict[str, Any] | None) -> dict[str, int]:
    return {str(x["name"]): int(x["numel"]) for x in (meta or {}).get("layers", [])
            if "numel" in x and "name" in x}


def _frame(run: str | Path | pd.DataFrame, meta: dict[str, Any] | None
           ) -> tuple[pd.DataFrame, dict[str, int]]:
    if isinstance(run, pd.DataFrame):
        return run, _numels(meta)
    from gradlens.report.load import load_meta, load_run  # the files, not the report

    return load_run(run), _numels(meta if meta is not None else load_meta(run))


def advise_momentum(run: str | Path | pd.DataFrame, beta: float = 0.9, *,
                    drift: float = 0.0, min_noise: float = 1.0, max_ratio: float = 0.5,
                    window: float = 0.5, meta: dict[str, Any] | None = None
                    ) -> list[MomentumAdvice]:
    """Per layer, whether an EMA of factor ``beta`` improves the update direction.

    Args:
        run: a run directory, or its long table as a DataFrame (buffer bytes then come from
            ``meta``, run.json's content, else are 0).
        beta: the momentum factor considered.
        drift: ``delta = d^2/|mu|^2``, the expected gradient's relative drift per step.
        min_noise, max_ratio: advise momentum where ``n >= min_noise`` and the squared
            error ratio (EMA over raw) is at most ``max_ratio``.
        window: the last fraction of the logged steps the evidence is averaged over.

    Returns the layers in table order; ``[a.layer for a in advice if a.momentum]`` is what
    :func:`gradlens.scale_param_groups` takes as ``momentum_layers``.
    """
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta!r}")
    if not 0 < window <= 1:
        raise ValueError(f"window must be in (0, 1], got {window!r}")
    df, numels = _frame(run, meta)
    if meta is None and not isinstance(run, pd.DataFrame):
        from gradlens.report import load_meta

        meta = load_meta(run)
    layouts = {str(x["name"]): x.get("layout") for x in (meta or {}).get("layers", [])
               if isinstance(x, dict) and "name" in x}
    if df.empty:
        raise ValueError("advise_momentum: the run has no rows")
    steps = sorted(df["step"].unique())
    df = df[df["step"] >= steps[int(len(steps) * (1 - window))]]
    batch = df[(df["layer"] == GLOBAL) & (df["stat"] == "batch_size")]["value"].median()
    wide = df[df["layer"] != GLOBAL].pivot_table(index=["layer", "step"], columns="stat",
                                                 values="value", aggfunc="last")
    roles = df.drop_duplicates("layer").set_index("layer")["role"].to_dict()
    out = []
    present = set(wide.index.get_level_values(0)) if len(wide) else set()
    for layer in dict.fromkeys(df.loc[df["layer"] != GLOBAL, "layer"]):
        one = wide.loc[layer] if layer in present else pd.DataFrame()  # all-NaN: dropped
        ev: dict[str, Any] = {}
        n, rho = math.nan, 0.0
        if {"grad_lag1_dot", "grad_lag2_dot", "grad_norm"} <= set(one.columns):
            rows = one[["grad_norm", "grad_lag1_dot", "grad_lag2_dot"]].dropna()
            if len(rows):
                c0 = float((rows["grad_norm"] ** 2).mean())
                c1 = float(rows["grad_lag1_dot"].mean())
                c2 = float(rows["grad_lag2_dot"].mean())
                ev.update(source="grad_lag", c0=c0, c1=c1, c2=c2, steps=len(rows))
                if c0 - c1 > 0:
                    rho = min(max((c1 - c2) / (c0 - c1), -0.999), 0.999)
                    s2 = (c0 - c1) / (1 - rho)
                    mu2 = c0 - s2
                    n = s2 / mu2 if mu2 > 0 else math.inf
                else:  # no decorrelation at lag 1: persistent, not noise
                    n, rho = 0.0, 0.999
        if math.isnan(n):
            for stat in ("pe_noise_scale", "noise_scale", "temporal_noise_scale"):
                if stat in one.columns and one[stat].notna().any():
                    value = float(one[stat].median())
                    if stat == "temporal_noise_scale":
                        n = value
                    elif batch and batch > 0:
                        n = value / float(batch)
                    else:
                        continue
                    ev.update(source=stat, value=value, assumed="white noise (rho = 0)")
                    break
        if math.isnan(n):
            ratio = math.nan
            advise = False
            ev.setdefault("missing", "no grad_lag, noise-scale or temporal statistics")
        else:
            lag = drift * beta**2 / (1 - beta**2)
            # EMA over raw squared error, (n V + lag) / n: all noise (n = inf) gives V
            ratio = ema_mse_ratio(beta, rho) + lag / n if n > 0 else math.inf
            advise = n >= min_noise and ratio <= max_ratio
        layout = layouts.get(str(layer))
        role = layer_kind(str(layer), str(roles.get(layer, "")))
        out.append(MomentumAdvice(str(layer), role, bool(advise), n, rho, ratio,
                                  4 * numels.get(str(layer), 0), ev,
                                  None if layout is None else layout != "vector"))
    return out


def _matrix(a: MomentumAdvice) -> bool:
    return a.matrix if a.matrix is not None else a.role not in ("vector", "norms")


def within_budget(advice: list[MomentumAdvice], budget_bytes: int,
                  roles: tuple[str, ...] = ("embedding", "attention", "mlp", "output", "other")
                  ) -> list[str]:
    """The advised layers (of ``roles``) that fit in ``budget_bytes`` of momentum buffers.

    The gain of a layer's buffer is the drop of its squared direction error in units of its
    ``|mu|^2``: ``n (1 - mse_ratio)`` (infinite where no signal is measurable, ``n = inf``).
    Layers are taken greedily by gain per buffer byte (infinite gains first, smallest buffers
    first among them) while the total fits. Returns their names in table order.
    """
    if budget_bytes < 0:
        raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes!r}")
    cands = [a for a in advice if a.momentum and _matrix(a)
             and layer_kind(a.layer, a.role) in roles and a.buffer_bytes > 0]

    def key(a: MomentumAdvice) -> tuple[int, float]:
        gain = a.noise_to_signal * (1 - a.mse_ratio)
        return (0, a.buffer_bytes) if math.isinf(gain) else (1, -gain / a.buffer_bytes)

    chosen, used = set(), 0
    for a in sorted(cands, key=key):
        if used + a.buffer_bytes <= budget_bytes:
            chosen.add(a.layer)
            used += a.buffer_bytes
    return [a.layer for a in advice if a.layer in chosen]


def momentum_table(advice: list[MomentumAdvice]) -> pd.DataFrame:
    """The advice as a table: one row per layer (the report's momentum section)."""
    return pd.DataFrame([{
        "layer": a.layer, "role": a.role, "momentum": a.momentum,
        "noise_to_signal": a.noise_to_signal, "rho": a.rho, "mse_ratio": a.mse_ratio,
        "buffer_bytes": a.buffer_bytes, "source": a.evidence.get("source", "")}
        for a in advice])
