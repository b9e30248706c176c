"""Read a run directory written by the lens: the long table, the spike events, the metadata.

Only the files and :mod:`gradlens.schema` are used; no live training process, no TensorBoard.

- :func:`load_run` reads ``stats.csv``, ``stats.jsonl`` or ``stats-*.parquet``;
- :func:`load_spikes` reads ``spikes.jsonl``;
- :func:`load_meta` reads ``run.json``.

A run killed while writing can leave a partial last line in a CSV or JSON-lines file (the
only thing that can be cut is the line being written): it is dropped with a
:class:`TruncatedRunWarning`. A damaged line anywhere else (garbled text, a wrong number of
fields, a step that is not an integer, a NUL byte in a field: none of which the lens writes) is
skipped with a :class:`CorruptLineWarning` naming the file and the line, and every good row
around it is read. A file with no good row at all, a CSV header that is not gradlens's, a
parquet file with the wrong columns or column types, a ``spikes.jsonl`` that is not a file
raise :class:`CorruptRunError` naming the file. Errors subclass ``ValueError`` and say what to
do.

``value``: a float; NaN (``nan`` or an empty field in CSV, ``NaN`` or ``null`` in JSON lines,
as other writers such as pandas spell it) means the statistic
could not be computed at that step (too few micro-batches, a broken assumption of its
estimator, non-finite gradients); ``+-inf`` are real overflows.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pandas as pd

from gradlens.report._errors import (
    CorruptLineWarning,
    CorruptPartWarning,
    CorruptRunError,
    EmptyRunError,
    RunError,
    RunNotFoundError,
    TruncatedRunWarning,
)
from gradlens.report._text import Skipped, empty_stats, jsonl_stats, read_csv, read_jsonl
from gradlens.schema import (
    RUN_META_FILE,
    SPIKE_FIELDS,
    SPIKES_FILE,
    STAT_COLUMNS,
    STATS_BASENAME,
)
from gradlens.table_parts import list_parts

__all__ = [
    "CorruptLineWarning",
    "CorruptPartWarning",
    "CorruptRunError",
    "EmptyRunError",
    "RunError",
    "RunNotFoundError",
    "TruncatedRunWarning",
    "find_tables",
    "is_live",
    "load_for_report",
    "load_meta",
    "load_run",
    "load_spikes",
]

_STR_COLUMNS = ("layer", "role", "stat")


PathLike = str | os.PathLike[str]


def _run_dir(run_dir: PathLike) -> Path:
    p = Path(run_dir).expanduser()
    if not p.exists():
        raise RunNotFoundError(
            f"{str(p)!r} does not exist; pass the logdir a GradLens (or TableSink) wrote to"
        )
    if p.is_file():
        if p.name == RUN_META_FILE or p.name == SPIKES_FILE or p.name.startswith(STATS_BASENAME):
            return p.parent
        raise RunNotFoundError(f"{str(p)!r} is a file; pass the run directory that holds it")
    return p


def find_tables(run_dir: PathLike) -> tuple[str, list[Path]] | None:
    """The table of a run: ``(format, files)``, or None when there is none.

    Raises :class:`CorruptRunError` when the directory holds tables in several formats.
    """
    p = Path(run_dir)
    found: dict[str, list[Path]] = {}
    for fmt in ("csv", "jsonl"):
        f = p / f"{STATS_BASENAME}.{fmt}"
        if f.is_file():
            found[fmt] = [f]
    parquet = list_parts(p)
    if parquet:
        found["parquet"] = [f for _, _, f in parquet]
    if len(found) > 1:
        raise CorruptRunError(
            f"{p} holds tables in several formats ({', '.join(sorted(found))}); a lens writes "
            "one. Move the ones you do not want out of the directory"
        )
    if not found:
        return None
    fmt, files = next(iter(found.items()))
    return fmt, files


def _not_a_run(p: Path) -> RunNotFoundError:
    tb = any(f.name.startswith("events.out.tfevents") for f in p.iterdir())
    subruns = sorted(d.name for d in p.iterdir()
                     if d.is_dir() and ((d / RUN_META_FILE).exists() or find_tables(d)))
    hint = ""
    if subruns:
        hint = f" It has run directories inside: {', '.join(subruns[:5])}; pass one of them."
    elif tb:
        hint = (" It holds TensorBoard events only: the table sink was off. Run the lens with "
                "a logdir and the default sinks to get a table.")
    return RunNotFoundError(
        f"{p} is not a gradlens run: no {RUN_META_FILE} and no {STATS_BASENAME}.csv / "
        f"{STATS_BASENAME}.jsonl / {STATS_BASENAME}-*.parquet.{hint}"
    )


def is_live(run_dir: PathLike) -> bool:
    """True when ``run.json`` says the run has not ended (it is being written, or was killed
    before it could say so)."""
    try:
        meta = json.loads((Path(run_dir) / RUN_META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("ended", "x") is None


def load_run(run_dir: PathLike, *, dedupe: bool = True,
             stats: Collection[str] | None = None, layers: Collection[str] | None = None,
             steps: tuple[int | None, int | None] | Collection[int] | None = None,
             categorical: bool = False) -> pd.DataFrame:
    """The long table of a run: columns ``step`` (int64), ``layer``, ``role``, ``stat``,
    ``value`` (float64), in the order written (the parquet table groups the rows of each
    merged range of 64 flushes by statistic).

    A NaN ``value`` (``nan`` or empty in CSV; ``NaN`` or ``null`` in JSON lines) is a statistic that
    could not be computed at that step (e.g. a variance estimator with one micro-batch); the row
    is kept so that "not computable" differs from "not recorded". A damaged line in the middle
    of a CSV or JSON-lines table (including a NUL byte in a field) is skipped with a
    :class:`CorruptLineWarning` naming the file and the line; the rows around it are read. An
    unreadable parquet file is skipped with a :class:`CorruptPartWarning`.

    Args:
        run_dir: the run directory (a file inside it is accepted too).
        dedupe: when a ``(step, layer, stat)`` appears more than once (a resumed run that
            re-did steps after its last checkpoint), keep the last-written row.
        stats, layers: only these statistics / layers (a parquet table reads only the row
            groups and rows that hold them: a query of one statistic reads about 1/20 of a
            ``standard`` run).
        steps: a tuple ``(first, last)``, inclusive, either None for open: only the steps
            between; any other collection of ints (a list, a set, a ``range``): only these
            steps.
        categorical: ``layer``, ``role``, ``stat`` as pandas categoricals (a few bytes per row
            instead of a Python string reference; for large runs).

    A live run (``run.json`` with ``ended: null``) that has no rows yet reads as an empty
    table; a run that ended without rows raises :class:`EmptyRunError`.

    Raises:
        RunNotFoundError: the path does not exist or holds no run.
        EmptyRunError: the run has ``run.json`` but no rows, and has ended.
        CorruptRunError: a table has no good row, a CSV header that is not gradlens's, or a
            parquet file with the wrong columns or column types (the file is named).
    """
    p = _run_dir(run_dir)
    tables = find_tables(p)
    query = _query(stats, layers, steps)
    if tables is None:
        if (p / RUN_META_FILE).exists():
            if is_live(p):
                return _typed(empty_stats(), categorical)
            raise EmptyRunError(
                f"{p} has {RUN_META_FILE} but no rows yet: the lens writes rows at each flush "
                "(every log_every steps, and at close). Train longer, call lens.flush(), or "
                "check that the run did not fail before its first flush"
            )
        raise _not_a_run(p)
    fmt, files = tables
    if fmt == "parquet":
        from gradlens.report._parquet import scan, steps_disjoint

        each = dedupe and steps_disjoint(p)  # then one file at a time is exact, and small
        dedupe = dedupe and not each
        t = scan(p, query, dedupe_each=each)
        df = t.to_pandas() if t is not None else empty_stats()
    else:
        df = read_csv(files[0]) if fmt == "csv" else jsonl_stats(files[0])
        df = _filter(df, query)
    if df.empty and not _filtered(query):
        if is_live(p):
            return _typed(empty_stats(), categorical)
        raise EmptyRunError(
            f"{p}: the table {files[0].name} has no rows yet: the lens writes rows at each "
            "flush (every log_every steps, and at close); train longer or call lens.flush()"
        )
    df = _typed(df, categorical)
    if dedupe and len(df):
        dup = df.duplicated(subset=["step", "layer", "stat"], keep="last")
        if dup.any():
            df = df[~dup.to_numpy()]
    return df.reset_index(drop=True)


def _query(stats: Collection[str] | None, layers: Collection[str] | None,
           steps: tuple[int | None, int | None] | Collection[int] | None) -> Any:
    if steps is None:
        return (stats, layers, (None, None), None)
    if isinstance(steps, tuple):
        if len(steps) != 2:
            raise ValueError(f"steps=(first, last) takes two values, got {steps!r}; pass a "
                             "list or a set for a collection of steps")
        return (stats, layers, (steps[0], steps[1]), None)
    chosen = {int(s) for s in steps}
    bounds = (min(chosen), max(chosen)) if chosen else (1, 0)
    return (stats, layers, bounds, chosen)


def _filtered(query: Any) -> bool:
    return (query[0] is not None or query[1] is not None or query[2] != (None, None)
            or query[3] is not None)


def _filter(df: pd.DataFrame, query: Any) -> pd.DataFrame:
    stats, layers, (lo, hi), step_set = query
    if not _filtered(query):
        return df
    keep = pd.Series(True, index=df.index)
    if step_set is not None:
        keep &= df["step"].isin(list(step_set))
    if stats is not None:
        keep &= df["stat"].isin(list(stats))
    if layers is not None:
        keep &= df["layer"].isin(list(layers))
    if lo is not None:
        keep &= df["step"] >= lo
    if hi is not None:
        keep &= df["step"] <= hi
    return df[keep.to_numpy()]


def _typed(df: pd.DataFrame, categorical: bool) -> pd.DataFrame:
    df = df[list(STAT_COLUMNS)].astype({"step": "int64", "value": "float64"})
    for c in _STR_COLUMNS:
        df[c] = df[c].astype("category" if categorical else str)
    return df


REPORT_MAX_ROWS = 500_000


def load_for_report(run_dir: PathLike, max_rows: int | None = None) -> pd.DataFrame:
    """What ``gradlens report`` reads of a run: the whole table up to ``max_rows`` rows;
    beyond, every ``k``-th logged step (the last one included), ``k = ceil(rows /
    max_rows)``, as if the run had logged ``k`` times less often, with a warning that says so.
    Only those steps are decoded (a step filter on each stored file), so the memory is
    bounded by ``max_rows``. ``max_rows`` None: ``$GRADLENS_REPORT_MAX_ROWS``, else
    500,000 (0: no limit). A text table (CSV, JSON lines) is read whole.

    Raises :class:`EmptyRunError` for a run without rows (also a live one: a report needs
    rows)."""
    import warnings

    p = _run_dir(run_dir)
    if max_rows is None:
        max_rows = int(os.environ.get("GRADLENS_REPORT_MAX_ROWS", REPORT_MAX_ROWS))
    tables = find_tables(p)
    steps = None
    if max_rows > 0 and tables is not None and tables[0] == "parquet":
        from gradlens.report._parquet import table_info

        info = table_info(p)
        if info["rows"] > max_rows and info["steps"]:
            k = math.ceil(info["rows"] / max_rows)
            steps = info["steps"][::-1][::k][::-1]
            warnings.warn(
                f"{p}: {info['rows']:,} rows, more than max_rows={max_rows:,}: the report reads "
                f"every {k}th logged step ({len(steps):,} of {len(info['steps']):,}), as if the "
                f"run had logged {k}x less often. Set GRADLENS_REPORT_MAX_ROWS (0: no limit) to "
                "read more",
                UserWarning,
                stacklevel=2,
            )
    df = load_run(p, steps=steps)
    if df.empty:
        raise EmptyRunError(
            f"{p} has no rows yet: the lens writes rows at each flush (every log_every steps, "
            "and at close); a report needs rows"
        )
    return df


# ---------------------------------------------------------------------- spikes and metadata


def load_spikes(run_dir: PathLike, *, dedupe: bool = True) -> pd.DataFrame:
    """The spike events of a run: columns of ``schema.SPIKE_FIELDS`` (``layers`` holds lists
    of layer names). A run without ``spikes.jsonl`` had no events: the table is empty.

    Args:
        run_dir: the run directory (a file inside it is accepted too).
        dedupe: when a ``(step, layer, kind)`` appears more than once (a resumed run re-did
            steps after its last checkpoint and detected the same spike again), keep the
            last-written event, as :func:`load_run` does for rows.

    Raises :class:`RunNotFoundError` for a path that is not a run, and
    :class:`CorruptRunError` when ``spikes.jsonl`` is not a file or has no good line (a damaged
    line among good ones is skipped with a :class:`CorruptLineWarning`).
    """
    p = _run_dir(run_dir)
    path = p / SPIKES_FILE
    records: list[dict[str, Any]] = []
    linenos: list[int] = []
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise CorruptRunError(
                f"{path} is not a file (a directory?), so the run's spike events cannot be "
                "read; move it out of the run directory"
            )
        skipped = Skipped(path)
        records, linenos = read_jsonl(path, SPIKE_FIELDS[:5], skipped)  # layers, family, reason: optional
        good = []
        for lineno, rec in zip(linenos, records, strict=True):
            problem = _event_problem(rec)
            if problem:
                skipped.add(lineno, problem)
            else:
                good.append(rec)
        records = good
        skipped.warn(len(records))
    elif not (p / RUN_META_FILE).exists() and find_tables(p) is None:
        raise _not_a_run(p)
    for rec in records:
        rec["layers"] = [str(x) for x in rec.get("layers", [])]
        rec.setdefault("family", "")
        rec.setdefault("reason", "")
        for c in ("value", "score"):
            if rec[c] is None:
                rec[c] = math.nan
    df = pd.DataFrame.from_records(records, columns=list(SPIKE_FIELDS))
    df = df.astype({"step": "int64", "value": "float64", "score": "float64"})
    for c in ("layer", "kind", "family", "reason"):
        df[c] = df[c].astype(str)
    if dedupe:
        dup = df.duplicated(subset=["step", "layer", "kind", "family"], keep="last")
        if dup.any():
            df = df[~dup.to_numpy()].reset_index(drop=True)
    return df


def _event_problem(rec: dict[str, Any]) -> str | None:
    """Why a spike record is not one (None when it is)."""
    step = rec["step"]
    if isinstance(step, bool) or not isinstance(step, int):
        return f"step {step!r} is not an integer"
    for c in ("value", "score"):
        v = rec[c]
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            return f"{c} {v!r} is not a number"
    for c in ("layer", "kind"):
        if not isinstance(rec[c], str) or not rec[c] or "\x00" in rec[c]:
            return f"{c} must be a non-empty string without NUL bytes"
    layers = rec.get("layers", [])
    if not isinstance(layers, list):
        return "'layers' must be a list"
    return None


def load_meta(run_dir: PathLike) -> dict[str, Any]:
    """The run metadata (``run.json``): model, optimizer, preset, layers, ``finished``, ...

    Raises :class:`RunNotFoundError` when there is no ``run.json`` and
    :class:`CorruptRunError` when it is not valid JSON.
    """
    p = _run_dir(run_dir)
    path = p / RUN_META_FILE
    if not path.is_file():
        if find_tables(p) is not None:
            raise RunNotFoundError(
                f"{p} has a table but no {RUN_META_FILE} (the lens writes it when it opens; "
                "was the directory copied partially?). load_run still reads the table"
            )
        raise _not_a_run(p)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise CorruptRunError(
            f"{path}: not valid JSON ({err}); it is rewritten atomically, so this is not a "
            "killed run: restore it or delete it (load_run reads the table without it)"
        ) from None
    if not isinstance(meta, dict):
        raise CorruptRunError(f"{path}: must hold a JSON object")
    return meta
