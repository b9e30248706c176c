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
give exactly, is binned from the statistic's rows. The role summary is computed from the
binned matrix: per role and column, the median, min and max over the role's layers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import warnings
from collections.abc import Iterator
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
from gradlens.tensorboard.plugin._scale import heatmap_scale
from gradlens.tensorboard.plugin._tables import Table

__all__ = [
    "AGGREGATES",
    "DEFAULT_MAX_COLS",
    "ROLE_ORDER",
    "PluginInputError",
    "RunStore",
    "find_runs",
]

DEFAULT_MAX_COLS = 400
MAX_COLS_LIMIT = 4000
AGGREGATES = ("max", "mean")
ROLE_ORDER = KINDS
_MAX_DEPTH = 4  # how deep below the logdir run directories are looked for
VERDICTS_FILE = "verdicts.json"


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


def round_sig(a: np.ndarray, digits: int = 5) -> np.ndarray:
    """``a`` rounded to ``digits`` significant digits (as ``float(f"{x:.5g}")``, vectorized:
    ``round(x * 10**k) / 10**k`` with ``10**k`` exact, so the result is the double nearest
    to the rounded decimal; it can differ from the string's only where ``x * 10**k`` lands
    within an ulp of a tie). Non-finite values, zeros and magnitudes outside 1e-17..1e22
    (where ``10**k`` is not exact) go through the string."""
    a = np.asarray(a, np.float64)
    out = a.copy()
    mag = np.abs(a)
    ok = np.isfinite(a) & (mag >= 1e-17) & (mag < 1e22)
    x = a[ok]
    k = (digits - 1) - np.floor(np.log10(np.abs(x)))  # 10**k scales the last kept digit to 1
    r = np.empty_like(x)
    up = k >= 0
    r[up] = np.round(x[up] * 10.0 ** k[up]) / 10.0 ** k[up]
    r[~up] = np.round(x[~up] / 10.0 ** -k[~up]) * 10.0 ** -k[~up]
    out[ok] = r
    rest = np.flatnonzero(~ok & np.isfinite(a))
    out.flat[rest] = [float(f"{v:.{digits}g}") for v in a.flat[rest]]
    return out


def _json_floats(a: np.ndarray) -> list[Any]:
    """Nested lists with 5 significant digits; NaN and +-inf as None (JSON has neither)."""
    a = np.asarray(a, np.float64)
    flat = [v if math.isfinite(v) else None for v in round_sig(a).ravel().tolist()]
    if a.ndim == 1:
        return flat
    n = a.shape[1]
    return [flat[i:i + n] for i in range(0, len(flat), n)]


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
    columns: dict[tuple[str, int], tuple[list[str], int, Columns]] = field(default_factory=dict)
    scales: dict[tuple[str, int], dict[str, Any] | None] = field(default_factory=dict)
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

    def _columns(self, run: _Run, table: Table, stat: str, max_cols: int
                 ) -> tuple[list[str], int, Columns]:
        """(layers in display order, logged steps, their columns) of one statistic, cached:
        from the range files' summaries where they give it exactly, else from the matrix of
        the statistic's rows (cached too, for other ``max_cols``)."""
        hit = run.columns.get((stat, max_cols))
        if hit is not None:
            return hit
        found = None if stat in run.wide else table.stat_columns(stat, max_cols)
        if found is not None:
            layers, roles, n_steps, cols = found
        else:
            if stat not in run.wide:
                run.wide[stat] = table.stat_matrix(stat)
            layers, roles, steps, values = run.wide[stat]
            n_steps = len(steps)
            cols = matrix_columns(steps, values,
                                  bin_width(int(steps[0]), int(steps[-1]), n_steps, max_cols)
                                  if n_steps else None)
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
        entry = (order, n_steps, cols.take([row[n] for n in order]))
        run.columns[(stat, max_cols)] = entry
        return entry

    # ------------------------------------------------------------------ views

    def heatmap(self, name: str | None, stat: str | None, max_cols: int = DEFAULT_MAX_COLS,
                agg: str = "max") -> dict[str, Any]:
        """Layers (grouped by role, model order inside a role) x step columns of ``stat``
        (:mod:`gradlens.tensorboard.plugin._bins`).

        Returns ``layers`` ([{name, label, role}]), ``roles`` (bands: role, first row, rows),
        ``columns`` ([first step, last step] per column), ``values`` (rows of floats or null),
        ``vmin``/``vmax`` (smallest/largest positive finite value, for a log colour scale;
        5 significant digits, as the values), ``scale`` (the report's colour-scale kind,
        :func:`gradlens.tensorboard.plugin._scale.heatmap_scale`: see :meth:`_scale`), ``agg``, ``n_steps`` (logged steps before binning) and
        ``version`` (changes when the
        files do).
        """
        if not stat:
            raise PluginInputError("give ?stat=<statistic>")
        if agg not in AGGREGATES:
            raise PluginInputError(f"agg must be one of {AGGREGATES}, got {agg!r}")
        if not 1 <= max_cols <= MAX_COLS_LIMIT:
            raise PluginInputError(f"max_cols must be in 1..{MAX_COLS_LIMIT}, got {max_cols}")
        _path, run, table = self._data(name)
        layers, n_steps, cols = self._columns(run, table, stat, max_cols)
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
            "run": name, "stat": stat, "agg": agg, "n_steps": n_steps,
            "layers": [{"name": n, "label": labels[n], "role": roles.get(n, "")} for n in layers],
            "roles": bands,
            "columns": [[int(a), int(b)] for a, b in zip(cols.first, cols.last, strict=True)],
            "values": _json_floats(binned),
            "vmin": _json_floats(pos.min(keepdims=True))[0] if pos.size else None,
            "vmax": _json_floats(pos.max(keepdims=True))[0] if pos.size else None,
            "scale": self._scale(run, stat, max_cols),
            "version": repr(run.key),
        }

    @staticmethod
    def _scale(run: _Run, stat: str, max_cols: int) -> dict[str, Any] | None:
        """The colour-scale kind: the report's rule over every logged step's value where the
        statistic's rows were read; where its columns came from the range summaries, the
        same rule over the columns' maxima and means (both, so that the kind does not change
        with ``agg``; the summaries hold no per-step value)."""
        if stat in run.wide:
            return heatmap_scale(run.wide[stat][3])
        key = (stat, max_cols)
        if key not in run.scales:
            cols = run.columns[key][2]
            run.scales[key] = heatmap_scale(np.concatenate([cells(cols, "max"),
                                                            cells(cols, "mean")], axis=1))
        return run.scales[key]

    def role_summary(self, name: str | None, stat: str | None,
                     max_cols: int = DEFAULT_MAX_COLS, agg: str = "mean") -> dict[str, Any]:
        """Per role: the median, min and max over its layers of the binned values, per column."""
        hm = self.heatmap(name, stat, max_cols, agg)
        _path, run, table = self._data(name)
        binned = cells(self._columns(run, table, str(stat), max_cols)[2], agg)
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
                "roles": roles, "version": hm["version"]}

    def events(self, name: str | None) -> dict[str, Any]:
        """Every row of ``spikes.jsonl`` with all its fields (any kind, e.g. ``validity``
        rows with ``family`` and ``reason``), in file order, and the count per kind."""
        path = self._resolve(name) / SPIKES_FILE
        key = _file_key([path])
        cached = self._events.get(path)
        if cached is None or cached[0] != key:
            cached = (key, list(_read_events(path)))
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


def _same_run(row: dict[str, Any], path: Path, label: str) -> bool:
    rd = row.get("run_dir")
    if isinstance(rd, str) and rd:
        try:
            return Path(rd).resolve() == path
        except OSError:
            return False
    return str(row.get("run")) == label


def _read_events(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of ``spikes.jsonl``; a damaged line (a live run's partial last line,
    or worse) is skipped, never raised: the dashboard shows what can be read."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            yield {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                   for k, v in rec.items()}
