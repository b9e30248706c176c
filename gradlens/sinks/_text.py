"""The queued rows of the table sink, and the line encodings of its text formats (CSV, JSON
lines)."""

from __future__ import annotations

import csv
import io
import math
from collections import deque
from pathlib import Path
from typing import Any

from gradlens.schema import STAT_COLUMNS

__all__ = ["CSV_HEADER", "Backlog", "csv_fields", "json_float", "last_line"]

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
