"""Noise-scale verdicts: does the normalization layers' gradient noise scale predict the
whole model's (Gray et al. 2024), and is the run's batch size below its critical batch size
(McCandlish et al. 2018)? Same conventions as :mod:`gradlens.report.verdicts`."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from gradlens.report.verdict_base import (
    ROLE_ORDER,
    Verdict,
    fmt,
    fmt_p,
    layer_roles,
    missing_reason,
    select_run,
    wide_table,
)
from gradlens.schema import GLOBAL
from gradlens.stats.noise_scale import lag1_autocorrelation

# --------------------------------------------------------------------------- question 4: GNS


_NORM_MODULE = re.compile(r"norm|^ln(_|\d|$)")
_GAIN_LEAVES = ("weight", "scale", "gamma", "g")


def norm_gain_layers(layers: Iterable[str], roles: Mapping[str, str] | None = None,
                     meta: Mapping[str, Any] | None = None) -> list[str]:
    """The normalization-gain layers among ``layers``.

    With run.json layer metadata: layers whose ``group`` is ``"norms"`` (the lens's dashboard
    group of 1-D parameters of norm modules) and whose leaf name is a gain (``weight``,
    ``scale``, ``gamma``); norm biases are left out. Without it: kind ``norms`` (or the old role
    ``vector``) and a module
    name component containing ``norm`` (``input_layernorm``, ``norm``, ``final_layer_norm``) or
    GPT-2's ``ln_1`` / ``ln_2`` / ``ln_f``, with a gain leaf.
    """
    names = [str(x) for x in layers]
    groups: dict[str, str] = {}
    if meta and isinstance(meta.get("layers"), Sequence):
        groups = {str(d.get("name")): str(d.get("group", "")) for d in meta["layers"]
                  if isinstance(d, Mapping)}
    roles = roles or {}
    out = []
    for name in names:
        parts = name.lower().split(".")
        if parts[-1] not in _GAIN_LEAVES:
            continue
        if name in groups:
            if groups[name] == "norms":
                out.append(name)
        elif roles.get(name) in ("norms", "vector") and any(_NORM_MODULE.search(p)
                                                             for p in parts[:-1]):
            out.append(name)
    return out


def _layer_sums(tr: pd.DataFrame, sg: pd.DataFrame, cols: Sequence[str]
                ) -> tuple[pd.Series, pd.Series]:
    """Per-step sums of trace and signal over ``cols``; NaN at a step where any is missing."""
    t = tr[list(cols)].sum(axis=1, min_count=len(cols))
    s = sg[list(cols)].sum(axis=1, min_count=len(cols))
    return t, s


def _pe_wide(one: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    tr, sg = wide_table(one, "pe_trace"), wide_table(one, "pe_signal")
    if tr.empty or sg.empty:
        return tr, sg
    cols = [c for c in tr.columns if c in set(sg.columns)]
    idx = tr.index.intersection(sg.index)
    return tr.loc[idx, cols], sg.loc[idx, cols]


def _fisher_ci(r: float, n_eff: float, level: float = 0.95) -> tuple[float, float]:
    """CI of a Spearman correlation via Fisher's z with the Fieller et al. (1957) variance
    ``1.06 / (n - 3)``, at an effective sample size."""
    if not math.isfinite(r) or n_eff <= 3:
        return math.nan, math.nan
    z = math.atanh(max(min(r, 1 - 1e-12), -1 + 1e-12))
    half = float(sps.norm.ppf(0.5 + level / 2)) * math.sqrt(1.06 / (n_eff - 3))
    return math.tanh(z - half), math.tanh(z + half)


def norm_gns_verdict(
    df: pd.DataFrame,
    *,
    meta: Mapping[str, Any] | None = None,
    run: str | None = None,
    beta: float = 0.8,
    alpha: float = 0.05,
    min_steps: int = 10,
    strong: float = 0.7,
) -> Verdict:
    """Does the normalization layers' GNS predict the total GNS here? (Gray, Tiwari, Bergsma,
    Hestness, NeurIPS 2024, arXiv 2411.00999: the per-example GNS of the normalization layers
    alone tracks the GNS of the whole model.)

    Per step ``t``, from the per-example rows ``pe_trace`` and ``pe_signal``:
    ``total_t = EMA(sum_l tr_l) / EMA(sum_l s_l)`` over every layer with both, and ``norm_t``
    the same over the norm-gain layers (:func:`norm_gain_layers`), ratio of EMAs with factor
    ``beta`` (``0``: per-step ratios); a step is used when every layer of a set has both values
    and both smoothed GNS are positive.

    Numbers: Pearson and Spearman correlations of ``log norm_t`` with ``log total_t`` (scipy's
    p-values, one-sided "positive", which assume independent steps), the lag-1
    autocorrelation ``r`` of the residuals of ``log norm`` regressed on ``log total`` (the EMA
    makes them dependent; a trend shared by both is what is being measured, so it is taken
    out first) and the effective step count ``n (1 - r)/(1 + r)`` (``r`` clipped to
    ``[0, 0.95]``),
    a ``1 - alpha`` (95%) CI of Spearman's rho from Fisher's z at that effective count, the ratio
    ``norm_t / total_t`` (median, quartiles, relative IQR = IQR / median) and the range of the
    total GNS over the run (``total_range`` = max / min).

    Answer ``yes`` when Spearman's rho >= ``strong`` (0.7), its CI lies above 0, and the
    relative IQR of the ratio is <= 0.5 (the norm layers' GNS is a stable multiple of the
    total); ``no`` when the CI's upper bound is below ``strong`` or the relative IQR exceeds
    1; ``cannot tell`` otherwise, or when the total GNS varies by less than a factor 1.25 over
    the run (then there is nothing for a correlation to explain). ``not computable`` (with the
    reason) without per-example rows, without norm-gain layers among them, or with fewer than
    ``min_steps`` usable steps.
    """
    from gradlens.stats.noise_scale import smoothed_noise_scale

    one = select_run(df, run)
    question = "Does the normalization layers' GNS predict the total GNS here?"
    mk = dict(kind="norm_gns", stat="pe_noise_scale", run=run)
    base: dict[str, Any] = {"beta": beta}
    tr, sg = _pe_wide(one)
    if tr.empty:
        return Verdict(question, "not computable", base, missing_reason("pe_trace", one, meta),
                       **mk)
    if sg.empty or tr.shape[1] == 0:
        return Verdict(question, "not computable", base,
                       "no pe_signal rows: the per-example |G|^2 estimate per layer is needed "
                       "next to pe_trace (written by lens versions that emit pe_signal)", **mk)
    roles = layer_roles(one)
    norms = norm_gain_layers(tr.columns, roles, meta)
    base.update(n_layers=int(tr.shape[1]), n_norm_layers=len(norms))
    if not norms:
        return Verdict(question, "not computable", base,
                       "the run has no per-example rows for normalization layers (pe_trace / "
                       "pe_signal of norm gains): the per-example family must cover the 1-D "
                       "norm parameters", **mk)
    if len(norms) == tr.shape[1]:
        return Verdict(question, "not computable", base,
                       "only normalization layers have per-example rows: the total GNS would "
                       "be the norm layers' own", **mk)
    t_all, s_all = _layer_sums(tr, sg, list(tr.columns))
    t_norm, s_norm = _layer_sums(tr, sg, norms)
    ok = (t_all.notna() & s_all.notna() & t_norm.notna() & s_norm.notna()).to_numpy()
    steps = tr.index.to_numpy()[ok]
    total = smoothed_noise_scale(t_all.to_numpy()[ok], s_all.to_numpy()[ok], beta)
    normg = smoothed_noise_scale(t_norm.to_numpy()[ok], s_norm.to_numpy()[ok], beta)
    pos = np.isfinite(total) & np.isfinite(normg) & (total > 0) & (normg > 0)
    n = int(pos.sum())
    base.update(n_steps=n)
    if n < min_steps:
        return Verdict(question, "not computable", base,
                       f"only {n} step(s) with a positive smoothed GNS for both the norm layers "
                       f"and all layers; need >= {min_steps}", **mk)
    lt, ln = np.log(total[pos]), np.log(normg[pos])
    ratio = normg[pos] / total[pos]
    q25, med, q75 = (float(x) for x in np.quantile(ratio, [0.25, 0.5, 0.75]))
    rel_iqr = (q75 - q25) / med
    total_range = float(math.exp(np.ptp(lt)))
    slope, icpt = np.polyfit(lt, ln, 1) if np.ptp(lt) > 0 else (0.0, float(np.mean(ln)))
    # the dependence of the residuals, not of the trend
    ac = lag1_autocorrelation(ln - (icpt + slope * lt))
    r_ac = min(max(ac, 0.0), 0.95) if math.isfinite(ac) else 0.0
    n_eff = n * (1 - r_ac) / (1 + r_ac)
    base.update(first_step=int(steps[pos].min()), last_step=int(steps[pos].max()),
                ratio_median=med, ratio_q25=q25, ratio_q75=q75, ratio_rel_iqr=rel_iqr,
                total_gns_median=float(np.median(total[pos])),
                norm_gns_median=float(np.median(normg[pos])), total_range=total_range,
                lag1_autocorr=ac, n_eff=n_eff)
    if np.ptp(lt) == 0 or np.ptp(ln) == 0:
        base.update(pearson=math.nan, spearman=math.nan)
        return Verdict(question, "cannot tell", base,
                       "the GNS is constant over the run: no correlation to compute", **mk)
    pr = sps.pearsonr(lt, ln, alternative="greater")
    sr = sps.spearmanr(lt, ln, alternative="greater")
    rho = float(sr.statistic)
    lo, hi = _fisher_ci(rho, n_eff, 1.0 - alpha)
    base.update(pearson=float(pr.statistic), pearson_p=float(pr.pvalue), spearman=rho,
                spearman_p=float(sr.pvalue), spearman_ci_low=lo, spearman_ci_high=hi)
    where = f"steps {base['first_step']}..{base['last_step']} (n={n}, effective {n_eff:.0f})"
    head = (f"over {len(norms)} norm-gain layer(s) of {tr.shape[1]}: log GNS correlation "
            f"Spearman {rho:.2f} ({100 * (1 - alpha):g}% CI {fmt(lo, 2)}..{fmt(hi, 2)}, p = "
            f"{fmt_p(float(sr.pvalue))}), Pearson {float(pr.statistic):.2f}; norm/total GNS "
            f"median {fmt(med)} (IQR {fmt(q25)}..{fmt(q75)}), total GNS spans "
            f"x{fmt(total_range)} over {where}")
    if total_range < 1.25:
        answer = "cannot tell"
        head += "; the total GNS hardly varies, so a correlation has little to explain"
    elif rho >= strong and math.isfinite(lo) and lo > 0 and rel_iqr <= 0.5:
        answer = "yes"
    elif (math.isfinite(hi) and hi < strong) or rel_iqr > 1.0:
        answer = "no"
    else:
        answer = "cannot tell"
    if math.isfinite(ac) and ac > 0.5:
        head += (f". Residuals are autocorrelated (lag-1 r = {ac:.2f}, EMA-smoothed): scipy's "
                 "p-values are optimistic, the CI uses the effective count")
    return Verdict(question, answer, base, head + ".", **mk)


SPIKE_STEP_KINDS = ("grad_norm", "grad_norm_global", "nonfinite", "skipped_step")


def spike_steps(spikes: pd.DataFrame | None, run: str | None = None) -> set[int]:
    """Steps with a spike event of :data:`SPIKE_STEP_KINDS` (the steps the lens keeps out of
    its variance EMAs)."""
    if spikes is None or spikes.empty or "kind" not in spikes.columns:
        return set()
    sp = select_run(spikes, run) if "run" in spikes.columns else spikes
    return {int(s) for s in sp.loc[sp["kind"].isin(SPIKE_STEP_KINDS), "step"]}


def _batch_size(one: pd.DataFrame, meta: Mapping[str, Any] | None) -> tuple[float | None, str]:
    rows = one[(one["stat"] == "batch_size") & (one["layer"] == GLOBAL)]
    vals = pd.to_numeric(rows.sort_values("step")["value"], errors="coerce").dropna()
    vals = vals[np.isfinite(vals) & (vals > 0)]
    if not vals.empty:
        return float(vals.iloc[-1]), "batch_size rows"
    if meta and isinstance(meta.get("batch_size"), (int, float)) and meta["batch_size"] > 0:
        return float(meta["batch_size"]), "run.json"
    return None, ""


def critical_batch_size_verdict(
    df: pd.DataFrame,
    *,
    meta: Mapping[str, Any] | None = None,
    run: str | None = None,
    window: int | None = 100,
    beta: float = 0.95,
    ci: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
    min_steps: int = 10,
    spikes: pd.DataFrame | None = None,
) -> Verdict:
    """Is the batch size below the critical batch size (McCandlish et al. 2018)?

    ``B_crit ~ B_simple = tr(Sigma) / |G|**2`` of the whole model (the assumptions are in
    :mod:`gradlens.stats.noise_scale`): per step the sums over all layers of ``pe_trace`` and
    ``pe_signal`` (or, without per-example rows, ``twobatch_trace`` and ``twobatch_signal``),
    a step used when every layer has both. Over the last ``window`` such steps: the ratio of
    means with a circular block-bootstrap percentile interval at level ``ci``
    (:func:`gradlens.stats.noise_scale.noise_scale_readout`), the smoothed ratio of EMAs at the
    last step, and per role the ratio of means of the role's sums (``b_simple_<role>``).
    Steps with a spike event (``spikes``: ``grad_norm``, ``grad_norm_global``, ``nonfinite``,
    ``skipped_step``) are left out, as the lens leaves them out of its EMAs: one spike step
    would otherwise decide a ratio of means (``n_spike_steps_excluded``).

    The batch size ``B`` (examples per optimizer step, all micro-batches and ranks) is the last
    ``batch_size`` global row, else run.json's ``batch_size``. Answer ``yes`` when ``B`` is
    below the interval (more data per step would still speed training up nearly linearly),
    ``no`` when above (a larger batch mostly costs compute), ``cannot tell`` inside it or when
    the mean signal is not positive (no detectable signal), ``not computable`` without the
    estimates, the batch size or ``min_steps`` steps.
    """
    from gradlens.stats.noise_scale import noise_scale_readout

    one = select_run(df, run)
    question = "Is the batch size below the critical batch size?"
    mk = dict(kind="critical_batch", stat="critical_batch_size", run=run)
    base: dict[str, Any] = {"ci": ci, "window": window}
    tr, sg = _pe_wide(one)
    source = "per-example"
    if tr.empty or sg.empty or tr.shape[1] == 0:
        tr, sg = wide_table(one, "twobatch_trace"), wide_table(one, "twobatch_signal")
        source = "two-batch"
        if not tr.empty and not sg.empty:
            cols = [c for c in tr.columns if c in set(sg.columns)]
            idx = tr.index.intersection(sg.index)
            tr, sg = tr.loc[idx, cols], sg.loc[idx, cols]
    if tr.empty or sg.empty or tr.shape[1] == 0:
        return Verdict(question, "not computable", base,
                       "no (trace, signal) pairs: the critical batch size needs pe_trace and "
                       "pe_signal (full preset) or twobatch_trace and twobatch_signal "
                       f"({missing_reason('twobatch_trace', one, meta)})", **mk)
    bsz, bsz_src = _batch_size(one, meta)
    if bsz is None:
        return Verdict(question, "not computable", base,
                       "the run's batch size is unknown: no batch_size global row and no "
                       "batch_size in run.json", **mk)
    t_all, s_all = _layer_sums(tr, sg, list(tr.columns))
    flagged = spike_steps(spikes, run)
    ok = (t_all.notna() & s_all.notna()).to_numpy() & ~tr.index.isin(flagged)
    base["n_spike_steps_excluded"] = int(tr.index.isin(flagged).sum())
    n_ok = int(ok.sum())
    base.update(source=source, batch_size=bsz, batch_size_from=bsz_src,
                n_layers=int(tr.shape[1]))
    if n_ok < min_steps:
        base["n_steps"] = n_ok
        return Verdict(question, "not computable", base,
                       f"only {n_ok} step(s) with {source} estimates for every layer; need >= "
                       f"{min_steps}", **mk)
    steps = tr.index.to_numpy()[ok]
    r = noise_scale_readout(t_all.to_numpy()[ok], s_all.to_numpy()[ok], steps=steps,
                            window=window, beta=beta, ci=ci, n_boot=n_boot, seed=seed)
    base.update(critical_batch_size=r.estimate, ci_low=r.ci_low, ci_high=r.ci_high,
                smoothed=r.smoothed, step=r.step, n_steps=r.n_steps, block=r.block,
                mean_trace=r.mean_trace, mean_signal=r.mean_signal)
    logged = one[(one["stat"] == "critical_batch_size") & (one["layer"] == GLOBAL)]
    if not logged.empty:
        base["logged_critical_batch_size"] = float(logged.sort_values("step")["value"].iloc[-1])
    roles = layer_roles(one)
    lo_step = int(steps[-r.n_steps:][0]) if r.n_steps else None
    win = tr.index >= lo_step if lo_step is not None else np.ones(len(tr.index), bool)
    for role in sorted({roles.get(c, "") for c in tr.columns} - {""},
                       key=lambda x: ROLE_ORDER.get(x, 9)):
        cols = [c for c in tr.columns if roles.get(c) == role]
        t_r, s_r = _layer_sums(tr.loc[win], sg.loc[win], cols)
        good = t_r.notna() & s_r.notna()
        ms = float(s_r[good].mean()) if good.any() else math.nan
        base[f"b_simple_{role}"] = (float(t_r[good].mean()) / ms if ms > 0 else
                                    (math.inf if good.any() else math.nan))
    pct = f"{100 * ci:g}%"
    span = f"steps {lo_step}..{r.step} (n={r.n_steps}, {source} estimates)"
    interval = f"~{fmt(r.estimate)} ({pct} CI {fmt(r.ci_low)}..{fmt(r.ci_high)})"
    if not math.isfinite(r.estimate):
        return Verdict(question, "cannot tell", base,
                       f"no detectable gradient signal over {span}: the mean |G|^2 estimate is "
                       f"{fmt(r.mean_signal)} <= 0, so the noise scale is unbounded; the batch "
                       f"size B={bsz:g} is not compared", **mk)
    if bsz < r.ci_low:
        answer, where = "yes", "below"
    elif bsz > r.ci_high:
        answer, where = "no", "above"
    else:
        answer, where = "cannot tell", "within the interval of"
    reason = (f"the batch size B={bsz:g} is {where} the critical batch size {interval} at step "
              f"{r.step}; ratio of means over {span}, smoothed B_simple {fmt(r.smoothed)}. "
              "B_crit ~ B_simple assumes a Hessian close to a multiple of the identity.")
    return Verdict(question, answer, base, reason, **mk)
