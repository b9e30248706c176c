"""Is the output layer's gradient variance the highest of all layers? One verdict per variance
estimator of the schema.

Per step, the output layer is compared with the largest of all other layers: the fraction of
steps where it ranks first, its median rank, a Wilcoxon signed-rank test of
``d_t = log(output_t / max_other_t)`` across steps, and effect sizes (median ``d``,
matched-pairs rank-biserial correlation). Its place in the layer ranking is the ranking's own
computation (:func:`gradlens.report.ranking.rank_order`), so the two never disagree.

Caveat common to every test across steps: consecutive training steps are not independent
(EMA-smoothed estimators such as ``noise_scale`` even less so), so a p-value that treats steps as
independent is optimistic; the lag-1 autocorrelation is reported next to it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from gradlens.catalog import QUESTIONS, question_estimators
from gradlens.report.layer_names import short_labels, short_layer_name
from gradlens.report.ranking import rank_order
from gradlens.report.verdict_base import (
    Verdict,
    all_nan,
    all_nan_reason,
    fmt,
    fmt_p,
    layer_roles,
    missing_reason,
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
from gradlens.schema import STATS, VARIANCE_ESTIMATORS
from gradlens.stats.noise_scale import lag1_autocorrelation

__all__ = ["KIND", "RANKING_TOP", "output_highest_verdict", "ranking_stats"]

RANKING_TOP = 5  # rows per (run, statistic) inlined in the report; the CSV has every layer


def ranking_stats() -> tuple[tuple[str, ...], ...]:
    """Per variance question (total, per entry, noise scale), the estimators answering it, in
    order of preference (two-batch, per-example, temporal; each estimator's ``question`` in
    :mod:`gradlens.catalog`, so a registered one joins): the first one a run has is the one its
    figures and plain words use."""
    return tuple(question_estimators(q) for q in QUESTIONS)


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
    if (wide.empty or wide.notna().sum().sum() == 0) and all_nan(one, estimator):
        return Verdict(question, "not computable", base, all_nan_reason(one, estimator), **mk)
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
        median_log_ratio=med, median_ratio=math.exp(med), rank_biserial=rank_biserial(d),
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
              f"median x{fmt(math.exp(med))}, rank-biserial {fmt(base['rank_biserial'], 2)}; "
              f"Wilcoxon signed-rank on log ratio: one-sided p = {fmt_p(p_g)} "
              f"(output higher), p = {fmt_p(p_l)} (output lower), over {where}.")
    if overall == 1 and frac <= 0.5 and p_l < alpha:
        reason += (" It leads the ranking yet is the largest at no more than half of the "
                   "steps: no one layer is above it consistently, a different one each step.")
    if math.isfinite(ac) and ac > 0.5:
        reason += f" Steps are autocorrelated (lag-1 r = {ac:.2f}): p-values are optimistic."
    return Verdict(question, answer, base, reason + raw_note, **mk)



# --------------------------------------------------------------------------- the kind


def _compute(data: RunData) -> list[Verdict]:
    o = data.options
    return [output_highest_verdict(data.df, est, meta=data.meta, alpha=o.get("alpha", 0.05),
                                   min_steps=o.get("min_steps", 5))
            for est in VARIANCE_ESTIMATORS]


def _figures(v: Verdict) -> SummaryFigures:
    """Matched-pairs rank-biserial of ``log(output / largest other)``, the one-sided Wilcoxon
    p-value, the fraction of steps at which the output ranks first."""
    n = v.numbers
    return SummaryFigures("rank-biserial", n.get("rank_biserial"), n.get("p_value"),
                          n.get("fraction_first"))


def first_present(groups: Sequence[Sequence[str]], present: set[str]) -> list[str]:
    """Per group of alternatives, the first statistic present."""
    return [next(s for s in g if s in present) for g in groups if any(s in present for s in g)]


def _plots(ctx: ReportContext) -> list[FigureSpec]:
    from gradlens.report import plots as P

    present = set(ctx.all_df["stat"].unique())
    figs = []
    for est in first_present(ranking_stats(), present):
        for r in ctx.runs:
            if est in set(r.df["stat"].unique()):
                figs.append(FigureSpec(
                    f"ranking_{est}_{r.slug}", "output_highest",
                    f"{r.label}: layers ranked by median per-step rank of {est} (no single "
                    "step decides), median value with 95% bootstrap CI (blocks of steps "
                    "resampled); output layer in red.",
                    lambda df=r.df, m=r.meta, s=est, key=(r.label, est):
                    P.plot_ranking(df, s, meta=m, n_boot=ctx.n_boot,
                                   ranking=ctx.rankings.get(key))))
    return figs


def _claim_table(verdicts: list[Verdict]) -> pd.DataFrame:
    """Per run and estimator kind (size-fair / raw): the estimators answering each answer."""
    from gradlens.report.verdict_base import ANSWERS

    rows = []
    for run in dict.fromkeys(v.run for v in verdicts):
        for fair in (True, False):
            vs = [v for v in verdicts if v.run == run and v.numbers.get("size_fair") is fair]
            row: dict[str, Any] = {"run": run, "estimators": "size-fair" if fair else "raw"}
            for a in ANSWERS:
                names = [str(v.stat) for v in vs if v.answer == a]
                row[a] = ", ".join(names) if a != "not computable" else len(names)
            rows.append(row)
    return pd.DataFrame(rows)


def _blocks(verdicts: list[Verdict], ctx: ReportContext) -> list[Any]:
    from gradlens.report.document import Heading, Para, Table

    out: list[Any] = []
    if verdicts:
        out += [Para("Which estimators rank the output layer highest?", bold=True),
                Table(_claim_table(verdicts))]
    rk = ctx.tables.get("rankings")
    if rk is not None and not rk.empty:
        inline = rk[((rk["rank"] <= RANKING_TOP) | (rk["role"] == "output"))
                    & (rk["stat"] != "grad_norm")].drop(columns=["layer"])
        if not inline.empty:
            out += [Heading(f"Per-layer rankings (top {RANKING_TOP} and the output layer; every "
                            "layer in rankings.csv)", 3), Table(inline)]
    return out


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _first_computed(verdicts: list[Verdict], group: Sequence[str]) -> Verdict | None:
    by = {v.stat: v for v in verdicts if "steps_first" in v.numbers and "overall_rank" in v.numbers}
    return next((by[s] for s in group if s in by), None)


def _answer(verdicts: list[Verdict]) -> Answer | None:
    """In words: where the output layer's total variance and its variance per entry stand."""
    total_ests, entry_ests, gns_ests = ranking_stats()
    total, entry = _first_computed(verdicts, total_ests), _first_computed(verdicts, entry_ests)
    gns = _first_computed(verdicts, gns_ests)
    parts = []
    if total is not None:
        n = total.numbers
        part = (f"The output layer's total variance ({total.stat}) is the largest at "
                f"{n['steps_first']} of {n['n_steps']} steps")
        if n["steps_first"] * 2 > n["n_steps"] and n.get("median_ratio") is not None:
            part += f", {n['median_ratio']:.2g}x the next (median over steps)"
        elif n.get("runner_up"):
            part += f" (the largest is most often {short_layer_name(n['runner_up'])})"
        parts.append(part)
    size_fair, what = (entry, "per entry") if entry is not None else (gns, "by noise scale")
    if size_fair is not None:
        n = size_fair.numbers
        lead = "" if n["overall_rank"] == 1 else f", behind {short_layer_name(n['ranked_first'])}"
        rank = f"{_ordinal(int(n['overall_rank']))} of {n['n_layers']} (median per-step rank)"
        parts.append(f"{what} ({size_fair.stat}) it ranks {rank}{lead}" if parts else
                     f"{what.capitalize()} ({size_fair.stat}), the output layer ranks {rank}{lead}")
    if not parts:
        missing = [v for v in verdicts if v.answer == "not computable" and v.stat in total_ests]
        if not missing:
            return None
        why = missing[0].reason
        return Answer(f"Gradient variance was not measured: {why}.",
                      "Variance needs >= 2 micro-batches per step (gradient accumulation) or "
                      ">= 2 data-parallel ranks under the standard or full preset; with one "
                      "micro-batch, the gns preset estimates the noise scale per example.")
    text = "; ".join(parts) + "."
    if size_fair is None:
        return Answer(text)
    if size_fair.numbers["overall_rank"] == 1 and size_fair.answer == "yes":
        nxt = ("The output layer is the noisiest per entry: a momentum buffer on the output "
               "layer alone (SCALE's choice) sits where the noise is.")
    elif size_fair.numbers["overall_rank"] == 1:
        nxt = ("The output layer leads the ranking per entry, but not consistently: read the "
               "momentum advice per layer before keeping momentum on the output layer alone.")
    else:
        first = short_layer_name(size_fair.numbers["ranked_first"])
        nxt = (f"The noisiest layer per entry is {first}, not the output layer: see the "
               "momentum advice for the layers a momentum buffer would help.")
    return Answer(text, nxt)


KIND = register_verdict(VerdictKind(
    name="output_highest",
    title="Does the output layer have the highest gradient variance?",
    intro="The SCALE paper puts its only momentum buffer on the output layer, where it says "
          "gradient variance is highest, without naming the estimator. Each estimator the runs "
          "recorded is checked below. Raw traces grow with the tensor size (lm_head and the "
          "embedding are the biggest matrices of a small LLaMA), so the size-fair estimators "
          "(noise scales, per-element variances, per-unit noise-to-signal) are the fair test.",
    needs=(*VARIANCE_ESTIMATORS, "microbatches"),
    compute=_compute, figures=_figures, plots=_plots, blocks=_blocks, answer=_answer, order=10,
))
