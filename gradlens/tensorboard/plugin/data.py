"""What the gradlens TensorBoard plugin serves, computed from the run directories' files.

The plugin reads ``run.json``, ``stats.*`` and ``spikes.jsonl``, never TensorBoard event
files, and never a whole parquet table: the run list comes from the files' footers
(:mod:`gradlens.tensorboard.plugin._tables`), a heatmap reads the row groups of its statistic only.
:class:`RunStore` caches each run under a key of the (name, size, mtime) of its files: a poll
of an unchanged run costs a few ``stat`` calls; a run that wrote a flush since reads the new
footers, and a statistic asked for again is read again.

Step downsampling (:mod:`gradlens.tensorboard.plugin._bins`): a statistic logged at more than
``max_cols`` steps is shown in columns of aligned step ranges of a power-of-two width; the
cell of layer ``l`` is ``max`` (default: a spike stays visible) or ``mean`` of the layer's
finite values in the column, NaN when it has none. Each column carries the first and last
logged step it covers. A parquet run's columns come from the range files' summaries
(:mod:`gradlens.table_summary`: a few numbers per layer and block of steps, equal to the rows'
aggregates) and the rows of the parts after them; a run without summaries, or one they cannot
give exactly, is binned from the statistic's rows. A zoom (``start``/``end``) bins the
logged steps of its range alone, at the finest width that fits ``max_cols``
(:meth:`Table.range_columns`). The role summary is computed from the
binned matrix: per role and column, the median, min and max over the role's layers.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradlens.kinds import KINDS, kind_color, layer_kind
from gradlens.report.layer_names import layer_order, short_labels
from gradlens.report.load import RunError, find_tables, load_meta
from gradlens.report.summary import report_pointers, row_summary
from gradlens.schema import RUN_META_FILE, SPIKES_FILE
from gradlens.tensorboard.plugin._bins import Columns, bin_width, cells, matrix_columns
from gradlens.tensorboard.plugin._events import read_events
from gradlens.tensorboard.plugin._json import json_floats as _json_floats
from gradlens.tensorboard.plugin._json import round_sig
from gradlens.tensorboard.plugin._scale import heatmap_scale
from gradlens.tensorboard.plugin._tables import Table, slice_columns

__all__ = [
    "AGGREGATES",
    "DEFAULT_MAX_COLS",
    "ROLE_ORDER",
    "PluginInputError",
    "RunStore",
    "find_runs",
    "round_sig",
]

DEFAULT_MAX_COLS = 400
MAX_COLS_LIMIT = 4000
AGGREGATES = ("max", "mean")
ROLE_ORDER = KINDS
_MAX_DEPTH = 4  # how deep below the logdir run directories are looked for
VERDICTS_FILE = "verdicts.json"
_ZOOMS_KEPT = 8  # zoomed ranges cached per run (a poll of the shown one costs no read)


class PluginInputError(ValueError):
    """A request names a run, statistic or option that does not exist (HTTP 400)."""


def _is_run_dir(p: Path) -> bool:
    try:
        return (p / RUN_META_FILE).is_file() or find_tables(p) is not None
    except (OSError, RunError):
        return True  # a run with a problem is still a run: its error is shown to the user


def find_runs(logdir: str | os.PathLike[str]) -> dict[str, Path]:
    """``{name: directory}`` of the lens runs under ``logdir`` (the logdir itself included),
    at most four levels deep; ``name`` is the path relative to the logdir (``.`` for itself)."""
    root = Path(logdir).expanduser()
    runs: dict[str, Path] = {}
    if not root.is_dir():
        return runs
    for cur, dirs, _files in os.walk(root):
        here = Path(cur)
        depth = len(here.relative_to(root).parts)
        if _is_run_dir(here):
            runs[here.relative_to(root).as_posix()] = here
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < _MAX_DEPTH else []
    return dict(sorted(runs.items()))


def _file_key(paths: list[Path]) -> tuple[tuple[str, int, int], ...]:
    key = []
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            continue
        key.append((p.name, st.st_size, st.st_mtime_ns))
    return tuple(key)


@dataclass
class _Run:
    """The cached content of one run directory."""

    key: tuple[Any, ...]
    table: Table | None = None
    summary: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    wide: dict[str, tuple[list[str], dict[str, str], np.ndarray, np.ndarray]] = field(
        default_factory=dict)
    # (stat, max_cols, step range or None) -> (layers, logged steps, width, columns)
    columns: dict[tuple[Any, ...], tuple[list[str], int, int, Columns]] = field(
        default_factory=dict)
    scales: dict[tuple[Any, ...], dict[str, Any] | None] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)


class RunStore:
    """The runs under one logdir, each read once per change of its files."""

    def __init__(self, logdir: str | os.PathLike[str]) -> None:
        self.logdir = Path(logdir).expanduser()
        self._runs: dict[Path, _Run] = {}
        self._tables: dict[Path, Table] = {}
        self._events: dict[Path, tuple[tuple[Any, ...], list[dict[str, Any]]]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ runs

    def runs(self) -> dict[str, Path]:
        return find_runs(self.logdir)

    def _resolve(self, name: str | None) -> Path:
        runs = self.runs()
        if not name:
            raise PluginInputError("give ?run=<name>; the runs are listed by /runs")
        if name not in runs:
            known = ", ".join(list(runs)[:10]) or "none"
            raise PluginInputError(f"no lens run {name!r} under the logdir (runs: {known})")
        return runs[name]

    def _run(self, path: Path) -> _Run:
        tables = None
        with contextlib.suppress(OSError, RunError):
            tables = find_tables(path)
        files = [path / RUN_META_FILE, *(tables[1] if tables else [])]
        key = _file_key(files)
        with self._lock:
            cached = self._runs.get(path)
            if cached is not None and cached.key == key:
                return cached
        run = _Run(key)
        try:
            run.meta = dict(load_meta(path))
        except RunError:
            run.meta = {}
        table = self._tables.setdefault(path, Table(path))
        try:
            table.refresh()
            run.summary = table.summary()
            run.table = table
        except (RunError, OSError) as err:
            run.error = str(err)
        if run.table is not None and run.table.fmt is None:
            run.error = (f"{path} has no rows yet: the lens writes rows at each flush (every "
                         "log_every steps, and at close)")
        with self._lock:
            self._runs[path] = run
        return run

    def _data(self, name: str | None) -> tuple[Path, _Run, Table]:
        path = self._resolve(name)
        run = self._run(path)
        if run.table is None or run.table.fmt is None:
            raise PluginInputError(run.error or f"{path} has no rows yet")
        return path, run, run.table

    def list_runs(self) -> list[dict[str, Any]]:
        """One entry per run: name, label, statistics, layers, logged steps, finished, error."""
        out = []
        for name, path in self.runs().items():
            run = self._run(path)
            entry: dict[str, Any] = {
                "run": name, "label": str(run.meta.get("name") or path.resolve().name),
                "finished": bool(run.meta.get("finished", False)), "error": run.error,
                "stats": [], "n_layers": 0, "n_steps": 0, "last_step": None,
            }
            if run.summary is not None:
                summary = run.summary
                entry["stats"] = summary["stats"]
                layers = summary["layers"]
                if layers is None:  # parquet: the layers run.json lists (the lens writes all)
                    layers = [la.get("name") for la in run.meta.get("layers") or []
                              if isinstance(la, dict)]
                entry["n_layers"] = len(layers)
                entry["n_steps"] = len(summary["steps"])
                entry["last_step"] = int(summary["steps"][-1]) if summary["steps"] else None
            out.append(entry)
        return out

    def _columns(self, run: _Run, table: Table, stat: str, max_cols: int,
                 span: tuple[int | None, int | None] | None = None
                 ) -> tuple[list[str], int, int, Columns]:
        """(layers in display order, logged steps, column width (1: a column per logged
        step), their columns) of one statistic, cached: from the range files' summaries
        where they give it exactly, else from the matrix of the statistic's rows (cached too,
        for other ``max_cols``). ``span``: the steps ``start..end`` only, binned afresh
        (:meth:`Table.range_columns`; the last few ranges are cached)."""
        key = (stat, max_cols, span)
        hit = run.columns.get(key)
        if hit is not None:
            return hit
        found = None if stat in run.wide or span else table.stat_columns(stat, max_cols)
        if span is not None:
            lo, hi = span
            if stat not in run.wide and table.fmt != "parquet":  # a text table: read whole
                run.wide[stat] = table.stat_matrix(stat)
            layers, roles, n_steps, w, cols = (
                slice_columns(*run.wide[stat], lo, hi, max_cols) if stat in run.wide
                else table.range_columns(stat, lo, hi, max_cols))
            if not n_steps and stat in (run.summary or {}).get("stats", []):
                raise PluginInputError(f"statistic {stat!r} has no logged step in steps "
                                       f"{_fmt_span(span)}")
            if len([k for k in run.columns if k[2] is not None]) >= _ZOOMS_KEPT:
                for k in [k for k in run.columns if k[2] is not None]:
                    run.columns.pop(k)
                    run.scales.pop(k, None)
        elif found is not None:
            layers, roles, n_steps, cols = found
            w = bin_width(int(cols.first[0]), int(cols.last[-1]), n_steps, max_cols)
        else:
            if stat not in run.wide:
                run.wide[stat] = table.stat_matrix(stat)
            layers, roles, steps, values = run.wide[stat]
            n_steps = len(steps)
            w = bin_width(int(steps[0]), int(steps[-1]), n_steps, max_cols) if n_steps else None
            cols = matrix_columns(steps, values, w)
        if not layers:
            stats = (run.summary or {}).get("stats", [])
            raise PluginInputError(f"statistic {stat!r} has no per-layer rows in this run "
                                   f"(it has: {', '.join(stats) or 'none'})")
        roles = {n: layer_kind(n, r) for n, r in roles.items()}  # old runs: roles -> kinds
        run.roles.update(roles)
        first = pd.DataFrame({"layer": layers, "role": [roles[n] for n in layers]})
        order = layer_order(first, run.meta, layers)
        rank = {r: i for i, r in enumerate(ROLE_ORDER)}
        pos = {name: i for i, name in enumerate(order)}
        order = sorted(order, key=lambda n: (rank.get(roles.get(n, ""), len(rank)), pos[n]))
        row = {n: i for i, n in enumerate(layers)}
        entry = (order, n_steps, w or 1, cols.take([row[n] for n in order]))
        run.columns[key] = entry
        return entry

    # ------------------------------------------------------------------ views

    def heatmap(self, name: str | None, stat: str | None, max_cols: int = DEFAULT_MAX_COLS,
                agg: str = "max", start: int | None = None, end: int | None = None
                ) -> dict[str, Any]:
        """Layers (grouped by role, model order inside a role) x step columns of ``stat``
        (:mod:`gradlens.tensorboard.plugin._bins`).

        Returns ``layers`` ([{name, label, role}]), ``roles`` (bands: role, first row, rows),
        ``columns`` ([first step, last step] per column), ``values`` (rows of floats or null),
        ``vmin``/``vmax`` (smallest/largest positive finite value, for a log colour scale;
        5 significant digits, as the values), ``scale`` (the report's colour-scale kind,
        :func:`gradlens.tensorboard.plugin._scale.heatmap_scale`: see :meth:`_scale`),
        ``agg``, ``n_steps`` (logged steps before binning), ``width`` (steps per column, 1
        when each logged step is a column), ``range`` (``[start, end]`` of a zoom, open ends
        filled with the first/last logged step in it; None for the whole run) and
        ``version`` (changes when the files do).

        Zoom: with ``start`` and/or ``end`` (inclusive), only the logged steps in that range
        are binned, at the finest width that keeps at most ``max_cols`` columns.
        """
        if not stat:
            raise PluginInputError("give ?stat=<statistic>")
        if agg not in AGGREGATES:
            raise PluginInputError(f"agg must be one of {AGGREGATES}, got {agg!r}")
        if not 1 <= max_cols <= MAX_COLS_LIMIT:
            raise PluginInputError(f"max_cols must be in 1..{MAX_COLS_LIMIT}, got {max_cols}")
        span = _span(start, end)
        _path, run, table = self._data(name)
        layers, n_steps, width, cols = self._columns(run, table, stat, max_cols, span)
        binned = cells(cols, agg)
        roles = run.roles
        labels = short_labels(layers)
        bands: list[dict[str, Any]] = []
        for i, layer in enumerate(layers):
            role = roles.get(layer, "")
            if bands and bands[-1]["role"] == role:
                bands[-1]["rows"] += 1
            else:
                bands.append({"role": role, "first": i, "rows": 1, "color": kind_color(role)})
        pos = binned[np.isfinite(binned) & (binned > 0)]
        return {
            "run": name, "stat": stat, "agg": agg, "n_steps": n_steps, "width": width,
            "range": None if span is None else [
                int(cols.first[0]) if start is None else start,
                int(cols.last[-1]) if end is None else end],
            "layers": [{"name": n, "label": labels[n], "role": roles.get(n, "")} for n in layers],
            "roles": bands,
            "columns": [[int(a), int(b)] for a, b in zip(cols.first, cols.last, strict=True)],
            "values": _json_floats(binned),
            "vmin": _json_floats(pos.min(keepdims=True))[0] if pos.size else None,
            "vmax": _json_floats(pos.max(keepdims=True))[0] if pos.size else None,
            "scale": self._scale(run, stat, (stat, max_cols, span)),
            "version": repr(run.key),
        }

    @staticmethod
    def _scale(run: _Run, stat: str, key: tuple[Any, ...]) -> dict[str, Any] | None:
        """The colour-scale kind: the report's rule over every logged step's value where the
        statistic's rows were read; where its columns came from the range summaries, or for
        a zoom, the same rule over the columns' maxima and means (both, so that the kind does
        not change with ``agg``; the summaries hold no per-step value)."""
        if stat in run.wide and key[2] is None:
            return heatmap_scale(run.wide[stat][3])
        if key not in run.scales:
            cols = run.columns[key][3]
            run.scales[key] = heatmap_scale(np.concatenate([cells(cols, "max"),
                                                            cells(cols, "mean")], axis=1))
        return run.scales[key]

    def role_summary(self, name: str | None, stat: str | None,
                     max_cols: int = DEFAULT_MAX_COLS, agg: str = "mean",
                     start: int | None = None, end: int | None = None) -> dict[str, Any]:
        """Per role: the median, min and max over its layers of the binned values, per column
        (of the zoom ``start..end`` when given, as :meth:`heatmap`)."""
        hm = self.heatmap(name, stat, max_cols, agg, start, end)
        _path, run, table = self._data(name)
        binned = cells(self._columns(run, table, str(stat), max_cols,
                                     _span(start, end))[3], agg)
        out: dict[str, Any] = {}
        for band in hm["roles"]:
            block = binned[band["first"]:band["first"] + band["rows"]]
            entry = out.setdefault(band["role"], {"layers": 0, "rows": [],
                                                  "color": band["color"]})
            entry["layers"] += band["rows"]
            entry["rows"].append(block)
        roles = {}
        for role, entry in out.items():
            block = np.vstack(entry["rows"])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
                roles[role] = {
                    "layers": entry["layers"], "color": entry["color"],
                    "median": _json_floats(np.nanmedian(block, axis=0)),
                    "min": _json_floats(np.nanmin(block, axis=0)),
                    "max": _json_floats(np.nanmax(block, axis=0)),
                }
        return {"run": name, "stat": stat, "agg": agg, "columns": hm["columns"],
                "width": hm["width"], "range": hm["range"],
                "roles": roles, "version": hm["version"]}

    def events(self, name: str | None) -> dict[str, Any]:
        """Every row of ``spikes.jsonl`` with all its fields (any kind, e.g. ``validity``
        rows with ``family`` and ``reason``), in file order, and the count per kind."""
        path = self._resolve(name) / SPIKES_FILE
        key = _file_key([path])
        cached = self._events.get(path)
        if cached is None or cached[0] != key:
            cached = (key, list(read_events(path)))
            self._events[path] = cached
        rows = cached[1]
        kinds: dict[str, int] = {}
        for r in rows:
            kinds[str(r.get("kind"))] = kinds.get(str(r.get("kind")), 0) + 1
        return {"run": name, "events": rows, "kinds": kinds}

    def verdicts(self, name: str | None) -> dict[str, Any]:
        """The verdicts of the latest ``gradlens report`` that covered this run.

        ``verdicts.json`` is looked for in the run directory, the directories above it up to
        the logdir, and their direct sub-directories, and wherever the run directory's
        ``reports.json`` points (``gradlens report`` records itself there: the demo's
        ``report/`` sits beside the logdir ``runs/``); rows are matched by the run directory
        the report recorded, or else by the run's label. Each row carries the report's
        ``summary`` cells (:func:`gradlens.report.summary.summary_cells`), shown as they are
        (a report written before the rows carried them gets them from the verdict registry);
        ``answers`` lists the report's first section for this run (each verdict kind's answer in
        plain words and what to do next, in the report's order).
        """
        path = self._resolve(name).resolve()
        run = self._run(path)
        label = str(run.meta.get("name") or path.name)
        root = self.logdir.resolve()
        dirs = [path, *[p for p in path.parents if p == root or root in p.parents]]
        candidates: list[Path] = []
        for d in dirs:
            candidates.append(d / VERDICTS_FILE)
            try:
                candidates += sorted(s / VERDICTS_FILE for s in d.iterdir() if s.is_dir())
            except OSError:
                continue
        candidates += [Path(p) for p in report_pointers(path)]  # where a report said it went
        found = []
        for f in dict.fromkeys(candidates):
            if not f.is_file():
                continue
            try:
                rows = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if not isinstance(rows, list):
                continue
            mine = [r for r in rows if isinstance(r, dict) and _same_run(r, path, label)]
            if mine:
                found.append((f.stat().st_mtime, f, mine))
        if not found:
            return {"run": name, "verdicts": [], "source": None,
                    "hint": f"no report covers this run yet: gradlens report {path} -o REPORT"}
        _, f, mine = max(found, key=lambda t: t[0])
        for r in mine:  # a report written before the rows carried their summary cells
            r["summary"] = row_summary(r)
        answers = [r["plain"] for r in mine if isinstance(r.get("plain"), dict)]
        return {"run": name, "verdicts": mine, "answers": answers, "source": str(f)}


def _span(start: int | None, end: int | None) -> tuple[int | None, int | None] | None:
    """The zoom ``(start, end)``, None for the whole run; start > end is a bad request."""
    if start is None and end is None:
        return None
    if start is not None and end is not None and start > end:
        raise PluginInputError(f"start must be <= end, got start={start} end={end}")
    return start, end


def _fmt_span(span: tuple[int | None, int | None]) -> str:
    return f"{'..' if span[0] is None else span[0]}..{'' if span[1] is None else span[1]}"


def _same_run(row: dict[str, Any], path: Path, label: str) -> bool:
    rd = row.get("run_dir")
    if isinstance(rd, str) and rd:
        try:
            return Path(rd).resolve() == path
        except OSError:
            return False
    return str(row.get("run")) == label
