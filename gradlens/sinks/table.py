"""The long-table sink: ``run.json``, ``stats.csv|.jsonl|-*.parquet`` and ``spikes.jsonl``.

Files (names from :mod:`gradlens.schema`):

- ``run.json``: the run metadata, written atomically (temporary file + ``os.replace``) at
  :meth:`~TableSink.open` with ``finished: false``, rewritten at :meth:`~TableSink.close` with
  ``finished: true``, ``last_step`` and the number of rows and events written.
- ``stats.csv`` (header once) or ``stats.jsonl``: one row per line, appended at each
  :meth:`~TableSink.flush`, then flushed and ``fsync``-ed: a run killed at any moment keeps every
  flushed row. Being killed *during* a flush can leave a partial last line; readers drop it with
  a warning and a resumed sink cuts it off before appending.
- ``stats-000001.parquet``, ``stats-000002.parquet``, ...: one file per flush, each written to
  a temporary name and renamed, so a killed run never leaves a partial file (needs pyarrow).
- ``spikes.jsonl``: one JSON object per event (``schema.SPIKE_FIELDS``), same rules as the
  table.

Non-finite values round-trip: CSV writes ``nan``, ``inf``, ``-inf``; JSON lines use the tokens
``NaN``, ``Infinity``, ``-Infinity`` that Python's :mod:`json` (and pandas) read back; parquet
stores IEEE floats.

Reopening a run directory that already holds rows (a resumed training run, or a second run
pointed at the same ``logdir``) **appends**, like TensorBoard does: the steps of both sessions
are kept, and :func:`gradlens.report.load_run` keeps the last-written row when a
``(step, layer, stat)`` appears twice. ``resume=None`` (default) appends with a warning,
``resume=True`` appends silently, ``resume=False`` refuses with ``FileExistsError``. A
directory holding a table in another format is refused (pass that format or a new logdir).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from gradlens.schema import (
    RUN_META_FILE,
    SCHEMA_VERSION,
    SPIKES_FILE,
    STAT_COLUMNS,
    STATS_BASENAME,
    TABLE_FORMATS,
    SpikeEvent,
)
from gradlens.sinks.base import Sink, StatRow, ensure_writable_dir

__all__ = ["TableSink", "write_json_atomic"]

PARQUET_HINT = "pip install 'gradlens[parquet]'"
_PARQUET_RE = re.compile(rf"^{re.escape(STATS_BASENAME)}-(\d+)\.parquet$")
_CSV_HEADER = ",".join(STAT_COLUMNS) + "\n"


def _require_pyarrow() -> None:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"the parquet table format needs pyarrow: {PARQUET_HINT} (or use format='csv' or "
            "'jsonl')"
        ) from err


def _fsync_dir(path: Path) -> None:
    """Make a file creation or rename durable (POSIX); a no-op where directories cannot be
    opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and ``os.replace``: a reader
    sees the old file or the new one, never a partial one. Non-JSON values are written as
    ``str``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _json_float(v: float) -> str:
    if math.isfinite(v):
        return repr(v)
    if math.isnan(v):
        return "NaN"
    return "Infinity" if v > 0 else "-Infinity"


def _cut_partial_last_line(path: Path) -> bool:
    """Truncate ``path`` after its last newline; True when a partial line was cut off."""
    size = path.stat().st_size
    if size == 0:
        return False
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return False
        keep = 0
        pos = size
        while pos > 0:
            start = max(0, pos - 65536)
            f.seek(start)
            chunk = f.read(pos - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return True


def _last_line(path: Path) -> bytes:
    """The last complete line of ``path`` (without its newline), or ``b""``."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - 65536))
        tail = f.read()
    lines = tail.rstrip(b"\n").rsplit(b"\n", 1)
    return lines[-1] if lines else b""


def _existing_formats(logdir: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for fmt in ("csv", "jsonl"):
        p = logdir / f"{STATS_BASENAME}.{fmt}"
        if p.is_file():
            found[fmt] = [p]
    parquet = sorted(
        (p for p in logdir.iterdir() if _PARQUET_RE.match(p.name)),
        key=lambda p: int(_PARQUET_RE.match(p.name).group(1)),  # type: ignore[union-attr]
    )
    if parquet:
        found["parquet"] = parquet
    return found


class TableSink(Sink):
    """Write the long table, the spike events and the run metadata to ``logdir``.

    Args:
        logdir: the run directory; created if needed. A path that cannot be created or written
            raises :class:`~gradlens.sinks.base.LogdirError` here, not at the first flush.
        format: ``"csv"`` (default), ``"jsonl"`` or ``"parquet"`` (needs pyarrow).
        resume: what to do when ``logdir`` already holds rows: ``None`` append with a warning,
            ``True`` append silently, ``False`` raise ``FileExistsError``.
        fsync: ``fsync`` the files at each :meth:`flush` (default). Turning it off is faster on
            network file systems but a machine crash (not a killed process) may lose rows.
    """

    def __init__(
        self,
        logdir: str | os.PathLike[str],
        format: str = "csv",
        *,
        resume: bool | None = None,
        fsync: bool = True,
    ) -> None:
        if format not in TABLE_FORMATS:
            raise ValueError(f"unknown table format {format!r}; use one of {TABLE_FORMATS}")
        if format == "parquet":
            _require_pyarrow()
        self.logdir = ensure_writable_dir(logdir)
        self.format = format
        self.meta = {}
        self._fsync = fsync
        self.rows_written = 0
        self.events_written = 0
        self.last_step: int | None = None
        self._pending_lines: list[str] = []
        self._pending_rows: list[StatRow] = []
        self._pending_events: list[str] = []
        self._stats_fh: BinaryIO | None = None
        self._spikes_fh: BinaryIO | None = None
        self._run: dict[str, Any] = {}
        self._previous_run: dict[str, Any] | None = None

        self.stats_path = self.logdir / f"{STATS_BASENAME}.{format}"
        self.spikes_path = self.logdir / SPIKES_FILE
        self.meta_path = self.logdir / RUN_META_FILE
        existing = _existing_formats(self.logdir)
        others = sorted(set(existing) - {format})
        if others:
            names = ", ".join(p.name for f in others for p in existing[f][:1])
            raise ValueError(
                f"{self.logdir} already holds a {'/'.join(others)} table ({names}); pass "
                f"format={others[0]!r} to continue that run, or use a new logdir"
            )
        self._parquet_index = (
            int(_PARQUET_RE.match(existing["parquet"][-1].name).group(1))  # type: ignore[union-attr]
            if "parquet" in existing else 0
        )
        self.resumed = self._check_existing(resume)

    # ------------------------------------------------------------------ reopening a run dir

    def _check_existing(self, resume: bool | None) -> bool:
        """Apply the reopening rule; repair a partial last line. True when appending."""
        has_rows = False
        if self.format == "parquet":
            has_rows = self._parquet_index > 0
        elif self.stats_path.is_file() and self.stats_path.stat().st_size > 0:
            if self.format == "csv":
                with open(self.stats_path, "rb") as f:
                    head = f.read(len(_CSV_HEADER) + 1)
                if head.startswith(_CSV_HEADER.encode()):
                    has_rows = len(head) > len(_CSV_HEADER)
                elif len(head) >= len(_CSV_HEADER) or b"\n" in head:
                    raise ValueError(
                        f"{self.stats_path} does not start with the header "
                        f"{_CSV_HEADER.strip()!r}: it was not written by gradlens; move it "
                        "away or use a new logdir"
                    )
            else:
                has_rows = True
        has_events = self.spikes_path.is_file() and self.spikes_path.stat().st_size > 0
        if (has_rows or has_events) and resume is False:
            raise FileExistsError(
                f"{self.logdir} already holds the rows of a run; pass resume=True to append to "
                "it, or use a new logdir"
            )
        if (has_rows or has_events) and resume is None:
            warnings.warn(
                f"gradlens: {self.logdir} already holds a run; appending to it (like "
                "TensorBoard). Pass resume=True to silence this, resume=False to refuse, or "
                "use a new logdir.",
                UserWarning,
                stacklevel=3,
            )
        lines_files = [self.spikes_path]
        if self.format != "parquet":
            lines_files.append(self.stats_path)
        for path in lines_files:
            if path.is_file() and _cut_partial_last_line(path):
                warnings.warn(
                    f"gradlens: cut a partial last line off {path} (a run killed while "
                    "writing) before appending",
                    UserWarning,
                    stacklevel=3,
                )
        if not (has_rows or has_events):
            return False
        self.last_step = self._existing_last_step()
        try:
            with open(self.meta_path, encoding="utf-8") as f:
                self._previous_run = json.load(f)
        except (OSError, ValueError):
            self._previous_run = None
        return True

    def _existing_last_step(self) -> int | None:
        try:
            if self.format == "parquet":
                if not self._parquet_index:
                    return None
                import pyarrow.compute as pc
                import pyarrow.parquet as pq

                last = self.logdir / f"{STATS_BASENAME}-{self._parquet_index:06d}.parquet"
                return int(pc.max(pq.read_table(last, columns=["step"])["step"]).as_py())
            if not self.stats_path.is_file():
                return None
            line = _last_line(self.stats_path)
            if not line or line + b"\n" == _CSV_HEADER.encode():
                return None
            if self.format == "csv":
                return int(line.split(b",", 1)[0])
            return int(json.loads(line)["step"])
        except Exception:  # the step is informative only; a damaged table is the reader's job
            return None

    # ------------------------------------------------------------------ Sink API

    def open(self, meta: Mapping[str, Any]) -> None:
        """Write ``run.json``: ``meta`` plus ``schema_version``, ``table_format``, ``started``,
        ``finished: false`` (and, when appending, ``resumed``: how many times)."""
        super().open(meta)
        prev = self._previous_run or {}
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._run = {
            **self.meta,
            "schema_version": SCHEMA_VERSION,
            "table_format": self.format,
            "started": prev.get("started", now) if self.resumed else now,
            "finished": False,
            "last_step": self.last_step,
        }
        if self.resumed:
            self._run["resumed"] = int(prev.get("resumed", 0)) + 1
            self._run["resumed_at"] = now
        write_json_atomic(self.meta_path, self._run)

    def write_stats(self, rows: Sequence[StatRow]) -> None:
        """Queue rows; they reach the file at the next :meth:`flush`."""
        self._ensure_open()
        if not rows:
            return
        last = self.last_step
        if self.format == "parquet":
            for s, layer, role, stat, v in rows:
                self._pending_rows.append((int(s), str(layer), str(role), str(stat), float(v)))
            last = max(r[0] for r in self._pending_rows[-len(rows):])
        elif self.format == "csv":
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerows((int(s), layer, role, stat, float(v)) for s, layer, role, stat, v in rows)
            self._pending_lines.append(buf.getvalue())
            last = max(int(r[0]) for r in rows)
        else:
            dumps = json.dumps
            self._pending_lines.append("".join(
                f'{{"step": {int(s)}, "layer": {dumps(str(layer))}, "role": {dumps(str(role))}, '
                f'"stat": {dumps(str(stat))}, "value": {_json_float(float(v))}}}\n'
                for s, layer, role, stat, v in rows
            ))
            last = max(int(r[0]) for r in rows)
        self.last_step = last if self.last_step is None else max(self.last_step, last)
        self.rows_written += len(rows)

    def write_events(self, events: Sequence[SpikeEvent]) -> None:
        """Queue spike events for ``spikes.jsonl``."""
        self._ensure_open()
        self._pending_events.extend(
            json.dumps(e.to_json(), allow_nan=True) + "\n" for e in events
        )
        self.events_written += len(events)

    def flush(self) -> None:
        """Append what is queued, then flush and fsync the files."""
        self._check_not_closed()
        if self._pending_lines:
            if self._stats_fh is None:
                self._stats_fh = self._open_append(self.stats_path)
                if self.format == "csv" and self.stats_path.stat().st_size == 0:
                    self._pending_lines.insert(0, _CSV_HEADER)
            self._write(self._stats_fh, self._pending_lines)
            self._pending_lines = []
        if self._pending_rows:
            self._write_parquet(self._pending_rows)
            self._pending_rows = []
        if self._pending_events:
            if self._spikes_fh is None:
                self._spikes_fh = self._open_append(self.spikes_path)
            self._write(self._spikes_fh, self._pending_events)
            self._pending_events = []

    def close(self) -> None:
        """Flush, close the files and mark the run finished in ``run.json``. Idempotent."""
        if self._closed:
            return
        try:
            if self._opened:
                self.flush()
        finally:
            for fh in (self._stats_fh, self._spikes_fh):
                if fh is not None:
                    fh.close()
            self._stats_fh = self._spikes_fh = None
            super().close()
        if self._opened:
            self._run.update(
                finished=True,
                last_step=self.last_step,
                ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                rows_written=self.rows_written,
                events_written=self.events_written,
            )
            write_json_atomic(self.meta_path, self._run)

    # ------------------------------------------------------------------ helpers

    def _open_append(self, path: Path) -> BinaryIO:
        new = not path.exists()
        fh = open(path, "ab")  # noqa: SIM115 -- kept open for the run, closed by close()
        if new:
            _fsync_dir(self.logdir)
        return fh

    def _write(self, fh: BinaryIO, chunks: list[str]) -> None:
        fh.write("".join(chunks).encode("utf-8"))
        fh.flush()
        if self._fsync:
            os.fsync(fh.fileno())

    def _write_parquet(self, rows: list[StatRow]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = list(zip(*rows, strict=True))
        table = pa.table(
            {
                "step": pa.array(cols[0], pa.int64()),
                "layer": pa.array(cols[1], pa.string()),
                "role": pa.array(cols[2], pa.string()),
                "stat": pa.array(cols[3], pa.string()),
                "value": pa.array(cols[4], pa.float64()),
            }
        )
        self._parquet_index += 1
        final = self.logdir / f"{STATS_BASENAME}-{self._parquet_index:06d}.parquet"
        tmp = self.logdir / f".{final.name}.{os.getpid()}.tmp"
        pq.write_table(table, tmp)
        if self._fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, final)
        if self._fsync:
            _fsync_dir(self.logdir)
