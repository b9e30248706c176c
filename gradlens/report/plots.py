"""Figures of the layer-wise report: DataFrame in, matplotlib Figure out.

Every function takes the long table (``step, layer, role, stat, value``, plus ``run`` when
several runs are mixed) or the spike table, and returns a :class:`matplotlib.figure.Figure`
drawn on the Agg canvas. Nothing touches pyplot's global state: no window opens, nothing needs
closing, and the figures are safe to build in a loop (``fig.savefig`` writes them).

- :func:`plot_heatmap`: layer x step heatmap of one statistic, layers in model order with short
  labels (``L0.attn.q``, ``lm_head``, ``embed``), every row labelled up to 160 layers; colour
  scale from :func:`heatmap_norm` (log when positive values span decades, symmetric log when
  signed values are heavy-tailed), which the report shares across runs.
- :func:`plot_ranking`: layers ranked by their median per-step rank, bootstrap CIs, output
  highlighted.
- :func:`plot_spike_timeline`: spike events vs step by kind, global events annotated with the
  layers they were attributed to, above them the loss when the table has it.
- :func:`plot_run_comparison`: a statistic per role over steps, one line per run.
- :func:`plot_global`: a run-level statistic (``loss``) over steps, one line per run.
- :func:`plot_role_spread`: per-layer values of a column-spread statistic by role.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ParamSpec

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from gradlens.kinds import KIND_COLORS, KINDS, with_kinds
from gradlens.report.layer_names import layer_order, short_labels
from gradlens.report.ranking import layer_ranking
from gradlens.report.scales import heatmap_norm, scale_name, spans_decades
from gradlens.report.verdicts.base import layer_roles, select_run, spike_layers, wide_table
from gradlens.schema import GLOBAL, SPIKE_KINDS, STATS

__all__ = [
    "ROLE_COLORS",
    "heatmap_norm",
    "new_figure",
    "plot_global",
    "plot_heatmap",
    "plot_ranking",
    "plot_role_spread",
    "plot_run_comparison",
    "plot_spike_timeline",
    "run_palette",
    "spans_decades",
]

ROLE_COLORS = KIND_COLORS  # one colour per kind, everywhere (gradlens.kinds)
OUTPUT_COLOR = ROLE_COLORS["output"]
MISSING_COLOR = "#d9d9d9"
_ROLE_ORDER = KINDS

P = ParamSpec("P")


def _styled(fn: Callable[P, Figure]) -> Callable[P, Figure]:
    """Draw inside seaborn's ``whitegrid`` style and a compact plotting context."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Figure:
        with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.8):
            return fn(*args, **kwargs)

    return wrapper


def new_figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    """A Figure on the Agg canvas (no pyplot, nothing to close)."""
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _stat_note(stat: str) -> str:
    info = STATS.get(stat)
    if info is not None and info.category == "variance" and not info.size_fair:
        return " (raw: favours big tensors)"
    return ""


def _run_label(df: pd.DataFrame, run: str | None) -> str:
    if run is not None:
        return f" - {run}"
    if "run" in df.columns and df["run"].nunique() == 1:
        return f" - {df['run'].iloc[0]}"
    return ""


def _stride(n: int, most: int) -> int:
    """Label every k-th row/column so that at most ``most`` labels show."""
    return max(1, -(-n // most))


def _highlight_output(labels: Sequence[Any], output_labels: set[str]) -> None:
    for t in labels:
        if t.get_text() in output_labels:
            t.set_color(OUTPUT_COLOR)
            t.set_fontweight("bold")


@_styled
def plot_heatmap(
    df: pd.DataFrame,
    stat: str,
    *,
    run: str | None = None,
    meta: Mapping[str, Any] | None = None,
    log: bool | None = None,
    norm: Normalize | None = None,
    cmap: str = "viridis",
    title: str | None = None,
) -> Figure:
    """Layer x step heatmap of ``stat`` for one run.

    Rows are layers in model order (``meta["layers"]`` when given), labelled shortly (every row
    up to 160 layers), the output layer in red; columns are the logged steps. The colour scale is
    ``norm`` when given (the report passes one shared by every run), else
    :func:`heatmap_norm` of this run's values (``log`` as there). Missing and non-finite entries
    (and values <= 0 on a log scale) are shown in light grey. The plotted matrix is
    ``fig.axes[0].collections[0]``.
    """
    one = select_run(df, run)
    wide = wide_table(one, stat)
    if wide.empty or wide.notna().sum().sum() == 0:
        raise ValueError(f"no finite values of {stat!r} to plot")
    order = layer_order(one, meta, [c for c in wide.columns if wide[c].notna().any()])
    labels = short_labels(order)
    mat = wide[order].T
    mat.index = [labels[x] for x in order]
    shared = norm is not None
    if norm is None:
        try:
            norm = heatmap_norm(mat.to_numpy(), log=log)
        except ValueError as err:
            raise ValueError(f"{stat!r}: {err}") from None
    if isinstance(norm, LogNorm):
        mat = mat.where(mat > 0)
    n_layers, n_steps = mat.shape
    fig = new_figure(12.0, 1.5 + 0.13 * n_layers)
    ax = fig.add_subplot()
    # explicit label strides: seaborn's "auto" would draw the figure once more to measure them;
    # seaborn still draws once to check for overlapping labels: do it without the layout engine
    fig.set_layout_engine("none")
    sns.heatmap(
        mat, ax=ax, cmap=cmap, norm=norm, xticklabels=_stride(n_steps, 30),
        yticklabels=_stride(n_layers, 160),
        cbar_kws={"label": stat + scale_name(norm) + (", shared across runs" if shared else ""),
                  "fraction": 0.03, "pad": 0.01},
    )
    fig.set_layout_engine("constrained")
    ax.grid(False)
    ax.set_facecolor(MISSING_COLOR)  # cells without a value (or <= 0 on a log scale)
    ax.set_xlabel("step")
    ax.set_ylabel("")
    ax.tick_params(axis="y", labelsize=7, length=0, pad=1)
    ax.tick_params(axis="x", labelsize=7)
    roles = layer_roles(one)
    _highlight_output(ax.get_yticklabels(),
                      {labels[x] for x in order if roles.get(x) == "output"})
    ax.set_title(title or f"{stat} per layer and step{_stat_note(stat)}{_run_label(one, run)}")
    return fig


@_styled
def plot_ranking(
    df: pd.DataFrame,
    stat: str,
    *,
    run: str | None = None,
    meta: Mapping[str, Any] | None = None,
    ranking: pd.DataFrame | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    top: int | None = None,
    log: bool | None = None,
    title: str | None = None,
) -> Figure:
    """Layers in ranking order (median per-step rank of ``stat``, so no single step decides),
    with bootstrap confidence intervals.

    Dots are the layers' median values over steps, horizontal bars the CI from resampling steps
    (:func:`gradlens.report.verdicts.layer_ranking`; pass ``ranking`` to reuse one). The output
    layer is red and always shown, even past ``top``. ``fig.axes[0].collections`` holds the CI
    bars (a LineCollection) and the dots (one PathCollection, one offset per layer).
    """
    if ranking is None:
        ranking = layer_ranking(df, stat, run=run, meta=meta, n_boot=n_boot, seed=seed)
    if ranking.empty:
        raise ValueError(f"no finite values of {stat!r} to rank")
    r = ranking
    if top is not None and len(r) > top:
        r = pd.concat([r.head(top), r.iloc[top:][r.iloc[top:]["role"] == "output"]])
    r = r.iloc[::-1].reset_index(drop=True)  # largest at the top
    if log is None:
        log = spans_decades(r[["median", "ci_low", "ci_high"]].to_numpy())
    fig = new_figure(7.0, 1.4 + 0.24 * len(r))
    ax = fig.add_subplot()
    y = np.arange(len(r))
    colors = [ROLE_COLORS.get(role, "#34495e") for role in r["role"]]
    ax.hlines(y, r["ci_low"], r["ci_high"], colors=colors, linewidth=2.0, alpha=0.7)
    ax.scatter(r["median"], y, c=colors, s=28, zorder=3)
    ax.set_yticks(y, r["label"])
    ax.tick_params(axis="y", labelsize=7)
    ax.set_ylim(-0.7, len(r) - 0.3)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(f"median {stat} over steps (95% bootstrap CI); order: median per-step rank")
    _highlight_output(ax.get_yticklabels(), set(r.loc[r["role"] == "output", "label"]))
    roles = [x for x in _ROLE_ORDER if x in set(r["role"])]
    ax.legend(handles=[Line2D([], [], marker="o", linestyle="", color=ROLE_COLORS[x], label=x)
                       for x in roles], loc="lower right", fontsize=7, frameon=True)
    out = ranking[ranking["role"] == "output"]
    sub = ""
    if not out.empty:
        o = out.iloc[0]
        sub = (f"\n{o['label']}: rank {int(o['rank'])} of {len(ranking)} (median per-step rank "
               f"{o['median_rank']:g}), first in "
               f"{100 * o['p_first']:.0f}% of bootstrap replicates")
    ax.set_title(title or f"Layers ranked by {stat}{_stat_note(stat)}{_run_label(df, run)}{sub}")
    return fig


def _kind_order(kinds: Sequence[str]) -> list[str]:
    known = [k for k in SPIKE_KINDS if k in kinds]
    return known + sorted(k for k in set(kinds) if k not in SPIKE_KINDS)


@_styled
def plot_spike_timeline(
    spikes: pd.DataFrame | None,
    df: pd.DataFrame | None = None,
    *,
    run: str | None = None,
    series: str = "loss",
    max_annotations: int = 12,
    title: str | None = None,
) -> Figure:
    """Spike events against the step, one lane per kind, coloured by kind.

    Global events (layer ``global``) are annotated with the short labels of the layers they were
    attributed to (the ``max_annotations`` highest scores); per-layer events carry their own
    layer. When ``df`` has the run-level ``series`` (the loss), a panel above shows it with the
    spike steps marked. Axes: 1 (events) or 2 (series, events); without events the events panel
    says so.
    """
    sp = select_run(spikes, run) if spikes is not None else pd.DataFrame()
    one = select_run(df, run) if df is not None else None
    line = None
    if one is not None and not one.empty:
        line = one[(one["stat"] == series) & (one["layer"] == GLOBAL)].sort_values("step")
        line = line if not line.empty else None
    kinds = _kind_order(list(sp["kind"].astype(str))) if not sp.empty else []
    fig = new_figure(11.0, (2.4 if line is not None else 0.0) + 1.2 + 0.45 * max(1, len(kinds)))
    if line is not None:
        top_ax, ax = fig.subplots(2, 1, sharex=True,
                                  height_ratios=[2.4, 1.2 + 0.45 * max(1, len(kinds))])
        top_ax.plot(line["step"], line["value"], color="#34495e", linewidth=1.2)
        top_ax.set_ylabel(series)
        for s in sorted(set(sp["step"])) if not sp.empty else []:
            top_ax.axvline(s, color=OUTPUT_COLOR, alpha=0.35, linewidth=1)
    else:
        ax = fig.add_subplot()
    if sp.empty:
        ax.text(0.5, 0.5, "no spike events", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
        if line is None:
            ax.set_xlim(0, 1)
    else:
        palette = dict(zip(kinds, sns.color_palette("colorblind", len(kinds)), strict=True))
        lane = {k: i for i, k in enumerate(kinds)}
        for k in kinds:
            ev = sp[sp["kind"].astype(str) == k]
            ax.scatter(ev["step"], [lane[k]] * len(ev), color=palette[k], s=40, zorder=3,
                       edgecolor="black", linewidth=0.4, label=k)
        ax.set_yticks(range(len(kinds)), kinds)
        ax.set_ylim(-0.8, len(kinds) - 0.2)
        ev = sp.copy()
        ev["names"] = [
            spike_layers(v) if str(layer) == GLOBAL else [str(layer)]
            for layer, v in zip(ev["layer"], ev.get("layers", [None] * len(ev)), strict=True)
        ]
        ev["is_global"] = ev["layer"].astype(str) == GLOBAL
        ev = ev[ev["names"].map(len) > 0]
        # global events first, then by score: what the caption promises is always shown
        ev = ev.sort_values(["is_global", "score"], ascending=False).head(max_annotations)
        labels = short_labels(sorted({n for names in ev["names"] for n in names}))
        for i, row in enumerate(ev.sort_values("step").itertuples(index=False)):
            ax.annotate(", ".join(labels[n] for n in row.names), (row.step, lane[str(row.kind)]),
                        xytext=(4, 7 + 9 * (i % 2)), textcoords="offset points", fontsize=7,
                        color="#222222" if row.is_global else "#7f8c8d",
                        fontstyle="normal" if row.is_global else "italic")
    ax.set_xlabel("step")
    where = _run_label(sp, run) if not sp.empty else ""
    fig.axes[0].set_title(title or f"Spike events ({len(sp)}){where}")
    return fig


def run_palette(runs: Sequence[str]) -> dict[str, Any]:
    """One colour per run (seaborn's ``deep`` palette, in the order given)."""
    return dict(zip(runs, sns.color_palette("deep", max(1, len(runs))), strict=False))


def _runs(df: pd.DataFrame) -> pd.DataFrame:
    if "run" in df.columns:
        return df
    return df.assign(run="run")


@_styled
def plot_run_comparison(
    df: pd.DataFrame,
    stat: str,
    *,
    roles: Sequence[str] | None = None,
    agg: str = "median",
    log: bool | None = None,
    title: str | None = None,
) -> Figure:
    """``stat`` per role over steps, one line per run (one panel per role).

    At each step the layers of a role are summarized by ``agg`` (``median``, ``mean``, ``max``).
    Log y-axis when the values are positive and span two decades (``log=None``).
    """
    d = _runs(df)
    d = with_kinds(d[(d["stat"] == stat) & (d["layer"] != GLOBAL)])
    d = d[np.isfinite(d["value"].astype(float))]
    if d.empty:
        raise ValueError(f"no finite values of {stat!r} to compare")
    present = set(d["role"].astype(str))
    roles = [r for r in (roles or _ROLE_ORDER) if r in present] or sorted(present)
    runs = list(pd.unique(d["run"]))
    g = (d[d["role"].isin(roles)].groupby(["run", "role", "step"], sort=False)["value"]
         .agg(agg).reset_index())
    if log is None:
        log = spans_decades(g["value"])
    ncols = 1 if len(roles) == 1 else 2
    nrows = -(-len(roles) // ncols)
    fig = new_figure(5.5 * ncols, 0.4 + 2.9 * nrows, layout=None)
    axes = fig.subplots(nrows, ncols, sharex=True, squeeze=False).ravel()
    for ax in axes[len(roles):]:
        fig.delaxes(ax)
    palette = run_palette(runs)
    for i, (ax, role) in enumerate(zip(axes[: len(roles)], roles, strict=True)):
        sub = g[g["role"] == role].sort_values("step")
        for name in runs:  # plain lines: seaborn's lineplot costs ~10x for the same picture
            one = sub[sub["run"] == name]
            if not one.empty:
                ax.plot(one["step"], one["value"], color=palette[name], linewidth=1.3, label=name)
        if i == 0:
            ax.legend(title="run", fontsize=7, title_fontsize=7)
        last = i + ncols >= len(roles)  # nothing below it: it carries the step axis
        ax.set_xlabel("step" if last else "")
        ax.tick_params(axis="x", labelbottom=last)
        ax.set_title(role, color=ROLE_COLORS.get(role, "black"))
        ax.set_ylabel(f"{agg} {stat}" if i == 0 else "")
        if log:
            ax.set_yscale("log")
    fig.suptitle(title or f"{stat} per role, {agg} over layers{_stat_note(stat)}")
    # fixed margins: the constrained layout engine measured every tick label (most of the time)
    h = fig.get_figheight()
    fig.subplots_adjust(left=0.09 if ncols > 1 else 0.16, right=0.98, bottom=0.5 / h,
                        top=1 - 0.7 / h, hspace=0.3, wspace=0.18)
    return fig


@_styled
def plot_global(
    df: pd.DataFrame,
    stat: str = "loss",
    *,
    log: bool | None = None,
    title: str | None = None,
) -> Figure:
    """A run-level statistic (layer ``global``, e.g. the loss) over steps, one line per run."""
    d = _runs(df)
    d = d[(d["stat"] == stat) & (d["layer"] == GLOBAL)]
    d = d[np.isfinite(d["value"].astype(float))]
    if d.empty:
        raise ValueError(f"no global rows of {stat!r}")
    if log is None:
        log = spans_decades(d["value"])
    fig = new_figure(8.0, 3.4)
    ax = fig.add_subplot()
    runs = list(pd.unique(d["run"]))
    sns.lineplot(data=d.sort_values("step"), x="step", y="value", hue="run", hue_order=runs,
                 palette=run_palette(runs), ax=ax, linewidth=1.3, errorbar=None)
    ax.set_ylabel(stat)
    if log:
        ax.set_yscale("log")
    ax.set_title(title or f"{stat} over steps")
    return fig


@_styled
def plot_role_spread(
    df: pd.DataFrame,
    stat: str = "unit_rms_cv",
    *,
    log: bool | None = None,
    title: str | None = None,
) -> Figure:
    """Each layer's median ``stat`` over steps, by role: box plots with the layers as dots.

    These per-layer medians are the samples of the Kruskal-Wallis test in
    :func:`gradlens.report.verdicts.column_spread_verdict` (used when every role has several
    layers; otherwise the verdict compares roles step by step). One box per role and run.
    """
    d = _runs(df)
    d = with_kinds(d[(d["stat"] == stat) & (d["layer"] != GLOBAL)])
    d = d[np.isfinite(d["value"].astype(float))]
    if d.empty:
        raise ValueError(f"no finite values of {stat!r}")
    med = d.groupby(["run", "role", "layer"], sort=False)["value"].median().reset_index()
    present = set(med["role"])
    order = [r for r in _ROLE_ORDER if r in present] + sorted(present - set(_ROLE_ORDER))
    runs = list(pd.unique(med["run"]))
    if log is None:
        log = spans_decades(med["value"])
    fig = new_figure(2.0 + 1.6 * len(order) * max(1, len(runs)) ** 0.5, 3.6)
    ax = fig.add_subplot()
    extra: dict[str, Any] = (dict(hue="run", hue_order=runs, palette=run_palette(runs))
                             if len(runs) > 1 else {})
    with warnings.catch_warnings():  # seaborn 0.13 passes matplotlib's deprecated `vert`
        warnings.simplefilter("ignore", DeprecationWarning)
        sns.boxplot(data=med, x="role", y="value", order=order, ax=ax, showfliers=False,
                    width=0.6, **(extra or dict(color="#d5dbdb")))
    sns.stripplot(data=med, x="role", y="value", order=order, ax=ax, dodge=bool(extra), size=4,
                  legend=False, **(extra or dict(color="#2c3e50")))
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(f"{stat} (median over steps, per layer)")
    ax.set_xlabel("")
    ax.set_title(title or f"Column-norm spread by role: {stat}")
    return fig
