"""Was training unstable? Spike events, non-finite gradient entries and skipped steps, with
the layers the events implicate."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pandas as pd

from gradlens.report.layer_names import short_labels, short_layer_name
from gradlens.report.verdicts.base import Verdict, select_run, spike_layers
from gradlens.report.verdicts.registry import (
    Answer,
    FigureSpec,
    ReportContext,
    RunData,
    SummaryFigures,
    VerdictKind,
    register_verdict,
)
from gradlens.schema import GLOBAL

__all__ = ["KIND", "instability_verdict"]


def instability_verdict(
    spikes: pd.DataFrame | None,
    df: pd.DataFrame | None = None,
    *,
    run: str | None = None,
    top: int = 5,
    logged_steps: Sequence[int] | None = None,
) -> Verdict:
    """Was training unstable? Spike events, non-finite gradient entries, skipped steps.

    Numbers: ``n_spikes``, ``n_spike_steps``, ``first_step``/``last_step`` of the events, counts
    per ``kind``, ``max_score``, the layers most often implicated (a per-layer event counts its
    layer; a global event counts each layer it was attributed to), the total of
    ``nonfinite_count`` rows and the steps with any, ``skipped_step`` rows equal to 1, and
    ``n_logged_steps`` (steps of the table, or of ``logged_steps`` when ``df`` holds only the
    rows checked here); with a spike guard, ``guard_skipped_steps`` and
    ``guard_damped_steps`` (steps of ``guarded_step`` events by action).
    Answer ``yes`` if anything was found, ``no`` ("no instability found") otherwise, ``not
    computable`` without a spike log and without the rows to check.
    """
    question = "Was training unstable (spikes, non-finite gradients, skipped steps)?"
    mk = dict(kind="instability", stat=None, run=run)
    sp = select_run(spikes, run) if spikes is not None else None
    one = select_run(df, run) if df is not None else None
    numbers: dict[str, Any] = {}
    if logged_steps is None and one is not None and not one.empty:
        logged_steps = one["step"].unique()
    if logged_steps is not None and len(logged_steps):
        numbers["n_logged_steps"] = len(set(logged_steps))
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
    if logged_steps is not None and len(logged_steps):
        span = f" over steps {int(min(logged_steps))}..{int(max(logged_steps))}"
    return Verdict(question, "no", numbers,
                   f"no instability found: no spike events, no non-finite gradient entries, "
                   f"no skipped steps{span}.", **mk)



# --------------------------------------------------------------------------- the kind


def _compute(data: RunData) -> list[Verdict]:
    return [instability_verdict(data.spikes, data.df, logged_steps=data.steps)]


def _figures(v: Verdict) -> SummaryFigures:
    """The fraction of logged steps with a spike event (``n_spike_steps`` over
    ``n_logged_steps``) when both are known."""
    steps, total = v.numbers.get("n_spike_steps"), v.numbers.get("n_logged_steps")
    if isinstance(steps, (int, float)) and isinstance(total, (int, float)) and total > 0:
        return SummaryFigures(fraction_steps=steps / total)
    return SummaryFigures()


def _plots(ctx: ReportContext) -> list[FigureSpec]:
    from gradlens.report import plots as P

    return [FigureSpec(f"spikes_{r.slug}", "instability",
                       f"{r.label}: spike events by kind; global events annotated with the "
                       "layers they were attributed to.",
                       lambda df=r.df, sp=r.spikes: P.plot_spike_timeline(sp, df))
            for r in ctx.runs]


def _blocks(verdicts: list[Verdict], ctx: ReportContext) -> list[Any]:
    from gradlens.report.document import Table

    t = ctx.tables.get("spikes")
    return [Table(t)] if t is not None and not t.empty else []


def _answer(verdicts: list[Verdict]) -> Answer | None:
    """In words: where training went unstable and which layer the events implicate most."""
    v = verdicts[0] if verdicts else None
    if v is None or v.answer == "not computable":
        return None
    n = v.numbers
    if v.answer == "no":
        return Answer("No instability: " + v.reason.removeprefix("no instability found: "))
    found = []
    if n.get("n_spikes"):
        found.append(f"{n['n_spikes']} spike event(s) at {n['n_spike_steps']} of "
                     f"{n.get('n_logged_steps', '?')} logged steps, first at step "
                     f"{n['first_step']}")
    if n.get("nonfinite_total"):
        found.append(f"{int(n['nonfinite_total'])} non-finite gradient entries at "
                     f"{n['nonfinite_steps']} step(s)")
    if n.get("skipped_steps"):
        found.append(f"{n['skipped_steps']} step(s) skipped by the AMP grad scaler")
    top = [p.rpartition(":")[0] for p in str(n.get("top_layers") or "").split("; ") if p]
    where = f"; the layer implicated most: {short_layer_name(top[0])}" if top else ""
    at = f"step {n['first_step']}" if n.get("first_step") is not None else "the first unstable step"
    nxt = (f"Look at {at} in the heatmaps and the spike timeline"
           + (f" ({short_layer_name(top[0])} first)" if top else "")
           + "; if spikes recur, lower the learning rate or clip the gradient there, or let "
           "the spike guard skip or damp such steps.")
    return Answer("Training went unstable: " + "; ".join(found) + where + ".", nxt)


KIND = register_verdict(VerdictKind(
    name="instability",
    title="Instability",
    needs=("nonfinite_count", "skipped_step"),
    compute=_compute, figures=_figures, plots=_plots, blocks=_blocks, answer=_answer, order=30,
))
