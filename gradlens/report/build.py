"""Write the layer-wise report of one or several runs: HTML, Markdown, CSV tables, PNG figures.

``build_report(["runs/scale", "runs/adamw"], "report/")`` reads each run directory through
:mod:`gradlens.report.load`, computes the verdicts of every registered kind
(:mod:`gradlens.report.verdicts`), the tables (:mod:`gradlens.report.tables`) and the figures
(:mod:`gradlens.report.figures`), lays them out once (:mod:`gradlens.report.outline`: the
answers in plain words first) and renders that one document (:mod:`gradlens.report.document`)
to HTML and Markdown::

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
    report/verdicts.json    the verdicts with their numbers, summary cells, plain-words answers
                            and run directories
                            (each run directory gets a pointer to it in reports.json; the
                            TensorBoard plugin's Verdicts view reads it)

Figures failing to draw do not stop the report: they are listed in it (and in
``ReportPaths.problems``) with the error, and a warning is issued.
"""

from __future__ import annotations

import csv
import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from gradlens.kinds import with_kinds
from gradlens.report.answers import with_answers
from gradlens.report.document import render_html, render_markdown
from gradlens.report.figures import figure_plan, render_figures
from gradlens.report.outline import outline
from gradlens.report.replace import replaced_dir
from gradlens.report.summary import register_report, summary_cells
from gradlens.report.tables import (
    momentum_frame,
    rankings,
    role_spreads,
    runs_frame,
    spikes_frame,
)
from gradlens.report.verdicts import Verdict, kinds, verdicts_table
from gradlens.report.verdicts.registry import ReportContext, RunData

__all__ = ["ReportPaths", "build_report"]

N_BOOT = 1000  # bootstrap replicates of every CI (seeded: the report is deterministic)


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



# --------------------------------------------------------------------------- input


def _load_runs(run_dirs: Sequence[str | Path], n_boot: int = N_BOOT) -> list[RunData]:
    from gradlens.report.load import RunError, load_for_report, load_meta, load_spikes

    runs: list[RunData] = []
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
        runs.append(RunData(df.assign(run=label), spikes.assign(run=label), meta, label,
                            np.sort(df["step"].unique()), {"n_boot": n_boot}, path))
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
    verdicts: list[Verdict] = [v for r in runs for k in kinds() for v in k.run(r)]
    ranking_df, ranking_of = rankings(runs, N_BOOT)
    tables = {
        "momentum": momentum_frame(runs),
        "verdicts": verdicts_table(verdicts),
        "rankings": ranking_df,
        "role_spread": role_spreads(runs, N_BOOT),
        "spikes": spikes_frame(runs),
        "runs": runs_frame(runs),
    }
    table_paths: dict[str, Path] = {}
    for name, t in tables.items():
        table_paths[name] = out / f"{name}.csv"
        # every string quoted: a layer name with a lone "\r" reads back whole
        t.to_csv(table_paths[name], index=False, quoting=csv.QUOTE_NONNUMERIC)

    ctx = ReportContext(runs, pd.concat([r.df for r in runs], ignore_index=True), tables,
                        ranking_of, N_BOOT, verdicts)
    figs = figure_plan(ctx)
    problems = render_figures(figs, out, progress)
    title = title or ("gradlens report: " + ", ".join(str(r.label) for r in runs))
    blocks = outline(ctx, verdicts, figs, problems)
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(render_html(title, blocks), encoding="utf-8")
    md_path.write_text(render_markdown(title, blocks, out), encoding="utf-8")
    run_dirs_of = {r.label: str(r.path.resolve()) for r in runs if r.path is not None}
    rows = [{**v.to_dict(), "run_dir": run_dirs_of.get(str(v.run)), "summary": summary_cells(v)}
            for v in verdicts]
    (out / "verdicts.json").write_text(json.dumps(with_answers(rows, verdicts), indent=1))
    table_paths["verdicts_json"] = out / "verdicts.json"
    return ReportPaths(
        out_dir=out, html=html_path, markdown=md_path,
        figures={f.key: f.path for f in figs if f.path is not None},
        tables=table_paths, problems=tuple(problems),
    )
