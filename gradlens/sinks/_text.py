"""The queued rows of the table sink, and the line encodings of its text formats (CSV, JSON
lines)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gradlens.schema import STAT_COLUMNS
from gradlens.sink_api import StatRows

__all__ = ["CSV_HEADER", "Backlog", "CellText", "csv_fields", "json_fields", "json_float",
           "json_floats", "last_line"]

CSV_HEADER = ",".join(STAT_COLUMNS) + "\n"


class Backlog:
    """Queued items (text chunks or parquet rows) grouped by step, oldest first; ``count`` is
    the number of rows they hold."""

    def __init__(self) -> None:
        self._chunks: deque[tuple[int, list[Any], int]] = deque()
        self.count = 0

    def add(self, step: int, items: list[Any], n: int) -> None:
        self._chunks.append((step, items, n))
        self.count += n

    def trim(self, cap: int) -> int:
        """Drop the oldest steps until at most ``cap`` rows remain; the number dropped."""
        dropped = 0
        while self.count > cap and self._chunks:
            step = self._chunks[0][0]
            while self._chunks and self._chunks[0][0] == step:
                n = self._chunks.popleft()[2]
                self.count -= n
                dropped += n
        return dropped

    def items(self) -> list[Any]:
        return [x for _, items, _ in self._chunks for x in items]

    def clear(self) -> None:
        self._chunks.clear()
        self.count = 0


def csv_fields(*fields: str) -> str:
    """``fields`` as one CSV line fragment, quoted as :func:`csv.writer` quotes them."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerow(fields)  # a "\r" or "\n" in a field: quoted
    return buf.getvalue()[:-2]


def json_fields(layer: str, role: str, stat: str) -> str:
    """The middle of a JSON line: ``"layer": ..., "role": ..., "stat": ...``."""
    dumps = json.dumps
    return f'"layer": {dumps(layer)}, "role": {dumps(role)}, "stat": {dumps(stat)}'


class CellText:
    """The text fragment of each row's ``(layer, role, stat)`` (``make(layer, role, stat)``),
    made once per distinct cell and kept per label and statistic table: a flush's rows then
    cost one array look-up, not a formatting per row."""

    def __init__(self) -> None:
        self._tables: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def text(self, rows: StatRows, make: Callable[[str, str, str], str]) -> list[str]:
        n_stats = len(rows.stats)
        key = (make, rows.labels, rows.stats)
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) >= 16:
                self._tables.clear()
            size = len(rows.labels) * n_stats
            table = self._tables[key] = (np.empty(size, object), np.zeros(size, bool))
        texts, made = table
        cells = rows.label_ids * n_stats + rows.stat_ids
        for c in np.unique(cells[~made[cells]]).tolist():
            layer, role = rows.labels[c // n_stats]
            texts[c] = make(layer, role, rows.stats[c % n_stats])
            made[c] = True
        return texts[cells].tolist()


def json_floats(values: np.ndarray) -> list[str]:
    """:func:`json_float` of each value."""
    out = list(map(repr, values.tolist()))
    for i in np.flatnonzero(~np.isfinite(values)).tolist():
        out[i] = json_float(float(values[i]))
    return out


def json_float(v: float) -> str:
    if math.isfinite(v):
        return repr(v)
    if math.isnan(v):
        return "NaN"
    return "Infinity" if v > 0 else "-Infinity"


def last_line(path: Path) -> bytes:
    """The last complete line of ``path`` (without its newline), or ``b""``."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - 65536))
        tail = f.read()
    lines = tail.rstrip(b"\n").rsplit(b"\n", 1)
    return lines[-1] if lines else b""
