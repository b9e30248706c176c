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

import io
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradlens.report.csv_records import csv_records
from gradlens.schema import (
    RUN_META_FILE,
    SPIKE_FIELDS,
    SPIKES_FILE,
    STAT_COLUMNS,
    STATS_BASENAME,
)

__all__ = [
    "CorruptLineWarning",
    "CorruptRunError",
    "EmptyRunError",
    "RunError",
    "RunNotFoundError",
    "TruncatedRunWarning",
    "find_tables",
    "load_meta",
    "load_run",
    "load_spikes",
]

_PARQUET_RE = re.compile(rf"^{re.escape(STATS_BASENAME)}-(\d+)\.parquet$")
_CSV_HEADER = ",".join(STAT_COLUMNS)
_STR_COLUMNS = ("layer", "role", "stat")


class RunError(ValueError):
    """A run directory cannot be read."""


class RunNotFoundError(RunError):
    """The path does not exist, or holds no run (no ``run.json`` and no table)."""


class EmptyRunError(RunError):
    """The run has metadata but no rows yet."""


class CorruptRunError(RunError):
    """A file of the run is damaged somewhere other than its last line."""


class TruncatedRunWarning(UserWarning):
    """A partial last line (a run killed while writing) was dropped."""


class CorruptLineWarning(UserWarning):
    """A damaged line in the middle of a table was skipped (file and line named)."""


_MAX_LINE_WARNINGS = 10


class _Skipped:
    """Collects the damaged lines of one file and warns about them: one warning per line for
    the first ten, then one for the rest."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[tuple[int, str]] = []

    def add(self, lineno: int, problem: str) -> None:
        self.lines.append((lineno, problem))

    def warn(self, good: int) -> None:
        if not self.lines:
            return
        if not good:
            lineno, problem = self.lines[0]
            raise CorruptRunError(
                f"{self.path}, line {lineno}: {problem}; no line of the file is a good row: "
                "it was not written by gradlens or is damaged throughout"
            )
        self.lines.sort()
        for lineno, problem in self.lines[:_MAX_LINE_WARNINGS]:
            warnings.warn(
                f"{self.path}, line {lineno}: {problem}; skipped that line (damaged in the "
                "middle of the file, not by a killed run) and read the rest",
                CorruptLineWarning,
                stacklevel=4,
            )
        rest = self.lines[_MAX_LINE_WARNINGS:]
        if rest:
            warnings.warn(
                f"{self.path}: skipped {len(rest)} more damaged lines (lines "
                f"{rest[0][0]}..{rest[-1][0]}); {good} good rows read",
                CorruptLineWarning,
                stacklevel=4,
            )


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
    parquet = [(int(m.group(1)), f) for f in p.iterdir() if (m := _PARQUET_RE.match(f.name))]
    if parquet:
        found["parquet"] = [f for _, f in sorted(parquet)]
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


def _complete_bytes(path: Path) -> bytes:
    """The file's bytes up to its last newline; a partial last line is dropped with a
    warning."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        line = data.count(b"\n") + 1
        warnings.warn(
            f"{path}: dropped a partial last line (line {line}, {len(data) - cut} bytes): the "
            "run was killed while writing it; every earlier row is intact",
            TruncatedRunWarning,
            stacklevel=3,
        )
        data = data[:cut]
    return data


# ---------------------------------------------------------------------- the long table


def _read_csv(path: Path) -> pd.DataFrame:
    data = _complete_bytes(path)
    if not data:
        return _empty_stats()
    first = data[: data.find(b"\n")].decode("utf-8", "replace").rstrip("\r")
    if first != _CSV_HEADER:
        raise CorruptRunError(
            f"{path}, line 1: header {first[:80]!r} is not {_CSV_HEADER!r}; this file was not "
            "written by gradlens (or is damaged): move it out of the run directory"
        )
    if b"\x00" not in data:
        try:
            df = pd.read_csv(
                io.BytesIO(data),
                dtype={"step": "int64", "layer": str, "role": str, "stat": str,
                       "value": "float64"},
                keep_default_na=False,
                na_values={"value": ["nan", "NaN"]},  # empty: the line-by-line path
                engine="c",
            )
        except (ValueError, pd.errors.ParserError):
            pass
        else:
            if not any((df[c] == "").any() for c in _STR_COLUMNS):
                return df
    return _recover_csv(path, data)


def _recover_csv(path: Path, data: bytes) -> pd.DataFrame:
    """The good rows of a CSV table with damaged lines, each damaged line skipped with a
    :class:`CorruptLineWarning`."""
    import csv

    skipped = _Skipped(path)
    rows: list[tuple[int, str, str, str, float]] = []
    for lineno, raw in csv_records(data, len(STAT_COLUMNS)):
        line = raw.rstrip(b"\r")
        if not line:
            continue  # blank lines (pandas skips them too)
        problem = None
        if b"\x00" in line:
            problem = "a NUL byte in a field"
        else:
            try:
                text = line.decode("utf-8")
                fields = next(csv.reader([text], strict=True), [])
            except UnicodeDecodeError:
                problem = "not UTF-8 text"
            except csv.Error as err:
                problem = f"bad CSV quoting ({err})"
            else:
                problem = _csv_problem(fields)
        if problem:
            skipped.add(lineno, problem)
            continue
        rows.append((int(fields[0]), fields[1], fields[2], fields[3],
                     float(fields[4]) if fields[4] else math.nan))
    skipped.warn(len(rows))
    if not rows:
        return _empty_stats()
    return pd.DataFrame.from_records(rows, columns=list(STAT_COLUMNS))


def _csv_problem(fields: list[str]) -> str | None:
    if len(fields) != len(STAT_COLUMNS):
        return f"{len(fields)} fields instead of {len(STAT_COLUMNS)}"
    try:
        int(fields[0])
    except ValueError:
        return f"step {fields[0]!r} is not an integer"
    try:
        float(fields[4] or "nan")
    except ValueError:
        return f"value {fields[4]!r} is not a number"
    if not all(fields[1:4]):
        return "an empty layer, role or stat"
    return None


def _read_jsonl(path: Path, columns: tuple[str, ...],
                skipped: _Skipped) -> tuple[list[dict[str, Any]], list[int]]:
    """Records of a JSON-lines file (NaN/Infinity tokens allowed) that hold ``columns``, and
    their line numbers; other lines go to ``skipped``."""
    if path.is_dir():
        raise CorruptRunError(
            f"{path} is a directory, not a gradlens file; move it out of the run directory"
        )
    data = _complete_bytes(path)
    if not data:
        return [], []
    text = data.decode("utf-8", "replace")
    lines = text.split("\n")[:-1]
    records: list[Any] = []
    if "\x00" not in text and "\\u0000" not in text and "\ufffd" not in text:
        try:
            # One parse of the whole file as a JSON array: much faster than a loads per line.
            records = json.loads("[" + ",".join(lines) + "]")
            if len(records) != len(lines):
                raise ValueError("a line holds more or less than one value")
        except ValueError:
            records = []
    linenos = list(range(1, len(lines) + 1))
    if not records and lines:
        linenos = []
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if "\x00" in line or "\\u0000" in line:
                skipped.add(lineno, "a NUL byte in a field")
                continue
            if "\ufffd" in line:
                skipped.add(lineno, "not UTF-8 text")
                continue
            try:
                records.append(json.loads(line))
            except ValueError as err:
                skipped.add(lineno, f"not valid JSON ({err})")
                continue
            linenos.append(lineno)
    wanted = set(columns)
    good, good_lines = [], []
    for lineno, rec in zip(linenos, records, strict=True):
        if not isinstance(rec, dict) or not wanted <= rec.keys():
            missing = sorted(wanted - set(rec)) if isinstance(rec, dict) else list(columns)
            skipped.add(lineno, f"missing field(s) {missing}")
            continue
        good.append(rec)
        good_lines.append(lineno)
    return good, good_lines


def _jsonl_stats(path: Path) -> pd.DataFrame:
    skipped = _Skipped(path)
    records, linenos = _read_jsonl(path, STAT_COLUMNS, skipped)
    if not records:
        skipped.warn(0)
        return _empty_stats()
    df = pd.DataFrame.from_records(records, columns=list(STAT_COLUMNS))
    if df["value"].dtype == object:  # null (another writer's NaN) next to numbers
        df["value"] = df["value"].map(lambda v: math.nan if v is None else v)
    bad = _bad_rows(df)
    for i, problem in bad:
        skipped.add(linenos[i], problem)
    if bad:
        df = df.drop(index=[i for i, _ in bad]).reset_index(drop=True)
    skipped.warn(len(df))
    return df


def _bad_rows(df: pd.DataFrame) -> list[tuple[int, str]]:
    """Rows (0-based) whose step is not an integer, value not a number, or layer, role or stat
    not a non-empty string (without NUL), with the problem; empty when every row is fine."""
    from pandas.api import types

    def good_str(c: str) -> bool:
        col = df[c]
        return (types.is_string_dtype(col) and not col.isna().any() and not (col == "").any()
                and not col.str.contains("\x00", regex=False).any())

    if (types.is_integer_dtype(df["step"]) and types.is_numeric_dtype(df["value"])
            and not types.is_bool_dtype(df["value"]) and all(good_str(c) for c in _STR_COLUMNS)):
        return []  # the common case, decided on the dtypes
    step = pd.to_numeric(df["step"], errors="coerce")
    ok_step = (step.notna() & (step == np.floor(step.fillna(0)))).to_numpy(dtype=bool) & (
        df["step"].map(lambda v: not isinstance(v, (bool, str))).to_numpy(dtype=bool))
    ok_value = df["value"].map(
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)).to_numpy(dtype=bool)
    ok_nul = np.logical_and.reduce([
        df[c].map(lambda v: not (isinstance(v, str) and "\x00" in v)).to_numpy(dtype=bool)
        for c in _STR_COLUMNS])
    ok_str = np.logical_and.reduce([
        df[c].map(lambda v: isinstance(v, str) and v != "").to_numpy(dtype=bool)
        for c in _STR_COLUMNS])
    out = []
    for i in np.flatnonzero(~(ok_step & ok_value & ok_str & ok_nul)):
        i = int(i)
        if not ok_step[i]:
            out.append((i, f"step {_show(df['step'].iloc[i])} is not an integer"))
        elif not ok_value[i]:
            out.append((i, f"value {_show(df['value'].iloc[i])} is not a number"))
        elif not ok_nul[i]:
            out.append((i, "a NUL byte in a field"))
        else:
            out.append((i, "layer, role and stat must be non-empty strings"))
    return out


def _show(v: Any) -> str:
    return repr(v.item() if isinstance(v, np.generic) else v)


def _read_parquet(files: list[Path]) -> pd.DataFrame:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(
            f"{files[0].parent} holds a parquet table: reading it needs pyarrow "
            "(pip install 'gradlens[parquet]')"
        ) from err
    tables = []
    for f in files:
        try:
            t = pq.read_table(f)
        except (OSError, pa.ArrowException) as err:
            raise CorruptRunError(
                f"{f}: not a readable parquet file ({err}); move it out of the run directory"
            ) from None
        if t.column_names != list(STAT_COLUMNS):
            raise CorruptRunError(
                f"{f}: columns {t.column_names} are not {list(STAT_COLUMNS)}; move it out of "
                "the run directory"
            )
        types = {name: t.schema.field(name).type for name in STAT_COLUMNS}
        if not (pa.types.is_integer(types["step"])
                and (pa.types.is_floating(types["value"]) or pa.types.is_integer(types["value"]))
                and all(pa.types.is_string(types[c]) or pa.types.is_large_string(types[c])
                        for c in _STR_COLUMNS)):
            found = ", ".join(f"{n} {ty}" for n, ty in types.items())
            raise CorruptRunError(
                f"{f}: column types ({found}) are not step int64, layer/role/stat string, "
                "value float64; it was not written by gradlens: move it out of the run "
                "directory"
            )
        tables.append(t)
    return pa.concat_tables(tables, promote_options="permissive").to_pandas()


def _empty_stats() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64" if c == "step" else
                                      "float64" if c == "value" else str)
                         for c in STAT_COLUMNS})


def load_run(run_dir: PathLike, *, dedupe: bool = True) -> pd.DataFrame:
    """The long table of a run: columns ``step`` (int64), ``layer``, ``role``, ``stat``,
    ``value`` (float64), in the order written.

    A NaN ``value`` (``nan`` or empty in CSV; ``NaN`` or ``null`` in JSON lines) is a statistic that
    could not be computed at that step (e.g. a variance estimator with one micro-batch); the row
    is kept so that "not computable" differs from "not recorded". A damaged line in the middle
    of a CSV or JSON-lines table (including a NUL byte in a field) is skipped with a
    :class:`CorruptLineWarning` naming the file and the line; the rows around it are read.

    Args:
        run_dir: the run directory (a file inside it is accepted too).
        dedupe: when a ``(step, layer, stat)`` appears more than once (a resumed run that
            re-did steps after its last checkpoint), keep the last-written row.

    Raises:
        RunNotFoundError: the path does not exist or holds no run.
        EmptyRunError: the run has ``run.json`` but no rows yet.
        CorruptRunError: a table has no good row, a CSV header that is not gradlens's, or a
            parquet file with the wrong columns or column types (the file is named).
    """
    p = _run_dir(run_dir)
    tables = find_tables(p)
    if tables is None:
        if (p / RUN_META_FILE).exists():
            raise EmptyRunError(
                f"{p} has {RUN_META_FILE} but no rows yet: the lens writes rows at each flush "
                "(every log_every steps, and at close). Train longer, call lens.flush(), or "
                "check that the run did not fail before its first flush"
            )
        raise _not_a_run(p)
    fmt, files = tables
    if fmt == "csv":
        df = _read_csv(files[0])
    elif fmt == "jsonl":
        df = _jsonl_stats(files[0])
    else:
        df = _read_parquet(files)
    if df.empty:
        raise EmptyRunError(
            f"{p}: the table {files[0].name} has no rows yet: the lens writes rows at each "
            "flush (every log_every steps, and at close); train longer or call lens.flush()"
        )
    df = df[list(STAT_COLUMNS)].astype({"step": "int64", "value": "float64"})
    for c in _STR_COLUMNS:
        df[c] = df[c].astype(str)
    if dedupe:
        dup = df.duplicated(subset=["step", "layer", "stat"], keep="last")
        if dup.any():
            df = df[~dup.to_numpy()]
    return df.reset_index(drop=True)


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
        skipped = _Skipped(path)
        records, linenos = _read_jsonl(path, SPIKE_FIELDS[:5], skipped)  # layers, family, reason: optional
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
