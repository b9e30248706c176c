"""How spread are the per-unit gradient RMS values per role, and do roles differ? One verdict
per column statistic (the ``columns`` family: ``unit_rms_*`` on SCALE's normalization axis,
``fan_rms_*`` on the other).

Per role: the median and a bootstrap CI (circular block bootstrap of steps); across roles a
Kruskal-Wallis test with layers as samples, or, with a role of few layers, a per-step
Friedman / Wilcoxon test (see :func:`column_spread_verdict`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from gradlens.report.ranking import bootstrap_indices, step_counts
from gradlens.report.verdicts.base import (
    ROLE_ORDER,
    Verdict,
    all_nan,
    all_nan_reason,
    fmt,
    fmt_p,
    layer_roles,
    rank_biserial,
    select_run,
    wide_table,
)
from gradlens.report.verdicts.registry import (
    Answer,
    FigureSpec,
    ReportContext,
    RunData,
    SummaryFigures,
    VerdictKind,
    register_verdict,
)
from gradlens.schema import STATS
from gradlens.stats.noise_scale import lag1_autocorrelation

__all__ = ["KIND", "SPREAD_STATS", "column_spread_verdict", "role_spread_table"]

SPREAD_STATS = tuple(s.name for s in STATS.values() if s.category == "columns")
SPREAD_FIGURE_STATS = ("unit_rms_cv",)
_MAX_CHUNK = 4_000_000  # elements per bootstrap chunk (bounds memory on long runs)


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
    counts = step_counts(bootstrap_indices(len(wide), n_boot, seed, block), len(wide))
    a = (1.0 - ci) / 2.0
    rows = []
    for role in sorted({roles.get(c, "") for c in wide.columns},
                       key=lambda r: (ROLE_ORDER.get(r, 9), r)):
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
    return dict(sorted(groups.items(), key=lambda kv: (ROLE_ORDER.get(kv[0], 9), kv[0])))


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
    if table.empty and all_nan(one, stat):
        return Verdict(question, "not computable", {"stat": stat}, all_nan_reason(one, stat),
                       **mk)
    if table.empty:
        return Verdict(question, "not computable", {"stat": stat},
                       f"no {stat} rows: column-norm spread needs the standard or full preset "
                       "(and 2-D gradients)", **mk)
    numbers: dict[str, Any] = {"stat": stat}
    for r in table.itertuples(index=False):
        numbers.update({f"{r.role}.median": r.median, f"{r.role}.ci_low": r.ci_low,
                        f"{r.role}.ci_high": r.ci_high, f"{r.role}.n_layers": r.n_layers})
    desc = "; ".join(f"{r.role} {fmt(r.median)} [{fmt(r.ci_low)}, {fmt(r.ci_high)}]"
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
    test = f"Kruskal-Wallis across roles (layers as samples) H = {fmt(h)}, p = {fmt_p(p)}"
    if min(len(s) for s in samples) >= min_layers:
        if constant:
            return Verdict(question, "not computable", numbers,
                           f"{summary}; every layer's median of {stat} is {fmt(pooled[0])}: "
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
        effect, effect_name, stat_txt = rank_biserial(d), "rank-biserial", "Wilcoxon signed-rank"
    else:
        chi2, p_s = sps.friedmanchisquare(*x.T)
        effect = float(chi2) / (n_steps * (k - 1))
        effect_name, stat_txt = "Kendall's W", f"Friedman chi2 = {fmt(float(chi2))},"
    ac = lag1_autocorrelation(x[:, 0] - np.median(x[:, 1:], axis=1))
    numbers.update(test="friedman" if k > 2 else "wilcoxon", p_steps=float(p_s),
                   effect=effect, n_steps=n_steps, lag1_autocorr=ac)
    answer = "yes" if p_s < alpha else "no"
    reason = (f"{summary}. Per step, each role's median over its layers ({n_steps} steps): "
              f"{stat_txt} p = {fmt_p(p_s)}, {effect_name} {fmt(effect, 2)}. {test}.")
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



# --------------------------------------------------------------------------- the kind


def _compute(data: RunData) -> list[Verdict]:
    o = data.options
    present = set(data.df["stat"].unique())
    stats = [s for s in SPREAD_STATS if s in present]
    if not stats:  # one "not computable" with the reason
        return [column_spread_verdict(data.df, SPREAD_STATS[0])]
    return [column_spread_verdict(data.df, s, alpha=o.get("alpha", 0.05),
                                  n_boot=o.get("n_boot", 1000), seed=o.get("seed", 0))
            for s in stats]


def _figures(v: Verdict) -> SummaryFigures:
    """epsilon^2 = H / (n - 1) of the Kruskal-Wallis test (layers as samples), or, with a role
    of too few layers, the per-step test's rank-biserial / Kendall's W and its p-value."""
    n = v.numbers
    if n.get("test") == "kruskal":
        return SummaryFigures("epsilon^2", n.get("epsilon_sq"), n.get("p_value"))
    if "p_steps" in n:
        name = "Kendall's W" if n.get("test") == "friedman" else "rank-biserial"
        return SummaryFigures(name, n.get("effect"), n.get("p_steps"))
    return SummaryFigures()


def _plots(ctx: ReportContext) -> list[FigureSpec]:
    from gradlens.report import plots as P

    present = set(ctx.all_df["stat"].unique())
    return [FigureSpec(f"spread_{s}", "column_spread",
                       f"{s}: each layer's median over steps, by role and run.",
                       lambda s=s: P.plot_role_spread(ctx.all_df, s))
            for s in SPREAD_FIGURE_STATS if s in present]


def _blocks(verdicts: list[Verdict], ctx: ReportContext) -> list[Any]:
    from gradlens.report.document import Table

    t = ctx.tables.get("role_spread")
    return [Table(t)] if t is not None and not t.empty else []


def _answer(verdicts: list[Verdict]) -> Answer | None:
    """In words: which role's per-unit gradient RMS is the most spread, and whether roles
    differ (the first column statistic computed)."""
    for v in verdicts:
        meds = {k[:-len(".median")]: x for k, x in v.numbers.items()
                if k.endswith(".median") and isinstance(x, (int, float))}
        if v.answer == "not computable" or len(meds) < 2:
            continue
        top = max(meds, key=lambda k: meds[k])
        low = min(meds, key=lambda k: meds[k])
        differ = {"yes": "the roles differ", "no": "the roles do not differ detectably"}.get(
            v.answer, "whether the roles differ cannot be told")
        plural = "s" if (v.numbers.get(f"{top}.n_layers") or 0) > 1 else ""
        return Answer(f"The per-unit gradient RMS ({v.stat}) is most spread in the {top} "
                      f"layer{plural} (median {fmt(meds[top])}; least: {low} "
                      f"{fmt(meds[low])}); {differ}.")
    return None


KIND = register_verdict(VerdictKind(
    name="column_spread",
    title="Column-norm spread per role",
    intro="Spread of the per-unit gradient RMS (unit_* along SCALE's normalization axis, fan_* "
          "along the other): what column normalization equalizes.",
    needs=SPREAD_STATS,
    compute=_compute, figures=_figures, plots=_plots, blocks=_blocks, answer=_answer, order=20,
))
