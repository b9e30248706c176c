"""The parquet table's file names, shared by its writer (sinks) and its readers (report, plugin):
one part per flush, merged into ranges.

- ``stats-000007.parquet``: the rows of the 7th flush.
- ``stats-000001-000064.parquet``: flushes 1..64 merged (:mod:`gradlens.sinks._parquet`),
  rows grouped by statistic (one row group per statistic, so that reading one statistic
  skips the others), write order kept within a statistic.

Every file is written under a temporary name (``.stats-*.tmp``), fsync-ed and renamed, so a
reader or a killed run never meets a partial file. A merge renames the range file into place
before it deletes the parts it covers; a part covered by a range file is ignored (and deleted
by the next writer), so a run killed between the two steps reads the same rows.
"""

from __future__ import annotations

import re
from pathlib import Path

from gradlens.schema import STATS_BASENAME

__all__ = ["PART_RE", "Part", "list_parts", "part_name"]

PART_RE = re.compile(rf"^{re.escape(STATS_BASENAME)}-(\d+)(?:-(\d+))?\.parquet$")

Part = tuple[int, int, Path]  # (first flush, last flush, file)


def part_name(first: int, last: int | None = None) -> str:
    if last is None or last == first:
        return f"{STATS_BASENAME}-{first:06d}.parquet"
    return f"{STATS_BASENAME}-{first:06d}-{last:06d}.parquet"


def list_parts(logdir: Path, *, covered: list[Path] | None = None) -> list[Part]:
    """The parts of the table in flush order, without those covered by a range file (appended
    to ``covered`` when given)."""
    found: list[Part] = []
    try:
        names = [p.name for p in logdir.iterdir()]
    except OSError:
        return []
    for name in names:
        m = PART_RE.match(name)
        if m:
            first = int(m.group(1))
            found.append((first, int(m.group(2) or first), logdir / name))
    # wider first at the same start: a range wins over the parts it merged
    found.sort(key=lambda p: (p[0], -p[1]))
    out: list[Part] = []
    reach = 0
    for part in found:
        if part[1] <= reach:
            if covered is not None:
                covered.append(part[2])
            continue
        out.append(part)
        reach = max(reach, part[1])
    return out
