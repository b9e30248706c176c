"""Read a run directory written by the lens: the long table, the spike events, the metadata.

Only the files and :mod:`gradlens.schema` are used; no live training process, no TensorBoard.

- :func:`load_run` reads ``stats.csv``, ``stats.jsonl`` or ``stats-*.parquet``;
- :func:`load_spikes` reads ``spikes.jsonl``;
- :func:`load_meta` reads ``run.json``.

A run killed while writing can leave a partial last line in a CSV or JSON-lines file (the
only thing that can be cut is the line being written): it is dropped with a
:class:`TruncatedRunWarning`. A damaged line anywhere else raises :class:`CorruptRunError`
naming the file and the line. Errors subclass ``ValueError`` and say what to do.
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradlens.schema import (
    RUN_META_FILE,
    SPIKE_FIELDS,
    SPIKES_FILE,
    STAT_COLUMNS,
    STATS_BASENAME,
)

__all__ = [
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
    try:
        df = pd.read_csv(
            io.BytesIO(data),
            dtype={"step": "int64", "layer": str, "role": str, "stat": str, "value": "float64"},
            keep_default_na=False,
            na_values={"value": ["nan", "NaN"]},
            engine="c",
        )
    except (ValueError, pd.errors.ParserError):
        _raise_csv_error(path, data)
        raise  # pragma: no cover -- _raise_csv_error always raises
    if any((df[c] == "").any() for c in _STR_COLUMNS):
        _raise_csv_error(path, data)
    return df


def _raise_csv_error(path: Path, data: bytes) -> None:
    """Find the first bad line of a CSV table and raise a :class:`CorruptRunError` for it."""
    import csv

    text = data.decode("utf-8", "replace")
    for lineno, fields in enumerate(csv.reader(io.StringIO(text)), start=1):
        if lineno == 1 or not fields:
            continue  # the header (checked already), blank lines (pandas skips them too)
        problem = None
        if len(fields) != len(STAT_COLUMNS):
            problem = f"{len(fields)} fields instead of {len(STAT_COLUMNS)}"
        else:
            try:
                int(fields[0])
            except ValueError:
                problem = f"step {fields[0]!r} is not an integer"
            try:
                float(fields[4])
            except ValueError:
                problem = problem or f"value {fields[4]!r} is not a number"
            if problem is None and not all(fields[1:4]):
                problem = "an empty layer, role or stat"
        if problem:
            raise CorruptRunError(
                f"{path}, line {lineno}: {problem}. The table is damaged in the middle (not a "
                "run killed while writing, which only cuts the last line); repair or delete "
                "that line"
            )
    raise CorruptRunError(f"{path}: cannot be parsed as the gradlens long table")


def _read_jsonl(path: Path, columns: tuple[str, ...]) -> list[dict[str, Any]]:
    """Records of a JSON-lines file (NaN/Infinity tokens allowed), each checked for
    ``columns``."""
    data = _complete_bytes(path)
    if not data:
        return []
    text = data.decode("utf-8", "replace")
    lines = text.split("\n")[:-1]
    try:
        # One parse of the whole file as a JSON array: much faster than a loads per line.
        records = json.loads("[" + ",".join(lines) + "]")
        if len(records) != len(lines):
            raise ValueError("a line holds more or less than one value")
    except ValueError:
        records = []
        for lineno, line in enumerate(lines, start=1):
            try:
                records.append(json.loads(line))
            except ValueError as err:
                raise CorruptRunError(
                    f"{path}, line {lineno}: not valid JSON ({err}). The file is damaged in "
                    "the middle (a run killed while writing only cuts the last line); repair "
                    "or delete that line"
                ) from None
    wanted = set(columns)
    for lineno, rec in enumerate(records, start=1):
        if not isinstance(rec, dict) or not wanted <= rec.keys():
            missing = sorted(wanted - set(rec)) if isinstance(rec, dict) else list(columns)
            raise CorruptRunError(
                f"{path}, line {lineno}: missing field(s) {missing}; repair or delete that line"
            )
    return records


def _jsonl_stats(path: Path) -> pd.DataFrame:
    records = _read_jsonl(path, STAT_COLUMNS)
    if not records:
        return _empty_stats()
    df = pd.DataFrame.from_records(records, columns=list(STAT_COLUMNS))
    bad = _bad_rows(df)
    if bad is not None:
        i, problem = bad
        raise CorruptRunError(f"{path}, line {i + 1}: {problem}; repair or delete that line")
    return df


def _bad_rows(df: pd.DataFrame) -> tuple[int, str] | None:
    """First row (0-based) whose step is not an integer, value not a number, or layer, role or
    stat not a non-empty string; None when every row is fine."""
    from pandas.api import types

    def good_str(c: str) -> bool:
        col = df[c]
        return types.is_string_dtype(col) and not col.isna().any() and not (col == "").any()

    if (types.is_integer_dtype(df["step"]) and types.is_numeric_dtype(df["value"])
            and not types.is_bool_dtype(df["value"]) and all(good_str(c) for c in _STR_COLUMNS)):
        return None  # the common case, decided on the dtypes
    step = pd.to_numeric(df["step"], errors="coerce")
    ok_step = (step.notna() & (step == np.floor(step.fillna(0)))).to_numpy(dtype=bool) & (
        df["step"].map(lambda v: not isinstance(v, (bool, str))).to_numpy(dtype=bool))
    ok_value = df["value"].map(
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)).to_numpy(dtype=bool)
    ok_str = np.logical_and.reduce([
        df[c].map(lambda v: isinstance(v, str) and v != "").to_numpy(dtype=bool)
        for c in _STR_COLUMNS])
    ok = ok_step & ok_value & ok_str
    if ok.all():
        return None
    i = int(np.argmin(ok))
    if not ok_step[i]:
        return i, f"step {_show(df['step'].iloc[i])} is not an integer"
    if not ok_value[i]:
        return i, f"value {_show(df['value'].iloc[i])} is not a number"
    return i, "layer, role and stat must be non-empty strings"


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
        tables.append(t)
    return pa.concat_tables(tables).to_pandas()


def _empty_stats() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64" if c == "step" else
                                      "float64" if c == "value" else str)
                         for c in STAT_COLUMNS})


def load_run(run_dir: PathLike, *, dedupe: bool = True) -> pd.DataFrame:
    """The long table of a run: columns ``step`` (int64), ``layer``, ``role``, ``stat``,
    ``value`` (float64), in the order written.

    Args:
        run_dir: the run directory (a file inside it is accepted too).
        dedupe: when a ``(step, layer, stat)`` appears more than once (a resumed run that
            re-did steps after its last checkpoint), keep the last-written row.

    Raises:
        RunNotFoundError: the path does not exist or holds no run.
        EmptyRunError: the run has ``run.json`` but no rows yet.
        CorruptRunError: a table is damaged before its last line (file and line named).
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


def load_spikes(run_dir: PathLike) -> pd.DataFrame:
    """The spike events of a run: columns of ``schema.SPIKE_FIELDS`` (``layers`` holds lists
    of layer names). A run without ``spikes.jsonl`` had no events: the table is empty.

    Raises :class:`RunNotFoundError` for a path that is not a run and
    :class:`CorruptRunError` for a damaged line.
    """
    p = _run_dir(run_dir)
    path = p / SPIKES_FILE
    if not path.is_file():
        if not (p / RUN_META_FILE).exists() and find_tables(p) is None:
            raise _not_a_run(p)
        records: list[dict[str, Any]] = []
    else:
        records = _read_jsonl(path, SPIKE_FIELDS[:5])  # layers, family, reason: optional
    for lineno, rec in enumerate(records, start=1):
        layers = rec.get("layers", [])
        if not isinstance(layers, list):
            raise CorruptRunError(f"{path}, line {lineno}: 'layers' must be a list")
        rec["layers"] = [str(x) for x in layers]
        rec.setdefault("family", "")
        rec.setdefault("reason", "")
    df = pd.DataFrame.from_records(records, columns=list(SPIKE_FIELDS))
    try:
        df = df.astype({"step": "int64", "value": "float64", "score": "float64"})
    except (TypeError, ValueError) as err:
        raise CorruptRunError(f"{path}: a step, value or score is not a number ({err})") from None
    for c in ("layer", "kind", "family", "reason"):
        df[c] = df[c].astype(str)
    return df


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
