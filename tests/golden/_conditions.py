"""How far a golden value may move when the gradients move by rounding: the tolerance model.

Rounding bound. A run on another CPU (another kernel path, another thread count) reduces in
another order. In a float32 island with an ``n``-term reduction that changes a result by at
most ``gamma_n = n u`` relative (``u`` the unit roundoff; Higham, *Accuracy and Stability of
Numerical Algorithms*, 2nd ed., eq. 3.4). HF LLaMA computes its RMSNorm (``d = 32`` terms) and
its loss (a log-sum-exp over ``V = 128`` logits) in float32 even in a float64 model, so every
gradient entry of the LLaMA scenarios moves by ``128 u32`` per step at most (its parameters
are drawn in float32 and cast, a few ``u32`` more at the start; the float64
matmuls add ``n u64``, negligible; torch's CPU sums are cascaded, so the lens's own float32
reductions over <= 4096 entries add ~``12 u32``, also covered). A difference in step j's
gradient moves the parameters and every later gradient; to first order the bound grows
linearly: ``d(s) = s n u`` at step s. The float64 scenario has no float32 island: ``n`` is
its longest reduction (tokens x batch), ``u = u64``.

Condition numbers. A statistic ``f`` of entries that move by ``d`` relative moves by
``kappa 2 d`` relative (the 2: squares). ``kappa`` is stored next to each value in the golden
file (computed here from the run's own values and the float64 reference of ``_twobatch``):

- norms, RMS, max, loss, histogram edges: 1 (``grad_max_abs`` is 1-Lipschitz in the entries);
- ratios of two of them (p99/p50, max/min, ratio to the running max): 2;
- coefficient of variation ``s/m``: ``1 + sqrt(1 + 1/cv^2)`` (``sum_i |ds/dx_i| |x_i| / s <=
  sqrt(E x^2) / s``); Gini: ``1 + 1/G`` (``sum_i |dG/dx_i| |x_i| <= 1``);
- a difference ``P - Q`` of nonnegative terms: ``(P + Q) / |P - Q|``; ``_twobatch`` has the
  two-batch ones; per-example ``pe_trace = (m - y)/(1 - c)`` with ``m = pe_trace (1 - c) + y``;
  temporal ``var = (E||g||^2 - ||Eg||^2)/(1 - sum w^2)`` (``gradlens.stats.temporal_readout``);
  ``var_normalized`` of ``G/r`` whose squared norm is ``numel`` exactly;
- a ratio of two: the sum of their condition numbers; a ratio of EMAs: of the EMAs' (each
  ``sum_j w_j |x_j| kappa_j / |sum_j w_j x_j|``);
- a median over units of ratios: the interval of ``_twobatch.nsr_interval``; ``inf`` when a
  unit's sign test may flip (the value is then compared for its NaN pattern only: it is
  compared with the same-run float64 reference instead, ``test_golden``).

Counts (exact): ``nonfinite_count``, ``microbatches``, ``batch_size`` (kappa 0). Counts past a
threshold have no condition number: a histogram count or ``spam_fraction`` may change only by
the entries the golden run found within rounding of an edge or of SPAM's threshold (stored as
``hist_slack`` / ``count_slack``; ``spam_fraction`` is compared for its NaN pattern only where
none was stored, in the distributed files). The spike z-scores are NaN in these short runs (the
detectors are warming up): their NaN pattern is compared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from tests.golden._twobatch import ema_ratio, interval_cond, nsr_interval

U32, U64 = 2.0**-24, 2.0**-53
STRUCTURE_ONLY = math.inf
BEYOND = 0.5  # a first-order bound this wide says nothing: compare the NaN pattern only

ONE = {"grad_norm", "grad_norm_preclip", "grad_rms", "grad_max_abs", "loss"}
TWO = {"unit_rms_p99_p50", "unit_rms_max_min", "fan_rms_p99_p50", "fan_rms_max_min",
       "grad_norm_ratio_max"}
EXACT = {"nonfinite_count", "microbatches", "batch_size"}
PATTERN = {"spam_fraction", "grad_norm_z", "loss_z"}


def drift(step: int, n: int, u: float) -> float:
    """``d(s) = s n u``: the relative move of a gradient entry at step ``step``."""
    return step * n * u


def _f(v: Any) -> float:
    return float(v)


def _diff(p: float, q: float) -> float:
    return (abs(p) + abs(q)) / abs(p - q) if p != q else math.inf


def conditions(rows: Mapping[str, Any], refs: Mapping[int, Mapping[str, Any]],
               meta: Mapping[str, Any]) -> dict[str, float]:
    """``{key: kappa}`` of every row (``refs[step][layer]``: ``_twobatch.two_batch``; ``meta``:
    ``noise_ema``, ``temporal_beta``, ``n``, ``u``)."""
    by: dict[tuple[int, str], dict[str, float]] = {}
    for key, v in rows.items():
        s, layer, stat = key.split("|")
        by.setdefault((int(s), layer), {})[stat] = _f(v)
    out: dict[str, float] = {}
    steps = sorted({s for s, _ in by})
    beta_n, beta_t = meta["noise_ema"], meta["temporal_beta"]
    hist_tb: dict[str, list] = {}
    hist_crit: list = []
    for s in steps:
        d = drift(s, meta["n"], meta["u"])
        crit_num, crit_den = [], []
        for (s2, layer), r in sorted(by.items()):
            if s2 != s:
                continue
            k: dict[str, float] = {}
            for stat, v in r.items():
                if stat in EXACT:
                    k[stat] = 0.0
                elif stat in ONE:
                    k[stat] = 1.0
                elif stat in TWO:
                    k[stat] = 2.0
                elif stat.endswith("_cv") and math.isfinite(v):
                    k[stat] = 1 + math.sqrt(1 + 1 / v**2) if v else math.inf
                elif stat.endswith("_gini") and math.isfinite(v):
                    k[stat] = 1 + 1 / v if v else math.inf
            ref = refs.get(s, {}).get(layer)
            if ref is not None:
                k.update(_two_batch(r, ref, d, hist_tb.setdefault(layer, []), beta_n))
                k.update(_per_example(r, ref, crit_num, crit_den))
            k.update(_temporal(r, s, beta_t))
            for stat in r:
                out[f"{s}|{layer}|{stat}"] = k.get(stat, 1.0 if math.isnan(r[stat])
                                                   else STRUCTURE_ONLY)
        if crit_num and f"{s}|global|critical_batch_size" in rows:
            hist_crit.append((_sum_cond(crit_num), _sum_cond(crit_den)))
            _, kc = ema_ratio([n for n, _ in hist_crit], [m for _, m in hist_crit], beta_n)
            out[f"{s}|global|critical_batch_size"] = kc
    return out


def _sum_cond(parts: list[tuple[float, float]]) -> tuple[float, float]:
    """``(sum x, its condition)`` of terms ``(x, kappa)`` (NaN terms skipped, as nansum)."""
    parts = [(x, k) for x, k in parts if math.isfinite(x)]
    total = sum(x for x, _ in parts)
    return total, (sum(abs(x) * k for x, k in parts) / abs(total) if total else math.inf)


def _two_batch(r: Mapping[str, float], ref: Mapping[str, Any], d: float, history: list,
               beta: float) -> dict[str, float]:
    if "twobatch_trace" not in r:
        return {}
    kT, kS = ref["kT"], ref["kS"]
    history.append(((ref["T"], kT), (ref["S"], kS)))
    _, kN = ema_ratio([t for t, _ in history], [s for _, s in history], beta)
    out = {"twobatch_trace": kT, "var_per_element": kT, "twobatch_signal": kS,
           "noise_scale": kN}
    if "uT" in ref:
        (m_lo, m_hi), (a_lo, a_hi) = nsr_interval(ref, d)
        out["unit_nsr_median"] = interval_cond(r.get("unit_nsr_median", math.nan), m_lo,
                                               m_hi, d)
        out["unit_nsr_mean"] = interval_cond(r.get("unit_nsr_mean", math.nan), a_lo, a_hi, d)
    return out


def _per_example(r: Mapping[str, float], ref: Mapping[str, Any], crit_num: list,
                 crit_den: list) -> dict[str, float]:
    P, Spe = r.get("pe_trace", math.nan), r.get("pe_signal", math.nan)
    if not (math.isfinite(P) and math.isfinite(Spe)):
        return {}
    y, c = ref["y"], ref["c"]
    m = P * (1 - c) + y
    kP = _diff(m, y)
    kS = (y + c * abs(P) * kP) / abs(Spe) if Spe else math.inf
    crit_num.append((P, kP))
    crit_den.append((Spe, kS))
    return {"pe_trace": kP, "pe_var_per_element": kP, "pe_signal": kS,
            "pe_noise_scale": kP + kS}


def _temporal(r: Mapping[str, float], step: int, beta: float) -> dict[str, float]:
    """From ``temporal_var`` and ``temporal_noise_scale`` (``temporal_readout``'s unbiased
    forms, ``step`` accepted steps)."""
    v, ns, vn = (r.get(k, math.nan) for k in ("temporal_var", "temporal_noise_scale",
                                               "temporal_var_normalized"))
    if not math.isfinite(v):
        return {}
    w2 = (1 - beta) * (1 + beta**step) / ((1 + beta) * (1 - beta**step))
    out: dict[str, float] = {}
    if math.isfinite(ns) and ns:
        msq = v / ns  # ||Eg||^2 - w2 var
        p2 = msq + w2 * v
        p1 = p2 + (1 - w2) * v
        kv = _diff(p1, p2)
        kmsq = (abs(p2) + w2 * abs(v) * kv) / abs(msq)
        out.update(temporal_var=kv, temporal_var_per_element=kv, temporal_noise_scale=kv + kmsq)
    elif v > 0 and w2 < 1:
        # no noise scale: the unbiased ||Eg||^2 - w2 var <= 0, so 0 <= p2 <= w2 var and
        # (p1 + p2) / (p1 - p2) <= (1 + w2) / (1 - w2)
        kv = (1 + w2) / (1 - w2)
        out.update(temporal_var=kv, temporal_var_per_element=kv)
    if math.isfinite(vn):
        out["temporal_var_normalized"] = _diff(1.0, 1.0 - (1 - w2) * vn)
    return out


def histogram_slack(values: np.ndarray, edges: list[float], d: float) -> list[int]:
    """Per bucket of ``gradlens.stats.log_histogram``: how many values may cross into or out
    of it when values and edges move by ``d`` relative (both ends of a bucket count)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x) & (x > 0)]
    e = np.asarray(edges[1:-1], dtype=np.float64)  # the first and last are the min and max
    if not x.size or not e.size:
        return [0] * len(edges)
    near = np.abs(np.log(x)[:, None] - np.log(e)[None, :]) <= 3 * d  # value d, edge 2d
    per_edge = near.sum(0)
    slack = [0] * len(edges)
    for j, n in enumerate(per_edge, start=1):  # edge j separates buckets j and j + 1
        slack[j] += int(n)
        slack[j + 1] += int(n)
    return slack
