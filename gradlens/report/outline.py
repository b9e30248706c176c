"""The report's content, in order, as document blocks (:mod:`gradlens.report.document`): the
answers in plain words, the runs, the verdict table, the overview figures, one section per
registered verdict kind, the heatmaps, the momentum advice and the notes."""

from __future__ import annotations

from typing import Any

import pandas as pd

from gradlens.report.answers import answers_blocks
from gradlens.report.document import (
    Bullets,
    Details,
    Figures,
    Heading,
    Para,
    Table,
    VerdictBlock,
)
from gradlens.report.summary import SUMMARY_COLUMNS, summary_cells
from gradlens.report.verdicts import Verdict, kinds, not_computable_line
from gradlens.report.verdicts.registry import FigureSpec, ReportContext

__all__ = ["outline"]

HEATMAPS = ("Layer x step heatmaps", "Layers in model order; the output layer in red. Log colour "
            "scale where the values span decades; grey cells have no value (or a value <= 0 on "
            "a log scale). Raw variance traces are left out here: they mostly show the tensor "
            "sizes.")
MOMENTUM = ("Which layers an EMA of the gradient (momentum 0.9) would help, from each layer's "
            "noise-to-signal ratio and the noise's lag correlation "
            "(gradlens.advise.advise_momentum; mse_ratio: the EMA's squared direction error "
            "over the raw gradient's; buffer_bytes: one float32 buffer).")
NOTES = (
    "Tests across steps treat steps as independent; consecutive steps are correlated "
    "(EMA-smoothed estimators strongly), so p-values are optimistic: read them with the "
    "fractions and effect sizes. Bootstrap CIs resample blocks of consecutive steps "
    "(seeded, deterministic).",
    "Files: report.md, figures/*.png, verdicts.csv, verdicts.json, rankings.csv, "
    "role_spread.csv, spikes.csv, runs.csv, momentum.csv.",
)


def summary_table(verdicts: list[Verdict]) -> pd.DataFrame:
    """The verdicts that could be computed, one row each: run and the summary cells
    (:func:`gradlens.report.summary.summary_cells`, the plugin shows the same)."""
    rows = [{"run": v.run, **summary_cells(v)} for v in verdicts
            if v.answer != "not computable"]
    return pd.DataFrame(rows, columns=["run", *SUMMARY_COLUMNS])


def _not_computable(verdicts: list[Verdict], runs: list[str | None]) -> str:
    """One line: per run, the verdicts that could not be computed, grouped by why."""
    parts = []
    for r in runs:
        line = not_computable_line(v for v in verdicts if v.run == r)
        if line:
            parts.append(f"{r}: {line}" if len(runs) > 1 else line)
    return ("Not computable: " + " | ".join(parts) + ".") if parts else ""


def _section(figs: list[FigureSpec], key: str) -> Figures:
    return Figures([f for f in figs if f.section == key])


def outline(ctx: ReportContext, verdicts: list[Verdict], figs: list[FigureSpec],
            problems: list[str]) -> list[Any]:
    """Every block of the report after its title."""
    labels = [r.label for r in ctx.runs]
    blocks: list[Any] = [
        Para(f"gradlens layer-wise gradient report: {len(labels)} run(s).", cls="sub"),
        *answers_blocks(verdicts, labels),
        Heading("Runs"), Table(ctx.tables["runs"]),
        Heading("Verdicts"), Table(summary_table(verdicts), badges=True),
    ]
    missing = _not_computable(verdicts, labels)
    if missing:
        blocks.append(Para(missing, cls="sub"))
    blocks += [Heading("Runs side by side"), _section(figs, "overview")]
    for k in kinds():
        vs = [v for v in verdicts if v.kind == k.name]
        blocks.append(Heading(k.title))
        if k.intro:
            blocks.append(Para(k.intro))
        if k.blocks is not None:
            blocks += k.blocks(vs, ctx)
        blocks += [VerdictBlock(v) for v in vs if v.answer != "not computable"]
        hidden = [v for v in vs if v.answer == "not computable"]
        if hidden:
            blocks.append(Details(f"Not computable for these runs ({len(hidden)})",
                                  [VerdictBlock(v) for v in hidden]))
        blocks.append(_section(figs, k.name))
    blocks += [Heading(HEATMAPS[0]), Para(HEATMAPS[1]), _section(figs, "heatmaps")]
    momentum = ctx.tables.get("momentum")
    if momentum is not None and not momentum.empty:
        blocks += [Heading("Momentum advice"), Para(MOMENTUM), Table(momentum)]
    blocks += [Heading("Notes"), Bullets(list(NOTES), problems=problems)]
    return blocks
