"""Write the layer-wise report of one or several runs: HTML, Markdown, CSV tables, PNG figures.

``build_report(["runs/scale", "runs/adamw"], "report/")`` reads each run directory through
:mod:`gradlens.report.load`, computes the verdicts (:mod:`gradlens.report.verdicts`), draws the
figures (:mod:`gradlens.report.plots`) and writes::

    report/report.html      self-contained: figures embedded as base64 PNG, inline CSS, no JS,
                            no external reference of any kind
    report/report.md        the same content, linking figures/*.png
    report/figures/*.png
    report/verdicts.csv     one row per verdict (numbers as JSON)
    report/rankings.csv     per run and statistic: layers by median per-step rank, median
                            value and bootstrap CI
    report/role_spread.csv  per run and column statistic: per-role median and CI
    report/spikes.csv       every spike event of every run
    report/runs.csv         one row per run: directory, model, optimizer and hyperparameters,
                            batch size, learning rate per group, preset, steps
    report/momentum.csv     per run and layer: the momentum advice and its evidence
    report/verdicts.json    the verdicts with their numbers, summary cells and run directories
                            (each run directory gets a pointer to it in reports.json; the
                            TensorBoard plugin's Verdicts view reads it)

Figures failing to draw do not stop the report: they are listed in it (and in
``ReportPaths.problems``) with the error, and a warning is issued.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from gradlens.catalog import heatmap_stats
from gradlens.kinds import with_kinds
from gradlens.report import plots as P
from gradlens.report import verdicts as V
from gradlens.report.replace import replaced_dir
from gradlens.report.settings import run_settings
from gradlens.report.summary import SUMMARY_COLUMNS, register_report, summary_cells
from gradlens.schema import GLOBAL, VARIANCE_ESTIMATORS

__all__ = ["ReportPaths", "build_report"]

DPI = 100
# figures: a few statistics that answer the report's questions; every statistic keeps its rows in
# the CSV tables and its verdict. Heatmaps and rankings: per group, the first statistic present
# (the two-batch estimator, else the per-example one, else the temporal one).
COMPARE_STATS = ("grad_norm", "var_per_element", "noise_scale", "unit_rms_cv")
_TOTAL = ("twobatch_trace", "pe_trace", "temporal_var")
_PER_ENTRY = ("var_per_element", "pe_var_per_element", "temporal_var_per_element")
_GNS = ("noise_scale", "pe_noise_scale", "temporal_noise_scale")
RANKING_STATS = (_TOTAL, _PER_ENTRY, _GNS)
SPREAD_FIGURE_STATS = ("unit_rms_cv",)
N_BOOT = 1000  # bootstrap replicates of every CI (seeded: the report is deterministic)
RANKING_TOP = 5  # rows per (run, statistic) inlined in the report; the CSV has every layer


@dataclass(frozen=True)
class ReportPaths:
    """What :func:`build_report` wrote.

    Attributes:
        out_dir: the report directory.
        html: ``report.html`` (self-contained).
        markdown: ``report.md`` (links the PNGs under ``figures/``).
        figures: ``{key: path}`` of every PNG (key = file name without ``.png``).
        tables: ``{"verdicts"|"rankings"|"role_spread"|"spikes"|"runs": path}`` (CSV), and
            ``"verdicts_json"``: the verdicts with their numbers as JSON.
        problems: figures that could not be drawn, with the error (also listed in the report).
    """

    out_dir: Path
    html: Path
    markdown: Path
    figures: dict[str, Path] = field(default_factory=dict)
    tables: dict[str, Path] = field(default_factory=dict)
    problems: tuple[str, ...] = ()

    @property
    def files(self) -> list[Path]:
        """Every file written."""
        return [self.html, self.markdown, *self.figures.values(), *self.tables.values()]


@dataclass
class _Run:
    label: str
    path: Path
    meta: dict[str, Any]
    df: pd.DataFrame
    spikes: pd.DataFrame
    slug: str = ""  # the label as a file-name part, unique among the runs


@dataclass
class _Fig:
    key: str
    section: str
    caption: str
    draw: Callable[[], Figure]
    path: Path | None = None
    b64: str = ""


# --------------------------------------------------------------------------- input / output


def _load_runs(run_dirs: Sequence[str | Path]) -> list[_Run]:
    from gradlens.report.load import RunError, load_for_report, load_meta, load_spikes

    runs: list[_Run] = []
    used: set[str] = set()
    for d in run_dirs:
        path = Path(d)
        df = with_kinds(load_for_report(path))  # the loader's clear errors; thinned past max_rows
        spikes = load_spikes(path)
        try:
            meta = dict(load_meta(path))
        except RunError as err:  # the table is readable: go on without names and layer order
            warnings.warn(f"{err}; the report goes on without this run's metadata",
                          stacklevel=3)
            meta = {}
        label = str(meta.get("name") or path.resolve().name or "run")
        base, k = label, 2
        while label in used:  # two runs with the same name: keep them apart
            label, k = f"{base}-{k}", k + 1
        used.add(label)
        if spikes is None:
            spikes = pd.DataFrame(columns=["step", "layer", "kind", "value", "score", "layers"])
        runs.append(_Run(label, path, meta, df.assign(run=label), spikes.assign(run=label)))
    slugs: set[str] = set()
    for r in runs:  # "a b" and "a_b" must not write to the same figure files
        base = slug = _slug(r.label)
        k = 2
        while slug in slugs:
            slug, k = f"{base}-{k}", k + 1
        slugs.add(slug)
        r.slug = slug
    return runs


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _stats_of(df: pd.DataFrame) -> set[str]:
    return set(df.loc[df["layer"] != GLOBAL, "stat"].unique())


# --------------------------------------------------------------------------- figures


def _first_present(groups: tuple[tuple[str, ...], ...], present: set[str]) -> list[str]:
    """Per group of alternatives, the first statistic present."""
    return [next(s for s in g if s in present) for g in groups if any(s in present for s in g)]


def _figure_plan(runs: list[_Run], all_df: pd.DataFrame, n_boot: int,
                 rankings: dict[tuple[str, str], pd.DataFrame] | None = None) -> list[_Fig]:
    """The report's figures: loss, per-role comparisons, a few rankings and heatmaps (each
    heatmap statistic on one colour scale shared by every run), spreads, spike timelines."""
    figs: list[_Fig] = []
    present = _stats_of(all_df)
    rankings = rankings or {}
    if ((all_df["layer"] == GLOBAL) & (all_df["stat"] == "loss")).any():
        figs.append(_Fig("loss", "overview", "Training loss, one line per run.",
                         lambda: P.plot_global(all_df, "loss")))
    for stat in (s for s in COMPARE_STATS if s in present):
        figs.append(_Fig(f"compare_{stat}", "overview",
                         f"{stat} per role over steps (median over the role's layers), "
                         "one line per run.",
                         lambda s=stat: P.plot_run_comparison(all_df, s)))
    for est in _first_present(RANKING_STATS, present):
        for r in runs:
            if est in _stats_of(r.df):
                figs.append(_Fig(
                    f"ranking_{est}_{r.slug}", "variance",
                    f"{r.label}: layers ranked by median per-step rank of {est} (no single "
                    "step decides), median value with 95% bootstrap CI (blocks of steps "
                    "resampled); output layer in red.",
                    lambda df=r.df, m=r.meta, s=est, key=(r.label, est):
                    P.plot_ranking(df, s, meta=m, n_boot=n_boot, ranking=rankings.get(key))))
    layers = all_df[all_df["layer"] != GLOBAL]
    for stat in heatmap_stats(present, [r.meta for r in runs]):  # gradlens.catalog
        try:
            norm = P.heatmap_norm(layers.loc[layers["stat"] == stat, "value"])
        except ValueError:
            continue
        for r in runs:
            if stat in _stats_of(r.df):
                figs.append(_Fig(f"heatmap_{stat}_{r.slug}", "heatmaps",
                                 f"{r.label}: {stat}, layer x step"
                                 + (" (colour scale shared by the runs)." if len(runs) > 1
                                    else "."),
                                 lambda df=r.df, m=r.meta, s=stat, n=norm:
                                 P.plot_heatmap(df, s, meta=m, norm=n if len(runs) > 1 else None)))
    for stat in SPREAD_FIGURE_STATS:
        if stat in present:
            figs.append(_Fig(f"spread_{stat}", "spread",
                             f"{stat}: each layer's median over steps, by role and run.",
                             lambda s=stat: P.plot_role_spread(all_df, s)))
    for r in runs:
        figs.append(_Fig(f"spikes_{r.slug}", "spikes",
                         f"{r.label}: spike events by kind; global events annotated with the "
                         "layers they were attributed to.",
                         lambda df=r.df, sp=r.spikes: P.plot_spike_timeline(sp, df)))
    return figs


def _render(figs: list[_Fig], out: Path, progress: bool) -> list[str]:
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


# --------------------------------------------------------------------------- tables


def _runs_table(runs: list[_Run]) -> pd.DataFrame:
    rows = []
    for r in runs:
        steps = r.df["step"]
        rows.append(dict(
            run=r.label, directory=str(r.path), model=r.meta.get("model"),
            **run_settings(r.meta, r.df), preset=r.meta.get("preset"),
            first_step=int(steps.min()) if len(steps) else None,
            last_step=int(steps.max()) if len(steps) else None,
            layers=int(r.df.loc[r.df["layer"] != GLOBAL, "layer"].nunique()),
            stats=int(r.df["stat"].nunique()), spikes=len(r.spikes),
        ))
    return pd.DataFrame(rows)


def _momentum_table(runs: list[_Run]) -> pd.DataFrame:
    """The momentum advice of every run with the evidence for it (empty when none has)."""
    from gradlens.advise import advise_momentum, momentum_table

    parts = []
    for r in runs:
        try:
            t = momentum_table(advise_momentum(r.df, meta=r.meta))
        except ValueError:
            continue
        if not t.empty and t["noise_to_signal"].notna().any():
            parts.append(t.assign(run=r.label))
    if not parts:
        return pd.DataFrame()
    t = pd.concat(parts, ignore_index=True)
    return t[["run", *[c for c in t.columns if c != "run"]]]


def _spikes_table(runs: list[_Run]) -> pd.DataFrame:
    cols = ["run", "step", "layer", "kind", "value", "score", "layers"]
    parts = []
    for r in runs:
        if r.spikes.empty:
            continue
        sp = r.spikes.copy()
        sp["layers"] = [";".join(V.spike_layers(v)) for v in
                        sp.get("layers", pd.Series([None] * len(sp), index=sp.index))]
        parts.append(sp.reindex(columns=cols))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=cols)


def _fmt_cell(x: Any) -> str:
    if isinstance(x, float):
        return "" if pd.isna(x) else f"{x:.4g}"
    return "" if x is None else str(x)


def _html_table(df: pd.DataFrame, cls: str = "tbl") -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt_cell(v))}</td>" for v in row) + "</tr>"
        for row in df.itertuples(index=False)
    )
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _md_table(df: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        return _fmt_cell(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in df.columns) + " |",
             "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |"
              for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _badge(answer: str) -> str:
    cls = {"yes": "yes", "no": "no", "cannot tell": "maybe"}.get(answer, "na")
    return f'<span class="badge {cls}">{html.escape(answer)}</span>'


def _summary(verdicts: list[V.Verdict], runs: list[_Run]) -> pd.DataFrame:
    """The verdicts that could be computed, one row each: run and the summary cells
    (:func:`gradlens.report.summary.summary_cells`, the plugin shows the same)."""
    rows = [{"run": v.run, **summary_cells(v)} for v in verdicts
            if v.answer != "not computable"]
    return pd.DataFrame(rows, columns=["run", *SUMMARY_COLUMNS])


def _not_computable(verdicts: list[V.Verdict], runs: list[_Run]) -> str:
    """One line: per run, the verdicts that could not be computed, grouped by why."""
    parts = []
    for r in runs:
        line = V.not_computable_line(v for v in verdicts if v.run == r.label)
        if line:
            parts.append(f"{r.label}: {line}" if len(runs) > 1 else line)
    return ("Not computable: " + " | ".join(parts) + ".") if parts else ""


def _claim_table(verdicts: list[V.Verdict], runs: list[_Run]) -> pd.DataFrame:
    """Per run and estimator kind (size-fair / raw): the estimators answering each answer."""
    rows = []
    for r in runs:
        for fair in (True, False):
            vs = [v for v in verdicts if v.run == r.label and v.numbers.get("size_fair") is fair]
            row: dict[str, Any] = {"run": r.label, "estimators": "size-fair" if fair else "raw"}
            for a in V.ANSWERS:
                names = [str(v.stat) for v in vs if v.answer == a]
                row[a] = ", ".join(names) if a != "not computable" else len(names)
            rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- documents

_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1180px;color:#1c2833;line-height:1.45;padding:0 16px}
h1{margin-bottom:4px}h2{border-bottom:2px solid #d5d8dc;padding-bottom:4px;margin-top:36px}
.sub{color:#566573;margin-top:0}
table.tbl{border-collapse:collapse;font-size:13px;margin:8px 0 16px}
table.tbl th,table.tbl td{border:1px solid #d5d8dc;padding:3px 8px;text-align:left;
vertical-align:top}
table.tbl th{background:#eaf2f8}
.badge{display:inline-block;padding:1px 8px;border-radius:9px;font-size:12px;font-weight:600}
.yes{background:#d4efdf;color:#145a32}.no{background:#d6eaf8;color:#1b4f72}
.maybe{background:#fcf3cf;color:#7d6608}.na{background:#e5e7e9;color:#4d5656}
figure{margin:14px 0 26px}figure img{max-width:100%;border:1px solid #eaecee}
figcaption{font-size:13px;color:#566573}
.verdict{border-left:4px solid #aeb6bf;padding:4px 12px;margin:10px 0;background:#fbfcfc}
.verdict p{margin:4px 0}.nums{font-size:12px;color:#566573;font-family:monospace}
.problem{color:#922b21}
"""

_SECTIONS = {
    "overview": ("Runs side by side", ""),
    "variance": (
        "Does the output layer have the highest gradient variance?",
        "The SCALE paper puts its only momentum buffer on the output layer, where it says "
        "gradient variance is highest, without naming the estimator. Each estimator the runs "
        "recorded is checked below. Raw traces grow with the tensor size (lm_head and the "
        "embedding are the biggest matrices of a small LLaMA), so the size-fair estimators "
        "(noise scales, per-element variances, per-unit noise-to-signal) are the fair test.",
    ),
    "heatmaps": ("Layer x step heatmaps", "Layers in model order; the output layer in red. "
                 "Log colour scale where the values span decades; grey cells have no value "
                 "(or a value <= 0 on a log scale). Raw variance traces are left out here: "
                 "they mostly show the tensor sizes."),
    "spread": (
        "Column-norm spread per role",
        "Spread of the per-unit gradient RMS (unit_* along SCALE's normalization axis, fan_* "
        "along the other): what column normalization equalizes.",
    ),
    "spikes": ("Instability", ""),
}


def _verdict_html(v: V.Verdict) -> str:
    nums = ", ".join(f"{k}={_fmt_cell(x) if isinstance(x, float) else x}"
                     for k, x in v.numbers.items())
    return (f'<div class="verdict"><p><b>{html.escape(str(v.run))}</b>: '
            f"{html.escape(v.question)} {_badge(v.answer)}</p><p>{html.escape(v.reason)}</p>"
            f'<p class="nums">{html.escape(nums)}</p></div>')


def _verdict_md(v: V.Verdict) -> str:
    nums = ", ".join(f"{k}={_fmt_cell(x) if isinstance(x, float) else x}"
                     for k, x in v.numbers.items())
    return f"- **{v.run}**: {v.question} **{v.answer}**. {v.reason}\n  `{nums}`"


def _figs_html(figs: list[_Fig], section: str) -> str:
    return "".join(
        f'<figure><img alt="{html.escape(f.caption)}" src="data:image/png;base64,{f.b64}">'
        f"<figcaption>{html.escape(f.caption)}</figcaption></figure>"
        for f in figs if f.section == section and f.path is not None
    )

def _figs_md(figs: list[_Fig], section: str, out: Path) -> str:
    return "\n\n".join(
        f"![{f.caption}]({f.path.relative_to(out).as_posix()})\n\n*{f.caption}*"
        for f in figs if f.section == section and f.path is not None
    )


def _documents(title: str, runs: list[_Run], verdicts: list[V.Verdict], figs: list[_Fig],
               tables: Mapping[str, pd.DataFrame], problems: list[str], out: Path
               ) -> tuple[str, str]:
    runs_df = tables["runs"]
    summary = _summary(verdicts, runs)
    rank_inline = tables["rankings_inline"]
    spread = tables["role_spread"]
    spikes = tables["spikes"]
    h: list[str] = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="sub">gradlens layer-wise gradient report: {len(runs)} run(s).</p>',
        "<h2>Runs</h2>", _html_table(runs_df),
        "<h2>Verdicts</h2>",
    ]
    sum_html = _html_table(summary)
    for a in V.ANSWERS:  # answers as badges
        sum_html = sum_html.replace(f"<td>{html.escape(a)}</td>", f"<td>{_badge(a)}</td>")
    h.append(sum_html)
    missing = _not_computable(verdicts, runs)
    if missing:
        h.append(f'<p class="sub">{html.escape(missing)}</p>')
    m: list[str] = [f"# {title}", "", f"gradlens layer-wise gradient report: {len(runs)} run(s).",
                    "", "## Runs", "", _md_table(runs_df), "", "## Verdicts", "",
                    _md_table(summary), ""] + ([missing, ""] if missing else [])
    by_kind = {k: [v for v in verdicts if v.kind == k]
               for k in ("output_highest", "column_spread", "instability")}
    for section, (heading, intro) in _SECTIONS.items():
        h.append(f"<h2>{html.escape(heading)}</h2>")
        m += [f"## {heading}", ""]
        if intro:
            h.append(f"<p>{html.escape(intro)}</p>")
            m += [intro, ""]
        vs: list[V.Verdict] = []
        if section == "variance":
            vs = by_kind["output_highest"]
        elif section == "spread":
            vs = by_kind["column_spread"]
        elif section == "spikes":
            vs = by_kind["instability"]
        if section == "variance" and vs:
            claim = _claim_table(vs, runs)
            h.append("<p><b>Which estimators rank the output layer highest?</b></p>"
                     + _html_table(claim))
            m += ["**Which estimators rank the output layer highest?**", "",
                  _md_table(claim), ""]
        shown = [v for v in vs if v.answer != "not computable"]
        hidden = [v for v in vs if v.answer == "not computable"]
        h += [_verdict_html(v) for v in shown]
        m += [_verdict_md(v) for v in shown]
        if hidden:
            h.append("<details><summary>Not computable for these runs "
                     f"({len(hidden)})</summary>" + "".join(_verdict_html(v) for v in hidden)
                     + "</details>")
            m += ["", "Not computable for these runs:", ""] + [_verdict_md(v) for v in hidden]
        if section == "variance" and not rank_inline.empty:
            h.append(f"<h3>Per-layer rankings (top {RANKING_TOP} and the output layer; every "
                     "layer in <code>rankings.csv</code>)</h3>")
            h.append(_html_table(rank_inline))
            m += ["", f"### Per-layer rankings (top {RANKING_TOP} and the output layer; every "
                  "layer in `rankings.csv`)", "", _md_table(rank_inline)]
        if section == "spread" and not spread.empty:
            h.append(_html_table(spread))
            m += ["", _md_table(spread)]
        if section == "spikes" and not spikes.empty:
            h.append(_html_table(spikes))
            m += ["", _md_table(spikes)]
        h.append(_figs_html(figs, section))
        m += ["", _figs_md(figs, section, out), ""]
    momentum = tables["momentum"]
    if not momentum.empty:
        intro = ("Which layers an EMA of the gradient (momentum 0.9) would help, from each "
                 "layer's noise-to-signal ratio and the noise's lag correlation "
                 "(gradlens.advise.advise_momentum; mse_ratio: the EMA's squared direction "
                 "error over the raw gradient's; buffer_bytes: one float32 buffer).")
        h += ["<h2>Momentum advice</h2>", f"<p>{html.escape(intro)}</p>",
              _html_table(momentum)]
        m += ["## Momentum advice", "", intro, "", _md_table(momentum), ""]
    notes = [
        "Tests across steps treat steps as independent; consecutive steps are correlated "
        "(EMA-smoothed estimators strongly), so p-values are optimistic: read them with the "
        "fractions and effect sizes. Bootstrap CIs resample blocks of consecutive steps "
        "(seeded, deterministic).",
        "Files: report.md, figures/*.png, verdicts.csv, verdicts.json, rankings.csv, "
        "role_spread.csv, spikes.csv, runs.csv, momentum.csv.",
    ]
    h.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes)
             + "".join(f'<li class="problem">{html.escape(p)}</li>' for p in problems)
             + "</ul></body></html>")
    m += ["## Notes", ""] + [f"- {n}" for n in [*notes, *problems]] + [""]
    return "\n".join(h), "\n".join(m)


# --------------------------------------------------------------------------- entry point


def build_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    title: str | None = None,
    progress: bool = True,
) -> ReportPaths:
    """Write the report of the runs in ``run_dirs`` to ``out_dir`` and return the paths.

    Each run directory is read by :mod:`gradlens.report.load` (which raises a clear error on a
    missing or empty run); the run's label is ``name`` from run.json, or the directory name.
    ``progress`` shows a tqdm bar over the figures. The report is written beside ``out_dir``
    and renamed into place (:mod:`gradlens.report.replace`): a killed or failing report leaves
    the previous one whole. Raises ``ValueError`` for an empty list of runs, an out directory
    that cannot be written, or one that is not empty and holds no report.
    """
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    run_dirs = list(run_dirs)
    if not run_dirs:
        raise ValueError("build_report needs at least one run directory; got an empty list")
    target = Path(out_dir).expanduser()
    with replaced_dir(target) as tmp:
        paths = _write_report(run_dirs, tmp, title, progress)
    moved = lambda p: target / p.relative_to(tmp)  # noqa: E731
    register_report(moved(paths.tables["verdicts_json"]), [Path(d) for d in run_dirs])
    return ReportPaths(
        out_dir=target, html=moved(paths.html), markdown=moved(paths.markdown),
        figures={k: moved(v) for k, v in paths.figures.items()},
        tables={k: moved(v) for k, v in paths.tables.items()}, problems=paths.problems)


def _write_report(run_dirs: list[str | Path], out: Path, title: str | None,
                  progress: bool) -> ReportPaths:
    (out / "figures").mkdir()
    runs = _load_runs(run_dirs)
    all_df = pd.concat([r.df for r in runs], ignore_index=True)
    n_boot = N_BOOT

    verdicts: list[V.Verdict] = []
    rankings, spreads = [], []
    ranking_of: dict[tuple[str, str], pd.DataFrame] = {}
    for r in runs:
        verdicts += V.compute_verdicts(r.df, r.spikes, r.meta, n_boot=n_boot)
        for stat in (*VARIANCE_ESTIMATORS, "grad_norm"):
            if stat in _stats_of(r.df):
                rk = V.layer_ranking(r.df, stat, meta=r.meta, n_boot=n_boot)
                rankings.append(rk.assign(run=r.label, stat=stat))
                ranking_of[(r.label, stat)] = rk
        for stat in V.SPREAD_STATS:
            if stat in _stats_of(r.df):
                spreads.append(V.role_spread_table(r.df, stat, n_boot=n_boot)
                               .assign(run=r.label, stat=stat))
    rank_cols = ["run", "stat", "rank", "layer", "label", "role", "median_rank", "median",
                 "ci_low", "ci_high", "n_steps", "p_first"]
    ranking_df = (pd.concat(rankings, ignore_index=True)[rank_cols] if rankings
                  else pd.DataFrame(columns=rank_cols))
    spread_cols = ["run", "stat", "role", "median", "ci_low", "ci_high", "n_layers", "n_values"]
    spread_df = (pd.concat(spreads, ignore_index=True)[spread_cols] if spreads
                 else pd.DataFrame(columns=spread_cols))
    inline = ranking_df[(ranking_df["rank"] <= RANKING_TOP) | (ranking_df["role"] == "output")]
    inline = inline[inline["stat"] != "grad_norm"].drop(columns=["layer"])
    tables = {
        "momentum": _momentum_table(runs),
        "verdicts": V.verdicts_table(verdicts),
        "rankings": ranking_df,
        "role_spread": spread_df,
        "spikes": _spikes_table(runs),
        "runs": _runs_table(runs),
    }
    table_paths: dict[str, Path] = {}
    for name, t in tables.items():
        table_paths[name] = out / f"{name}.csv"
        # every string quoted: a layer name with a lone "\r" reads back whole
        t.to_csv(table_paths[name], index=False, quoting=csv.QUOTE_NONNUMERIC)

    figs = _figure_plan(runs, all_df, n_boot, ranking_of)
    problems = _render(figs, out, progress)
    title = title or ("gradlens report: " + ", ".join(r.label for r in runs))
    html_text, md_text = _documents(title, runs, verdicts, figs,
                                    {**tables, "rankings_inline": inline}, problems, out)
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(html_text, encoding="utf-8")
    md_path.write_text(md_text, encoding="utf-8")
    run_dirs_of = {r.label: str(r.path.resolve()) for r in runs}
    (out / "verdicts.json").write_text(json.dumps(
        [{**v.to_dict(), "run_dir": run_dirs_of.get(str(v.run)), "summary": summary_cells(v)}
         for v in verdicts], indent=1))
    table_paths["verdicts_json"] = out / "verdicts.json"
    return ReportPaths(
        out_dir=out, html=html_path, markdown=md_path,
        figures={f.key: f.path for f in figs if f.path is not None},
        tables=table_paths, problems=tuple(problems),
    )
