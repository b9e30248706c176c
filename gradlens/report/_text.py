"""Reading the text tables: ``stats.csv`` and ``stats.jsonl`` (and ``spikes.jsonl``'s lines).

A partial last line (a run killed while writing) is dropped with a :class:`TruncatedRunWarning`;
a damaged line elsewhere is skipped with a :class:`CorruptLineWarning` naming the file and the
line; a file with no good line raises :class:`CorruptRunError`.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradlens.report._errors import (
    CorruptLineWarning,
    CorruptRunError,
    TruncatedRunWarning,
)
from gradlens.report.csv_records import csv_records
from gradlens.schema import STAT_COLUMNS

__all__ = ["Skipped", "empty_stats", "jsonl_stats", "read_csv", "read_jsonl"]

_CSV_HEADER = ",".join(STAT_COLUMNS)
_STR_COLUMNS = ("layer", "role", "stat")


_MAX_LINE_WARNINGS = 10


class Skipped:
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


def read_csv(path: Path) -> pd.DataFrame:
    data = _complete_bytes(path)
    if not data:
        return empty_stats()
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

    skipped = Skipped(path)
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
        return empty_stats()
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


def read_jsonl(path: Path, columns: tuple[str, ...],
                skipped: Skipped) -> tuple[list[dict[str, Any]], list[int]]:
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


def jsonl_stats(path: Path) -> pd.DataFrame:
    skipped = Skipped(path)
    records, linenos = read_jsonl(path, STAT_COLUMNS, skipped)
    if not records:
        skipped.warn(0)
        return empty_stats()
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


def empty_stats() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64" if c == "step" else
                                      "float64" if c == "value" else str)
                         for c in STAT_COLUMNS})
