"""Reopening a run directory: what a table sink finds there, and what it does about it.

The rule (see :class:`~gradlens.sinks.table.TableSink`): a directory that holds rows or events
is appended to (``resume=None`` warns, ``True`` is silent, ``False`` refuses); a partial last
line of a text file is cut off first; what a killed writer left of the parquet table
(temporary files, parts already merged) is deleted by the next writer holding the lock.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from gradlens.schema import STATS_BASENAME
from gradlens.sinks._files import cut_partial_last_line
from gradlens.sinks._text import CSV_HEADER as _CSV_HEADER
from gradlens.sinks._text import last_line
from gradlens.table_parts import list_parts

if TYPE_CHECKING:
    from gradlens.sinks.table import TableSink

__all__ = ["check_existing", "clean_leftovers", "existing_formats"]


def existing_formats(logdir: Path) -> dict[str, list[Path]]:
    """The tables in ``logdir``: ``{format: files}``."""
    found: dict[str, list[Path]] = {}
    for fmt in ("csv", "jsonl"):
        p = logdir / f"{STATS_BASENAME}.{fmt}"
        if p.is_file():
            found[fmt] = [p]
    parquet = [p[2] for p in list_parts(logdir)]
    if parquet:
        found["parquet"] = parquet
    return found


def clean_leftovers(logdir: Path) -> None:
    """Delete what a killed writer of this directory left: temporary files, and parts a
    merge had already copied into a range file."""
    covered: list[Path] = []
    list_parts(logdir, covered=covered)
    leftovers = covered + [p for p in logdir.glob(f".{STATS_BASENAME}-*.tmp")]
    for p in leftovers:
        with contextlib.suppress(OSError):
            p.unlink()



def check_existing(sink: TableSink, resume: bool | None) -> bool:
    """Apply the reopening rule to ``sink``'s directory (refuse, warn or append; a foreign CSV
    refused), repair a partial last line, and read the last step and the previous
    ``run.json``. True when appending."""
    has_rows = False
    if sink.format == "parquet":
        has_rows = sink._parquet_index > 0
    elif sink.stats_path.is_file() and sink.stats_path.stat().st_size > 0:
        if sink.format == "csv":
            with open(sink.stats_path, "rb") as f:
                head = f.read(len(_CSV_HEADER) + 1)
            if head.startswith(_CSV_HEADER.encode()):
                has_rows = len(head) > len(_CSV_HEADER)
            elif len(head) >= len(_CSV_HEADER) or b"\n" in head:
                raise ValueError(
                    f"{sink.stats_path} does not start with the header "
                    f"{_CSV_HEADER.strip()!r}: it was not written by gradlens; move it "
                    "away or use a new logdir"
                )
        else:
            has_rows = True
    has_events = sink.spikes_path.is_file() and sink.spikes_path.stat().st_size > 0
    if (has_rows or has_events) and resume is False:
        raise FileExistsError(
            f"{sink.logdir} already holds the rows of a run; pass TableSink(..., "
            "resume=True) to append to it, or use a new logdir"
        )
    if (has_rows or has_events) and resume is None:
        warnings.warn(
            f"gradlens: {sink.logdir} already holds a run; appending to it (like "
            "TensorBoard): the earlier steps are kept and load_run keeps the last-written "
            "row of a step written twice, as a resumed run needs. To start afresh, use a "
            "new logdir. To choose explicitly, give the lens the sink yourself: "
            "GradLens(model, optimizer, sinks=[TableSink(logdir, resume=True)]) appends "
            "silently, resume=False refuses.",
            UserWarning,
            stacklevel=3,
        )
    lines_files = [sink.spikes_path]
    if sink.format != "parquet":
        lines_files.append(sink.stats_path)
    for path in lines_files:
        if path.is_file() and cut_partial_last_line(path):
            warnings.warn(
                f"gradlens: cut a partial last line off {path} (a run killed while "
                "writing) before appending",
                UserWarning,
                stacklevel=3,
            )
    if not (has_rows or has_events):
        return False
    sink.last_step = _existing_last_step(sink)
    try:
        with open(sink.meta_path, encoding="utf-8") as f:
            sink._previous_run = json.load(f)
    except (OSError, ValueError):
        sink._previous_run = None
    return True

def _existing_last_step(sink: TableSink) -> int | None:
    try:
        if sink.format == "parquet":
            if not sink._parquet_index:
                return None
            import pyarrow.compute as pc
            import pyarrow.parquet as pq

            last = list_parts(sink.logdir)[-1][2]
            return int(pc.max(pq.read_table(last, columns=["step"])["step"]).as_py())
        if not sink.stats_path.is_file():
            return None
        line = last_line(sink.stats_path)
        if not line or line + b"\n" == _CSV_HEADER.encode():
            return None
        if sink.format == "csv":
            return int(line.split(b",", 1)[0])
        return int(json.loads(line)["step"])
    except Exception:  # the step is informative only; a damaged table is the reader's job
        return None
