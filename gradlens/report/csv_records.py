"""The records of a long-table CSV, line by line (the reader of damaged files): a layer name
with a newline sits in a quoted field that spans lines."""

from __future__ import annotations

import csv

__all__ = ["csv_records"]


def _n_fields(record: bytes) -> int:
    """Fields of one record under strict CSV quoting; -1 when it does not parse."""
    try:
        return len(next(csv.reader([record.decode("utf-8")], strict=True), []))
    except (UnicodeDecodeError, csv.Error):
        return -1


def csv_records(data: bytes, n_fields: int, most: int = 16) -> list[tuple[int, bytes]]:
    """``(line number, record)`` of the rows after the header. A line with an open quote goes
    on over the next lines (at most ``most`` in all) up to the first join that is one whole
    record of ``n_fields`` fields (a layer name with newlines); failing that, the line stands
    alone (damaged: the reader skips it, and the lines after it are read as they are)."""
    lines = data.split(b"\n")[1:-1]
    out: list[tuple[int, bytes]] = []
    i = 0
    while i < len(lines):
        end = i
        if lines[i].count(b'"') % 2:
            quotes = lines[i].count(b'"')
            for j in range(i + 1, min(len(lines), i + most)):
                quotes += lines[j].count(b'"')
                if quotes % 2 == 0 and _n_fields(b"\n".join(lines[i:j + 1])) == n_fields:
                    end = j
                    break
        out.append((i + 2, b"\n".join(lines[i:end + 1])))
        i = end + 1
    return out
