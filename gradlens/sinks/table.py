"""The long-table sink: ``run.json``, ``stats.csv|.jsonl|-*.parquet`` and ``spikes.jsonl``.

Files (names from :mod:`gradlens.schema`):

- ``run.json``: the run metadata, written atomically (temporary file + ``os.replace``) at
  :meth:`~TableSink.open` with ``finished: false, ended: null`` (what a killed run keeps),
  rewritten at :meth:`~TableSink.close` with ``ended`` (``"finished"`` or ``"interrupted"``),
  ``finished`` (true only when it finished), ``last_step`` and the numbers of rows and events
  written and dropped.
- ``stats-*.parquet`` (the default format): one file per flush, written to a temporary name,
  fsync-ed and renamed (a killed run never leaves a partial file, a reader never sees a
  partial row), merged every 64 flushes into one range file grouped by statistic
  (:mod:`gradlens.table_parts`, :mod:`gradlens.sinks._parquet`), with the range's summary
  beside it for the dashboard's heatmaps (:mod:`gradlens.table_summary`). A merge that fails
  leaves the parts as they were. About 21 KB of table and 16 KB of summaries per logged step
  of a 7B-shaped model (``standard``).
- ``stats.csv`` (header once) or ``stats.jsonl`` (``format="csv" | "jsonl"``): one row per
  line, appended at each :meth:`~TableSink.flush`, then flushed and ``fsync``-ed: a run killed
  at any moment keeps every flushed row. Being killed *during* a flush can leave a partial
  last line; readers drop it with a warning and a resumed sink cuts it off before appending.
  A write that fails (disk full, ...) is cut back to the last good line and retried at the
  next flush (see :class:`TableSink`). ``gradlens export RUN --csv`` writes any run as CSV.
- ``spikes.jsonl``: one JSON object per event (``schema.SPIKE_FIELDS``), same rules as the
  table.

Non-finite values round-trip: CSV writes ``nan``, ``inf``, ``-inf``; JSON lines use the tokens
``NaN``, ``Infinity``, ``-Infinity`` that Python's :mod:`json` (and pandas) read back; parquet
stores IEEE floats.

Reopening a run directory that already holds rows (a resumed training run, or a second run
pointed at the same ``logdir``) **appends**, like TensorBoard does: the steps of both sessions
are kept, and :func:`gradlens.report.load_run` keeps the last-written row when a
``(step, layer, stat)`` appears twice. ``resume=None`` (default) appends with a warning,
``resume=True`` appends silently, ``resume=False`` refuses with ``FileExistsError``
(``GradLens`` itself appends with the warning; pass it ``sinks=[TableSink(logdir,
resume=...)]`` to choose). A
directory holding a table in another format is refused (pass that format or a new logdir).

One writer per run directory: the sink holds ``.gradlens.lock`` (:mod:`gradlens.sinks._lock`)
from its construction to :meth:`~TableSink.close`; a second writer gets
:class:`~gradlens.sinks._lock.RunLockedError` naming the holder's pid and host. The lock goes
with the process (kill -9 included), so resuming after a crash needs nothing; ``lock=False``
overrides it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from gradlens.schema import (
    RUN_META_FILE,
    SCHEMA_VERSION,
    SPIKES_FILE,
    STATS_BASENAME,
    TABLE_FORMATS,
    SpikeEvent,
)
from gradlens.sinks._files import AppendFiles, write_json_atomic
from gradlens.sinks._lock import RunLock
from gradlens.sinks._parquet import MERGE_EVERY
from gradlens.sinks._reopen import check_existing, clean_leftovers, existing_formats
from gradlens.sinks._text import CSV_HEADER as _CSV_HEADER
from gradlens.sinks._text import Backlog, CellText, csv_fields, json_fields, json_floats
from gradlens.sinks.base import (
    DEFAULT_BACKLOG_ROWS,
    Sink,
    StatRow,
    StatRows,
    WarnOnce,
    check_ended,
    ensure_writable_dir,
)
from gradlens.table_parts import list_parts

__all__ = ["TableSink", "write_json_atomic"]  # write_json_atomic: re-exported

PARQUET_HINT = "pip install pyarrow (or: pip install 'gradlens[parquet]')"
KEEP_ROWS = 1_000_000
"""Rows of the unmerged parquet parts kept in memory for their merge (at most about 32 MB;
64 logged steps of a 70B-shaped model's ``standard`` rows), which then reads nothing back;
past it the merge reads the parts."""


def _require_pyarrow() -> None:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"the parquet table format needs pyarrow: {PARQUET_HINT} (or use format='csv' or "
            "'jsonl')"
        ) from err


class TableSink(Sink):
    """Write the long table, the spike events and the run metadata to ``logdir``.

    Args:
        logdir: the run directory; created if needed. A path that cannot be created or written
            raises :class:`~gradlens.sinks.base.LogdirError` here, not at the first flush.
        format: ``"parquet"``, ``"csv"`` or ``"jsonl"``; None (default): the format of the
            table already in ``logdir`` (a run written by an older version resumes in CSV),
            else ``"parquet"``.
        resume: what to do when ``logdir`` already holds rows: ``None`` append with a warning,
            ``True`` append silently, ``False`` raise ``FileExistsError``.
        fsync: ``fsync`` the files at each :meth:`flush` (default). Turning it off is faster on
            network file systems but a machine crash (not a killed process) may lose rows.
        max_backlog_rows: how many rows (and, separately, events) to keep in memory while the
            files cannot be written (default 1,000,000, about 100 MB of CSV text).
        lock: hold ``.gradlens.lock`` so that no other process writes this directory (default);
            ``False`` writes without it (a deliberate second writer).

    A write error (disk full, run directory deleted, a read-only or immutable file) never
    leaves :meth:`write_stats`, :meth:`write_events`, :meth:`flush` or :meth:`close`: the sink
    warns once (``RuntimeWarning``, with the path and the error), keeps the unwritten rows,
    retries them at every later flush and, past ``max_backlog_rows``, drops the oldest steps,
    counting them in :attr:`rows_dropped` / :attr:`events_dropped` and in ``run.json``. Lines
    are written whole; after a failed write the file is truncated back to the end of its last
    good line, so a retry never follows a half line. A deleted run directory is not recreated:
    the rows wait in the backlog until it exists again (``run.json`` is then rewritten).

    Attributes:
        rows_written, events_written: rows and events this sink put on disk.
        rows_dropped, events_dropped: rows and events given up on (backlog cap, or still
            unwritten at :meth:`close`).
    """

    background = True

    def __init__(
        self,
        logdir: str | os.PathLike[str],
        format: str | None = None,
        *,
        resume: bool | None = None,
        fsync: bool = True,
        max_backlog_rows: int = DEFAULT_BACKLOG_ROWS,
        lock: bool = True,
    ) -> None:
        if format is None:
            here = Path(logdir).expanduser()
            found = existing_formats(here) if here.is_dir() else {}
            format = next(iter(found)) if len(found) == 1 else "parquet"
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
        if isinstance(max_backlog_rows, bool) or not isinstance(max_backlog_rows, int) \
                or max_backlog_rows < 0:
            raise ValueError(f"max_backlog_rows must be an int >= 0, got {max_backlog_rows!r}")
        self.max_backlog_rows = max_backlog_rows
        self.rows_dropped = 0
        self.events_dropped = 0
        self._stats = Backlog()
        self._cells = CellText()  # each (layer, role, stat)'s CSV or JSON fragment, cached
        self._columns: dict[Path, StatRows] = {}  # the unmerged parts written, for the merge
        self._events = Backlog()
        self.files = AppendFiles(fsync=fsync)  # the file seam (tests inject failures there)
        self._failing = False
        self._warn = WarnOnce()
        self._run: dict[str, Any] = {}
        self._previous_run: dict[str, Any] | None = None

        self.stats_path = self.logdir / f"{STATS_BASENAME}.{format}"
        self.spikes_path = self.logdir / SPIKES_FILE
        self.meta_path = self.logdir / RUN_META_FILE
        self.resumed = False
        self._lock = RunLock(self.logdir) if lock else None
        try:
            if self._lock is not None:  # without the lock, temporary files may be live
                clean_leftovers(self.logdir)
            existing = existing_formats(self.logdir)
            others = sorted(set(existing) - {format})
            if others:
                names = ", ".join(p.name for f in others for p in existing[f][:1])
                raise ValueError(
                    f"{self.logdir} already holds a {'/'.join(others)} table ({names}); pass "
                    f"format={others[0]!r} to continue that run, or use a new logdir"
                )
            parts = list_parts(self.logdir)
            self._parquet_index = parts[-1][1] if parts else 0
            merged = max((q[1] for q in parts if q[0] < q[1]), default=0)
            self._unmerged = [p for p in parts if p[0] == p[1] and p[0] > merged]
            self.resumed = check_existing(self, resume)
        except BaseException:
            self.abandon()
            raise

    def abandon(self, remove_files: bool = False) -> None:
        """Give up a sink that will not be used (a lens whose constructor failed): close the
        files and release the lock, writing nothing more; ``remove_files``: also delete the
        ``run.json`` that :meth:`open` wrote into a directory that held no run."""
        self.files.close()
        if remove_files and self._opened and not self.resumed:
            with contextlib.suppress(OSError):
                self.meta_path.unlink()
        if self._lock is not None:
            self._lock.release()
        self._closed = True

    # ------------------------------------------------------------------ Sink API

    def open(self, meta: Mapping[str, Any]) -> None:
        """Write ``run.json``: ``meta`` plus ``schema_version``, ``table_format``, ``started``,
        ``finished: false``, ``ended: null`` (and, when appending, ``resumed``: how many
        times). A run killed before :meth:`close` keeps this: it reads as not finished."""
        super().open(meta)
        prev = self._previous_run or {}
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._run = {
            **self.meta,
            "schema_version": SCHEMA_VERSION,
            "table_format": self.format,
            "started": prev.get("started", now) if self.resumed else now,
            "finished": False,
            "ended": None,
            "last_step": self.last_step,
        }
        if self.resumed:
            self._run["resumed"] = int(prev.get("resumed", 0)) + 1
            self._run["resumed_at"] = now
        self._write_meta()

    def write_stats(self, rows: Sequence[StatRow]) -> None:
        """Queue rows; they reach the file at the next :meth:`flush`."""
        self._ensure_open()
        if not len(rows):
            return
        backlog = self._stats
        for step, part in StatRows.of(rows).step_slices():
            if self.format == "parquet":
                items: list[Any] = [part]
            elif self.format == "csv":
                mids = self._cells.text(part, csv_fields)
                items = ["".join(map(f"{step},{{}},{{!r}}\n".format, mids,
                                     part.values.tolist()))]
            else:
                mids = self._cells.text(part, json_fields)
                items = ["".join(map(f'{{{{"step": {step}, {{}}, "value": {{}}}}}}\n'.format,
                                     mids, json_floats(part.values)))]
            backlog.add(step, items, len(part))
            self.last_step = step if self.last_step is None else max(self.last_step, step)
        if self._failing:
            self.rows_dropped += backlog.trim(self.max_backlog_rows)

    def write_events(self, events: Sequence[SpikeEvent]) -> None:
        """Queue spike events for ``spikes.jsonl``."""
        self._ensure_open()
        for e in events:
            self._events.add(int(e.step), [json.dumps(e.to_json(), allow_nan=True) + "\n"], 1)
        if self._failing:
            self.events_dropped += self._events.trim(self.max_backlog_rows)

    def flush(self) -> None:
        """Append what is queued, then flush and fsync the files. A write error is not raised:
        see the class docstring."""
        self._check_not_closed()
        self._drain()

    def close(self, ended: str | None = None) -> None:
        """Flush, close the files and record in ``run.json`` how the run ended: ``finished``
        (true only for ``ended="finished"``), ``ended`` (``"finished"`` or
        ``"interrupted"``), ``ended_at``, ``last_step``, ``rows_written`` /
        ``events_written`` (by this session), ``rows_dropped`` / ``events_dropped`` and
        ``flushes_coalesced`` (flushes the lens's writer merged while the disk was behind).
        Idempotent; never raises a write error."""
        ended = check_ended(ended)
        if self._closed:
            return
        if self._opened:
            self._drain()
        self.files.close()
        lost_rows, lost_events = self._stats.count, self._events.count
        self._stats.clear()
        self._events.clear()
        self.rows_dropped += lost_rows
        self.events_dropped += lost_events
        if lost_rows or lost_events:
            warnings.warn(
                f"gradlens: TableSink closed with {lost_rows} rows and {lost_events} events it "
                f"could not write to {self.logdir}; they are lost ({self.rows_dropped} rows and "
                f"{self.events_dropped} events dropped in all)",
                RuntimeWarning,
                stacklevel=2,
            )
        super().close(ended)
        if self._opened:
            self._run.update(
                finished=ended == "finished",
                ended=ended,
                ended_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                last_step=self.last_step,
                rows_written=self.rows_written,
                rows_dropped=self.rows_dropped,
                events_written=self.events_written,
                events_dropped=self.events_dropped,
                flushes_coalesced=self.flushes_coalesced,
            )
            self._write_meta()
        if self._lock is not None:
            self._lock.release()

    # ------------------------------------------------------------------ writing, and surviving

    def _drain(self) -> None:
        """Try to write both backlogs; a failure warns once, keeps the backlog (trimmed to the
        cap) and is retried at the next flush."""
        failed = False
        for path, backlog, kind in ((self.stats_path, self._stats, "rows"),
                                    (self.spikes_path, self._events, "events")):
            if not backlog.count:
                continue
            try:
                if kind == "rows" and self.format == "parquet":
                    self._write_parquet(backlog.items())
                else:
                    header = _CSV_HEADER.encode() if kind == "rows" and self.format == "csv" \
                        else b""
                    self.files.append(path, "".join(backlog.items()).encode("utf-8"), header)
            except Exception as err:  # I/O never stops training: keep, retry, count
                failed = True
                self._warn(self, path, err, backlog.count)
                dropped = backlog.trim(self.max_backlog_rows)
                if kind == "rows":
                    self.rows_dropped += dropped
                else:
                    self.events_dropped += dropped
                continue
            if kind == "rows":
                self.rows_written += backlog.count
            else:
                self.events_written += backlog.count
            backlog.clear()
        if self._failing and not failed and not self.meta_path.exists():
            self._write_meta()  # the run directory came back without its metadata
        self._failing = failed

    def _write_meta(self) -> None:
        """Rewrite ``run.json``; a failure warns (once) instead of raising."""
        try:
            write_json_atomic(self.meta_path, self._run)
        except Exception as err:
            self._warn(self, self.meta_path, err, self._stats.count)

    def _write_parquet(self, parts: list[StatRows]) -> None:
        from gradlens.sinks._parquet import columns_table, write_part

        rows = StatRows.concat(parts)
        index = self._parquet_index + 1
        path = write_part(self.logdir, index, columns_table(rows), fsync=self._fsync,
                          opener=self._open_file_for_parquet)
        self._parquet_index = index
        self._unmerged.append((index, index, path))
        if sum(map(len, self._columns.values())) + len(rows) <= KEEP_ROWS:
            self._columns[path] = rows
        if len(self._unmerged) >= MERGE_EVERY:
            self._merge()

    def _merge(self) -> None:
        """Merge the unmerged parts into one range file, from the rows kept in memory when
        every part was written by this sink (else read back); a failure warns (once) and
        leaves them as they are (they are complete files), to be merged with the next
        ones."""
        from gradlens.sinks._parquet import merge_parts

        kept = [self._columns.get(p[2]) for p in self._unmerged]
        try:
            merge_parts(self.logdir, self._unmerged, fsync=self._fsync,
                        columns=kept if all(c is not None for c in kept) else None)
        except Exception as err:
            self._warn(self, self.logdir / "stats-*.parquet (merge)", err, 0)
            return
        self._unmerged = []
        self._columns.clear()

    def _open_file_for_parquet(self, path: Path) -> BinaryIO:
        """The file seam of the parquet format: a new file for one flush's rows."""
        return open(path, "wb")
