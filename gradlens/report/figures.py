"""The report's figures: which to draw (the overview, each verdict kind's own, the heatmaps) and
drawing them to PNG. A figure that fails to draw is listed with its error; the report goes on.
"""

from __future__ import annotations

import base64
import io
import warnings
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from gradlens.catalog import heatmap_stats
from gradlens.report.verdicts import kinds
from gradlens.report.verdicts.registry import FigureSpec, ReportContext
from gradlens.schema import GLOBAL

__all__ = ["DPI", "figure_plan", "render_figures"]

DPI = 100
# figures: a few statistics that answer the report's questions; every statistic keeps its rows in
# the CSV tables and its verdict. Heatmaps and the overview's per-kind comparisons: the
# catalog's plan (per slot, the first statistic present; a user statistic in its own slot).


def stats_of(df: pd.DataFrame) -> set[str]:
    """The statistics with per-layer rows in ``df``."""
    return set(df.loc[df["layer"] != GLOBAL, "stat"].unique())


def _overview(ctx: ReportContext) -> list[FigureSpec]:
    from gradlens.report import plots as P

    all_df = ctx.all_df
    figs = []
    if ((all_df["layer"] == GLOBAL) & (all_df["stat"] == "loss")).any():
        figs.append(FigureSpec("loss", "overview", "Training loss, one line per run.",
                               lambda: P.plot_global(all_df, "loss")))
    for stat in heatmap_stats(stats_of(all_df), [r.meta for r in ctx.runs]):
        figs.append(FigureSpec(f"compare_{stat}", "overview",
                               f"{stat} per role over steps (median over the role's layers), "
                               "one line per run.",
                               lambda s=stat: P.plot_run_comparison(all_df, s)))
    return figs


def _heatmaps(ctx: ReportContext) -> list[FigureSpec]:
    """Per heatmap statistic, one figure per run, on one colour scale shared by the runs."""
    from gradlens.report import plots as P

    layers = ctx.all_df[ctx.all_df["layer"] != GLOBAL]
    figs = []
    shared = len(ctx.runs) > 1
    for stat in heatmap_stats(stats_of(ctx.all_df), [r.meta for r in ctx.runs]):
        try:
            norm = P.heatmap_norm(layers.loc[layers["stat"] == stat, "value"])
        except ValueError:
            continue
        for r in ctx.runs:
            if stat in stats_of(r.df):
                figs.append(FigureSpec(
                    f"heatmap_{stat}_{r.slug}", "heatmaps",
                    f"{r.label}: {stat}, layer x step"
                    + (" (colour scale shared by the runs)." if shared else "."),
                    lambda df=r.df, m=r.meta, s=stat, n=norm:
                    P.plot_heatmap(df, s, meta=m, norm=n if shared else None)))
    return figs


def figure_plan(ctx: ReportContext) -> list[FigureSpec]:
    """Every figure of the report: the overview, each registered kind's, the heatmaps."""
    figs = _overview(ctx)
    for k in kinds():
        if k.plots is not None:
            figs += k.plots(ctx)
    return figs + _heatmaps(ctx)


def render_figures(figs: list[FigureSpec], out: Path, progress: bool) -> list[str]:
    """Draw each figure to ``out/figures/<key>.png`` (and base64 for the HTML); the problems."""
    problems: list[str] = []
    for f in tqdm(figs, desc="report figures", unit="fig", disable=not progress):
        try:
            fig = f.draw()
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=DPI)
        except Exception as err:  # one bad figure must not cost the whole report
            msg = f"figure {f.key!r} could not be drawn: {type(err).__name__}: {err}"
            warnings.warn(msg, stacklevel=2)
            problems.append(msg)
            continue
        data = buf.getvalue()
        f.path = out / "figures" / f"{f.key}.png"
        f.path.write_bytes(data)
        f.b64 = base64.b64encode(data).decode("ascii")
    return problems
