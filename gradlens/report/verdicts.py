"""Statistical verdicts on the long table: the questions the report answers, with their numbers.

Everything here takes DataFrames in the schema of :mod:`gradlens.schema` (columns ``step, layer,
role, stat, value``, optionally ``run``; spike events ``step, layer, kind, value, score,
layers``) and never a live training process. Nothing is random beyond a seeded bootstrap, so the
same input always gives the same verdicts.

Three questions:

1. :func:`output_highest_verdict`: for one variance estimator, is the output layer's value the
   highest of all layers? Per step, the output layer is compared with the largest of all other
   layers. Numbers: fraction of steps where it ranks first, its median rank, a Wilcoxon
   signed-rank test of ``d_t = log(output_t / max_other_t)`` across steps, and effect sizes
   (median ``d``, matched-pairs rank-biserial correlation).
2. :func:`column_spread_verdict`: how spread are the per-unit RMS values of the gradient (the
   ``columns`` family, ``unit_rms_*`` on SCALE's axis and ``fan_rms_*`` on the other), per role?
   Median and bootstrap CI per role; Kruskal-Wallis test across roles.
3. :func:`instability_verdict`: spikes, non-finite gradient entries and skipped steps.
4. :func:`norm_gns_verdict`: does the normalization layers' gradient noise scale predict the
   total one (Gray et al. 2024)? Correlations of the log GNS over steps, the norm/total ratio.
5. :func:`critical_batch_size_verdict`: is the batch size below the critical batch size
   ``B_crit ~ B_simple`` (McCandlish et al. 2018), with a block-bootstrap interval?

Caveat common to every test across steps: consecutive training steps are not independent
(EMA-smoothed estimators such as ``noise_scale`` even less so), so a p-value that treats steps as
independent is optimistic. The verdicts report the lag-1 autocorrelation next to the p-value, and
the bootstrap resamples blocks of consecutive steps (circular block bootstrap) for that reason.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from gradlens.report.layer_names import layer_order, short_labels, short_layer_name
from gradlens.report.noise_verdicts import (
    critical_batch_size_verdict,
    norm_gain_layers,
    norm_gns_verdict,
)
from gradlens.report.ranking import bootstrap_indices, layer_ranking, rank_order
from gradlens.report.ranking import step_counts as _counts
from gradlens.report.summary import verdict_figures
from gradlens.report.verdict_base import (
    ANSWERS,
    Verdict,
    estimator_family,
    layer_roles,
    missing_reason,
    select_run,
    wide_table,
)
from gradlens.report.verdict_base import ROLE_ORDER as _ROLE_ORDER
from gradlens.report.verdict_base import fmt as _fmt
from gradlens.report.verdict_base import fmt_p as _fmt_p
from gradlens.schema import GLOBAL, STATS, VARIANCE_ESTIMATORS
from gradlens.stats.noise_scale import lag1_autocorrelation

__all__ = [
    "ANSWERS",
    "SPREAD_STATS",
    "Verdict",
    "bootstrap_indices",
    "column_spread_verdict",
    "compute_verdicts",
    "critical_batch_size_verdict",
    "instability_verdict",
    "layer_order",
    "layer_ranking",
    "layer_roles",
    "missing_reason",
    "norm_gain_layers",
    "norm_gns_verdict",
    "not_computable_line",
    "output_highest_verdict",
    "role_spread_table",
    "select_run",
    "short_labels",
    "short_layer_name",
    "spike_layers",
    "verdict_figures",
    "verdicts_table",
    "wide_table",
]

SPREAD_STATS = tuple(s.name for s in STATS.values() if s.category == "columns")
_MAX_CHUNK = 4_000_000  # elements per bootstrap chunk (bounds memory on long runs)


# --------------------------------------------------------------------------- table helpers


# --------------------------------------------------------------------------- bootstrap


def _boot_medians(x: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Median of all finite entries of ``x`` (steps x layers) per bootstrap replicate.

    A replicate repeats step ``s`` ``counts[b, s]`` times; its median is the weighted median of
    the pooled values (lower median), found from one sort of the values and a cumulative sum.
    """
    steps, cols = np.nonzero(np.isfinite(x))
    vals = x[steps, cols]
    if vals.size == 0:
        return np.full(counts.shape[0], np.nan)
    order = np.argsort(vals, kind="stable")
    vals, steps = vals[order], steps[order]
    out = np.empty(counts.shape[0])
    chunk = max(1, _MAX_CHUNK // vals.size)
    for lo in range(0, counts.shape[0], chunk):
        w = counts[lo:lo + chunk][:, steps]
        cw = np.cumsum(w, axis=1)
        half = cw[:, -1:] / 2.0
        pos = np.argmax(cw >= half, axis=1)
        out[lo:lo + chunk] = vals[pos]
    return out


# --------------------------------------------------------------------------- question 1


def _all_nan(one: pd.DataFrame, stat: str) -> bool:
    """``stat`` has rows, and not one finite value."""
    if one.empty:
        return False
    values = one.loc[one["stat"] == stat, "value"].to_numpy(dtype=float)
    return values.size > 0 and not np.isfinite(values).any()


def _all_nan_reason(one: pd.DataFrame, stat: str) -> str:
    rows = one[one["stat"] == stat]
    return (f"every {stat} value is NaN ({len(rows)} rows over {rows['step'].nunique()} steps): "
            "the lens recorded the statistic but could not compute it at any step (see the "
            "run's events and warnings for the reason, e.g. unequal micro-batches or "
            "non-finite gradients)")


def _rank_biserial(d: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation ``(W+ - W-) / (W+ + W-)``, zeros dropped."""
    d = d[d != 0]
    if d.size == 0:
        return math.nan
    r = sps.rankdata(np.abs(d))
    return float((r[d > 0].sum() - r[d < 0].sum()) / r.sum())


def output_highest_verdict(
    df: pd.DataFrame,
    estimator: str,
    *,
    meta: Mapping[str, Any] | None = None,
    run: str | None = None,
    alpha: float = 0.05,
    min_steps: int = 5,
) -> Verdict:
    """Is the output layer's ``estimator`` the highest of all layers?

    Per step ``t`` with a finite output value and at least one other finite layer:

    - ``rank_t`` = 1 + number of other layers with a value >= the output's (ties count against
      the output); the output *ranks first* when ``rank_t == 1``;
    - ``d_t = log(output_t / max_other_t)`` where both are positive (two-batch estimates can be
      negative at a single step; such steps count for the rank but not for the test).

    Numbers: ``fraction_first``, ``median_rank``, a Wilcoxon signed-rank test of ``d_t`` against
    0 (``p_value``: one-sided, H1 "the output exceeds every other layer"; ``p_less`` the other
    side; ``p_two_sided``), the median ``d`` and its ratio ``exp(median d)``, the matched-pairs
    rank-biserial correlation (+1: output above the rest at every step), the steps used, the
    layer most often largest among the others (``runner_up``) and the lag-1 autocorrelation of
    ``d`` (p-values assume independent steps; large autocorrelation makes them optimistic).

    The output's place in the layer ranking (:func:`gradlens.report.ranking.rank_order`: the
    median over steps of ``rank_t``, the same computation as the report's ranking) is
    ``overall_rank``, the ranking's leader ``ranked_first``.

    Answer: ``yes`` when the output is first in the ranking, ranks first at more than half of
    the steps and ``p_value < alpha``; ``no`` when it is not first in the ranking (so it ranks
    first at no more than half of the steps) and ``p_less < alpha``; ``cannot tell`` otherwise;
    ``not computable`` when the estimator, the output layer or enough steps (``min_steps``) are
    missing, or when the output equals the largest other layer at every step (constant input:
    the signed-rank test has no non-zero difference). Raw (not size-fair) estimators are flagged: they grow with the tensor size.
    """
    one = select_run(df, run)
    info = STATS.get(estimator)
    size_fair = bool(info.size_fair) if info else False
    fair = "size-fair" if size_fair else "raw, not size-fair"
    question = f"Is the output layer's {estimator} ({fair}) the highest of all layers?"
    base: dict[str, Any] = {"estimator": estimator, "size_fair": size_fair}
    mk = dict(kind="output_highest", stat=estimator, run=run)
    raw_note = ("" if size_fair else " Raw estimator: it grows with the number of entries, so "
                "it favours big tensors such as lm_head; prefer the size-fair estimators.")

    wide = wide_table(one, estimator)
    if (wide.empty or wide.notna().sum().sum() == 0) and _all_nan(one, estimator):
        return Verdict(question, "not computable", base, _all_nan_reason(one, estimator), **mk)
    if wide.empty:
        return Verdict(question, "not computable", base, missing_reason(estimator, one, meta), **mk)
    roles = layer_roles(one)
    outs = [c for c in wide.columns if roles.get(c) == "output"]
    others = [c for c in wide.columns if roles.get(c) != "output"]
    if not outs:
        return Verdict(question, "not computable", base,
                       f"no layer with role 'output' has {estimator} rows (output layer not "
                       "tracked, or its role overridden)", **mk)
    if not others:
        return Verdict(question, "not computable", base,
                       f"only the output layer has {estimator} rows: nothing to compare", **mk)
    out = wide[outs].max(axis=1)
    oth = wide[others]
    max_other = oth.max(axis=1)
    valid = out.notna() & max_other.notna()
    n = int(valid.sum())
    base.update(output_layer=outs[0] if len(outs) == 1 else ",".join(outs),
                n_layers=len(wide.columns), n_steps=n)
    if n < min_steps:
        return Verdict(question, "not computable", base,
                       f"only {n} step(s) with {estimator} for the output and another layer; "
                       f"need >= {min_steps}", **mk)
    steps = wide.index[valid]
    o, m = out[valid].to_numpy(), max_other[valid].to_numpy()
    ov = oth.loc[valid].to_numpy()
    rank = 1 + (ov >= o[:, None]).sum(axis=1)
    first = rank == 1
    runner = oth.loc[valid].idxmax(axis=1).value_counts()
    pos = (o > 0) & (m > 0)
    d = np.log(o[pos] / m[pos])
    base.update(
        first_step=int(steps.min()), last_step=int(steps.max()),
        steps_first=int(first.sum()), fraction_first=float(first.mean()),
        median_rank=float(np.median(rank)), runner_up=str(runner.index[0]),
        n_test_steps=int(d.size),
    )
    if meta and isinstance(meta.get("layers"), Sequence):
        numel = {x.get("name"): x.get("numel") for x in meta["layers"] if isinstance(x, Mapping)}
        tot = sum(v for k, v in numel.items() if k in wide.columns and isinstance(v, (int, float)))
        on = sum(numel.get(c) or 0 for c in outs)
        if tot and on:
            base["output_numel_share"] = on / tot
    labels = short_labels(wide.columns)
    order = rank_order(wide)  # the ranking's own computation: the two cannot disagree
    overall = int(order.loc[order["layer"].isin(outs), "rank"].min())
    leader = str(order["layer"].iloc[0])
    base.update(overall_rank=overall, ranked_first=leader)
    where = f"steps {base['first_step']}..{base['last_step']} (n={n})"
    head = (f"{labels[outs[0]]} ranks first at {first.sum()}/{n} steps "
            f"({100 * first.mean():.0f}%), median rank {np.median(rank):g} of {len(wide.columns)}"
            f"; in the ranking (median per-step rank) it is {overall} of {len(order)}"
            + ("" if overall == 1 else f", behind {labels[leader]}"))

    if d.size >= min_steps and not np.any(d != 0):  # scipy would divide by zero
        base.update(p_value=math.nan, p_less=math.nan, p_two_sided=math.nan)
        return Verdict(question, "not computable", base,
                       f"{head}; the output's {estimator} equals the largest other layer's at "
                       f"each of the {d.size} steps (constant input: every log ratio is 0), so "
                       f"the signed-rank test has nothing to rank, over {where}.{raw_note}",
                       **mk)
    if d.size < min_steps:
        base.update(p_value=math.nan, p_less=math.nan, p_two_sided=math.nan)
        return Verdict(question, "cannot tell", base,
                       f"{head}; only {d.size} step(s) with positive values for the log-ratio "
                       f"test (need >= {min_steps}), over {where}.{raw_note}", **mk)
    p_g = float(sps.wilcoxon(d, alternative="greater").pvalue)
    p_l = float(sps.wilcoxon(d, alternative="less").pvalue)
    res = sps.wilcoxon(d)
    med = float(np.median(d))
    ac = lag1_autocorrelation(d)
    base.update(
        median_log_ratio=med, median_ratio=math.exp(med), rank_biserial=_rank_biserial(d),
        wilcoxon_W=float(res.statistic), p_value=p_g, p_less=p_l, p_two_sided=float(res.pvalue),
        lag1_autocorr=ac,
    )
    frac = float(first.mean())
    if overall == 1 and frac > 0.5 and p_g < alpha:
        answer = "yes"
    elif overall > 1 and p_l < alpha:  # not first in the ranking: at most half the steps
        answer = "no"
    else:
        answer = "cannot tell"
    reason = (f"{head}; output / largest other (most often {labels[str(runner.index[0])]}): "
              f"median x{_fmt(math.exp(med))}, rank-biserial {_fmt(base['rank_biserial'], 2)}; "
              f"Wilcoxon signed-rank on log ratio: one-sided p = {_fmt_p(p_g)} "
              f"(output higher), p = {_fmt_p(p_l)} (output lower), over {where}.")
    if overall == 1 and frac <= 0.5 and p_l < alpha:
        reason += (" It leads the ranking yet is the largest at no more than half of the "
                   "steps: no one layer is above it consistently, a different one each step.")
    if math.isfinite(ac) and ac > 0.5:
        reason += f" Steps are autocorrelated (lag-1 r = {ac:.2f}): p-values are optimistic."
    return Verdict(question, answer, base, reason + raw_note, **mk)


# --------------------------------------------------------------------------- question 2


def role_spread_table(
    df: pd.DataFrame,
    stat: str,
    *,
    run: str | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    block: int | str | None = "auto",
) -> pd.DataFrame:
    """Per role: median of ``stat`` over every (layer, step) value, with a bootstrap CI.

    The CI resamples steps (circular block bootstrap, seeded) and takes the median of the pooled
    values of the role's layers at the resampled steps; percentile bounds.
    Columns ``role, median, ci_low, ci_high, n_layers, n_values`` (roles in the order embedding,
    hidden, vector, output).
    """
    cols = ["role", "median", "ci_low", "ci_high", "n_layers", "n_values"]
    one = select_run(df, run)
    wide = wide_table(one, stat)
    if wide.empty:
        return pd.DataFrame(columns=cols)
    wide = wide.loc[:, wide.notna().any()]
    roles = layer_roles(one)
    counts = _counts(bootstrap_indices(len(wide), n_boot, seed, block), len(wide))
    a = (1.0 - ci) / 2.0
    rows = []
    for role in sorted({roles.get(c, "") for c in wide.columns},
                       key=lambda r: (_ROLE_ORDER.get(r, 9), r)):
        x = wide[[c for c in wide.columns if roles.get(c, "") == role]].to_numpy()
        vals = x[np.isfinite(x)]
        if vals.size == 0:
            continue
        meds = _boot_medians(x, counts)
        rows.append(dict(role=role, median=float(np.median(vals)),
                         ci_low=float(np.nanquantile(meds, a)),
                         ci_high=float(np.nanquantile(meds, 1 - a)),
                         n_layers=int(x.shape[1]), n_values=int(vals.size)))
    return pd.DataFrame(rows, columns=cols)


def _per_layer_medians(one: pd.DataFrame, stat: str) -> dict[str, list[float]]:
    """Kruskal-Wallis samples: each layer's median over steps, grouped by role."""
    wide = wide_table(one, stat)
    roles = layer_roles(one)
    groups: dict[str, list[float]] = {}
    for c in wide.columns:
        med = wide[c].median()
        if np.isfinite(med):
            groups.setdefault(roles.get(c, ""), []).append(float(med))
    return dict(sorted(groups.items(), key=lambda kv: (_ROLE_ORDER.get(kv[0], 9), kv[0])))


def column_spread_verdict(
    df: pd.DataFrame,
    stat: str = "unit_rms_cv",
    *,
    run: str | None = None,
    alpha: float = 0.05,
    n_boot: int = 1000,
    seed: int = 0,
    min_layers: int = 5,
    min_steps: int = 5,
) -> Verdict:
    """How spread are the per-unit gradient RMS values, per role, and do roles differ?

    ``stat`` is one of the ``columns`` family: ``unit_rms_*`` summarizes the vector of per-unit
    RMS values along SCALE's normalization axis (one per output row of a Linear, one per feature
    of the embedding), ``fan_rms_*`` the other axis; ``cv`` = std/mean, ``max_min``, ``p99_p50``,
    ``gini``. Per role: median and bootstrap CI (:func:`role_spread_table`). Across roles:

    - when every role has >= ``min_layers`` layers, a Kruskal-Wallis H test whose samples are
      the layers (each layer's median over steps), so steps of one layer are not counted as
      independent observations; effect size epsilon^2 = H / (n - 1);
    - otherwise (a language model has one embedding and one output layer: no test with layers
      as samples can ever reject), a repeated-measures test whose blocks are the steps: each
      role's value at a step is the median over its layers, compared across roles by a
      Friedman test (a Wilcoxon signed-rank test for two roles); effect size Kendall's
      W = chi^2 / (n (k - 1)) (the rank-biserial correlation for two roles). It asks whether
      *these* layers differ, and its p-value assumes independent steps (the lag-1
      autocorrelation of the role contrast is reported).

    Answer: ``yes`` (roles differ) when the test's p < ``alpha``; ``no`` otherwise;
    ``cannot tell`` when fewer than two roles have values or fewer than ``min_steps`` steps
    have all of them; ``not computable`` when the statistic is absent or the values the test
    would rank are all identical (constant input, where the test statistic is 0 / 0).
    """
    one = select_run(df, run)
    question = f"How spread are column norms per role ({stat}), and do roles differ?"
    mk = dict(kind="column_spread", stat=stat, run=run)
    table = role_spread_table(one, stat, n_boot=n_boot, seed=seed)
    if table.empty and _all_nan(one, stat):
        return Verdict(question, "not computable", {"stat": stat}, _all_nan_reason(one, stat),
                       **mk)
    if table.empty:
        return Verdict(question, "not computable", {"stat": stat},
                       f"no {stat} rows: column-norm spread needs the standard or full preset "
                       "(and 2-D gradients)", **mk)
    numbers: dict[str, Any] = {"stat": stat}
    for r in table.itertuples(index=False):
        numbers.update({f"{r.role}.median": r.median, f"{r.role}.ci_low": r.ci_low,
                        f"{r.role}.ci_high": r.ci_high, f"{r.role}.n_layers": r.n_layers})
    desc = "; ".join(f"{r.role} {_fmt(r.median)} [{_fmt(r.ci_low)}, {_fmt(r.ci_high)}]"
                     for r in table.itertuples(index=False))
    top = table.sort_values("median", ascending=False).iloc[0]
    summary = f"median (95% CI) per role: {desc}; most spread: {top['role']}"
    groups = _per_layer_medians(one, stat)
    if len(groups) < 2:
        return Verdict(question, "cannot tell", numbers,
                       f"{summary}; only one role has values, nothing to compare", **mk)
    samples = list(groups.values())
    n = sum(len(s) for s in samples)
    pooled = np.concatenate([np.asarray(x, dtype=float) for x in samples])
    constant = bool(np.ptp(pooled) == 0)
    if constant:  # identical values have no ranks: scipy would divide by zero
        h, p = math.nan, math.nan
    else:
        h, p = sps.kruskal(*samples)
    h, p = float(h), float(p)
    numbers.update(kruskal_H=h, p_value=p, n_layers=n, n_roles=len(samples),
                   epsilon_sq=h / (n - 1) if n > 1 and math.isfinite(h) else math.nan)
    smallest = min(groups, key=lambda k: len(groups[k]))
    test = f"Kruskal-Wallis across roles (layers as samples) H = {_fmt(h)}, p = {_fmt_p(p)}"
    if min(len(s) for s in samples) >= min_layers:
        if constant:
            return Verdict(question, "not computable", numbers,
                           f"{summary}; every layer's median of {stat} is {_fmt(pooled[0])}: "
                           "identical values cannot be ranked, so no test across roles "
                           "applies (constant input)", **mk)
        answer = "yes" if math.isfinite(p) and p < alpha else "no"
        numbers["test"] = "kruskal"
        return Verdict(question, answer, numbers, f"{summary}. {test}.", **mk)
    test += f" (only {len(groups[smallest])} layer(s) in role {smallest!r}: not the test used)"
    per_step = _per_step_role_medians(one, stat, list(groups))
    if len(per_step) < min_steps:
        return Verdict(question, "cannot tell", numbers,
                       f"{summary}. {test}; only {len(per_step)} step(s) with a value for "
                       f"every role (need >= {min_steps}) for the per-step test.", **mk)
    x = per_step.to_numpy()
    n_steps, k = x.shape
    if bool(np.all(np.ptp(x, axis=1) == 0)):  # every step a tie: scipy would divide by zero
        numbers.update(n_steps=n_steps)
        return Verdict(question, "not computable", numbers,
                       f"{summary}. {test}; at each of the {n_steps} steps every role has the "
                       f"same median of {stat}: tied values cannot be ranked, so the per-step "
                       "test does not apply (constant input).", **mk)
    if k == 2:
        d = x[:, 0] - x[:, 1]
        p_s = float(sps.wilcoxon(d).pvalue)  # some d != 0: the all-tie case returned above
        effect, effect_name, stat_txt = _rank_biserial(d), "rank-biserial", "Wilcoxon signed-rank"
    else:
        chi2, p_s = sps.friedmanchisquare(*x.T)
        effect = float(chi2) / (n_steps * (k - 1))
        effect_name, stat_txt = "Kendall's W", f"Friedman chi2 = {_fmt(float(chi2))},"
    ac = lag1_autocorrelation(x[:, 0] - np.median(x[:, 1:], axis=1))
    numbers.update(test="friedman" if k > 2 else "wilcoxon", p_steps=float(p_s),
                   effect=effect, n_steps=n_steps, lag1_autocorr=ac)
    answer = "yes" if p_s < alpha else "no"
    reason = (f"{summary}. Per step, each role's median over its layers ({n_steps} steps): "
              f"{stat_txt} p = {_fmt_p(p_s)}, {effect_name} {_fmt(effect, 2)}. {test}.")
    if math.isfinite(ac) and ac > 0.5:
        reason += f" Steps are autocorrelated (lag-1 r = {ac:.2f}): p-values are optimistic."
    return Verdict(question, answer, numbers, reason, **mk)


def _per_step_role_medians(one: pd.DataFrame, stat: str, roles_used: list[str]) -> pd.DataFrame:
    """Steps x roles: each role's median over its layers at that step (steps where every role
    has a finite value)."""
    wide = wide_table(one, stat)
    roles = layer_roles(one)
    cols = {}
    for role in roles_used:
        members = [c for c in wide.columns if roles.get(c, "") == role]
        cols[role] = wide[members].median(axis=1, skipna=True)
    table = pd.DataFrame(cols)
    return table[np.isfinite(table.to_numpy()).all(axis=1)]


# --------------------------------------------------------------------------- question 3


def spike_layers(value: Any) -> list[str]:
    """The ``layers`` field of a spike row as a list (list, tuple, JSON or comma-separated)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(v) for v in value]
    s = str(value).strip()
    if not s:
        return []
    if s.startswith("["):
        try:
            return [str(v) for v in json.loads(s)]
        except ValueError:
            pass
    return [p.strip() for p in re.split(r"[;,]", s) if p.strip()]


def instability_verdict(
    spikes: pd.DataFrame | None,
    df: pd.DataFrame | None = None,
    *,
    run: str | None = None,
    top: int = 5,
) -> Verdict:
    """Was training unstable? Spike events, non-finite gradient entries, skipped steps.

    Numbers: ``n_spikes``, ``n_spike_steps``, ``first_step``/``last_step`` of the events, counts
    per ``kind``, ``max_score``, the layers most often implicated (a per-layer event counts its
    layer; a global event counts each layer it was attributed to), the total of
    ``nonfinite_count`` rows and the steps with any, ``skipped_step`` rows equal to 1, and
    ``n_logged_steps`` (steps of the table); with a spike guard, ``guard_skipped_steps`` and
    ``guard_damped_steps`` (steps of ``guarded_step`` events by action).
    Answer ``yes`` if anything was found, ``no`` ("no instability found") otherwise, ``not
    computable`` without a spike log and without the rows to check.
    """
    question = "Was training unstable (spikes, non-finite gradients, skipped steps)?"
    mk = dict(kind="instability", stat=None, run=run)
    sp = select_run(spikes, run) if spikes is not None else None
    one = select_run(df, run) if df is not None else None
    numbers: dict[str, Any] = {}
    if one is not None and not one.empty:
        numbers["n_logged_steps"] = int(one["step"].nunique())
    parts: list[str] = []
    found = False
    if sp is not None and not sp.empty:
        found = True
        kinds = sp["kind"].astype(str).value_counts()
        attributed: Counter[str] = Counter()
        n_global = 0
        for row in sp.itertuples(index=False):
            if str(row.layer) == GLOBAL:
                n_global += 1
                attributed.update(spike_layers(getattr(row, "layers", None)))
            else:
                attributed[str(row.layer)] += 1
        scores = pd.to_numeric(sp["score"], errors="coerce") if "score" in sp else pd.Series()
        most = attributed.most_common(top)
        labels = short_labels([k for k, _ in most])
        numbers.update(
            n_spikes=len(sp), n_spike_steps=int(sp["step"].nunique()),
            first_step=int(sp["step"].min()), last_step=int(sp["step"].max()),
            n_global=n_global,
            kinds="; ".join(f"{k}:{v}" for k, v in kinds.items()),
            top_layers="; ".join(f"{k}:{v}" for k, v in most),
            max_score=float(scores.max()) if scores.notna().any() else math.nan,
        )
        for k, v in kinds.items():
            numbers[f"kind.{k}"] = int(v)
        guarded = sp[sp["kind"].astype(str) == "guarded_step"]
        if not guarded.empty:  # the spike guard acted: a step skipped, or layers damped
            act = guarded.get("reason", pd.Series("", index=guarded.index)).astype(str)
            numbers["guard_skipped_steps"] = int(guarded.loc[act == "skip", "step"].nunique())
            numbers["guard_damped_steps"] = int(guarded.loc[act == "damp", "step"].nunique())
        parts.append(
            f"{len(sp)} spike event(s) at {sp['step'].nunique()} step(s), first at step "
            f"{numbers['first_step']}; kinds: {', '.join(f'{k} {v}' for k, v in kinds.items())}"
            + (f"; most implicated: {', '.join(f'{labels[k]} ({v})' for k, v in most)}"
               if most else "")
            + (f"; the spike guard skipped {numbers['guard_skipped_steps']} step(s) and damped "
               f"{numbers['guard_damped_steps']}" if not guarded.empty else ""))
    elif sp is not None:
        numbers.update(n_spikes=0)
    have_rows = False
    if one is not None and not one.empty:
        nf = one[one["stat"] == "nonfinite_count"]
        if not nf.empty:
            have_rows = True
            v = pd.to_numeric(nf["value"], errors="coerce").fillna(0)
            numbers.update(nonfinite_total=float(v.sum()),
                           nonfinite_steps=int(nf.loc[v > 0, "step"].nunique()))
            if v.sum() > 0:
                found = True
                first_nf = int(nf.loc[v > 0, "step"].min())
                parts.append(f"{int(v.sum())} non-finite gradient entries at "
                             f"{numbers['nonfinite_steps']} step(s), first at step {first_nf}")
        sk = one[(one["stat"] == "skipped_step") & (one["layer"] == GLOBAL)]
        if not sk.empty:
            have_rows = True
            n_sk = int((pd.to_numeric(sk["value"], errors="coerce") >= 1).sum())
            numbers["skipped_steps"] = n_sk
            if n_sk:
                found = True
                parts.append(f"{n_sk} step(s) skipped by the AMP grad scaler")
    if sp is None and not have_rows:
        return Verdict(question, "not computable", numbers,
                       "no spike log (spikes.jsonl) and no nonfinite_count/skipped_step rows",
                       **mk)
    if found:
        return Verdict(question, "yes", numbers, "; ".join(parts) + ".", **mk)
    span = ""
    if one is not None and not one.empty:
        span = f" over steps {int(one['step'].min())}..{int(one['step'].max())}"
    return Verdict(question, "no", numbers,
                   f"no instability found: no spike events, no non-finite gradient entries, "
                   f"no skipped steps{span}.", **mk)


# --------------------------------------------------------------------------- all of them


def compute_verdicts(
    df: pd.DataFrame,
    spikes: pd.DataFrame | None = None,
    meta: Mapping[str, Any] | None = None,
    *,
    run: str | None = None,
    estimators: Sequence[str] | None = None,
    spread_stats: Sequence[str] | None = None,
    alpha: float = 0.05,
    n_boot: int = 1000,
    seed: int = 0,
    min_steps: int = 5,
) -> list[Verdict]:
    """Every verdict for one run, in report order.

    One :func:`output_highest_verdict` per variance estimator of the schema (absent ones answer
    ``not computable`` with the reason), one :func:`column_spread_verdict` per column statistic
    present (a single ``not computable`` when none is), and the :func:`instability_verdict`.
    """
    one = select_run(df, run)
    label = run
    if label is None and "run" in one.columns and not one.empty:
        label = str(one["run"].iloc[0])
    out = [output_highest_verdict(one, est, meta=meta, alpha=alpha, min_steps=min_steps)
           for est in (estimators or VARIANCE_ESTIMATORS)]
    present = set(one["stat"].unique()) if not one.empty else set()
    stats = [s for s in (spread_stats or SPREAD_STATS) if s in present]
    if stats:
        out += [column_spread_verdict(one, s, alpha=alpha, n_boot=n_boot, seed=seed)
                for s in stats]
    else:
        out.append(column_spread_verdict(one, (spread_stats or SPREAD_STATS)[0]))
    sp = select_run(spikes, run) if spikes is not None else None
    out.append(instability_verdict(sp, one))
    out.append(norm_gns_verdict(one, meta=meta, alpha=alpha))
    out.append(critical_batch_size_verdict(one, meta=meta, n_boot=n_boot, seed=seed,
                                           spikes=sp))
    for v in out:
        v.run = label
    return out


def not_computable_line(verdicts: Iterable[Verdict]) -> str:
    """One sentence for every verdict that could not be computed, grouped by why:
    ``pe_trace, pe_noise_scale: needs the full preset``; empty when there is none."""
    groups: dict[str, list[str]] = {}
    for v in verdicts:
        if v.answer != "not computable":
            continue
        if v.kind == "output_highest" and v.stat and v.reason.startswith("no ") and (
                v.stat in VARIANCE_ESTIMATORS):
            why = {"twobatch": "two-batch estimators: need >= 2 micro-batches per step or >= 2 "
                               "data-parallel ranks",
                   "per_example": "per-example estimators: need preset full",
                   "temporal": "temporal estimators: need preset full"}[
                estimator_family(v.stat)]
            if "met the condition" in v.reason:
                why = "not selected, or their layers excluded, although the run met the condition"
        else:
            why = v.reason.split(";")[0].rstrip(".")
        label = str(v.stat or v.kind)
        names = groups.setdefault(why, [])
        if label not in names:
            names.append(label)
    return "; ".join(f"{', '.join(names)} ({why})" for why, names in groups.items())


def verdicts_table(verdicts: Iterable[Verdict]) -> pd.DataFrame:
    """One row per verdict: ``run, kind, stat, question, answer, reason, numbers`` (JSON)."""
    rows = [dict(run=v.run, kind=v.kind, stat=v.stat, question=v.question, answer=v.answer,
                 reason=v.reason, numbers=json.dumps(v.numbers, sort_keys=False))
            for v in verdicts]
    return pd.DataFrame(rows, columns=["run", "kind", "stat", "question", "answer", "reason",
                                       "numbers"])
