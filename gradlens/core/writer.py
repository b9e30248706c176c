"""Sink I/O on a writer thread: the training thread formats nothing and never waits for a disk.

A flush still makes its ONE device-to-host transfer and builds its records on the training
thread (validity warnings are raised there); the sinks that declare ``background = True``
(the CSV/JSONL/Parquet table and TensorBoard) then get the records on one writer thread, in
flush order. Sinks that do not (the in-memory sink, user sinks by default) are written at once.

The policy when the disk is slower than the training (a busy network filesystem, a stall):

- ``submit`` never blocks. Up to ``max_pending`` flushes wait as they are; past that, a new
  flush is **coalesced** into the last one waiting for the same sink (one bigger write later:
  nothing is lost, the disk gets fewer, larger writes), counted per sink in
  ``flushes_coalesced`` (``run.json``).
- The rows waiting for one sink are capped at ``max_rows`` (the sink's ``max_backlog_rows``,
  else :data:`DEFAULT_MAX_ROWS`): past it the oldest flushes' rows and histograms are
  **dropped** and counted in the sink's ``rows_dropped`` (``run.json``). Events (spikes,
  validity, skipped and guarded steps) are never dropped.
- The first time the writer falls behind it warns once, naming the run directory and the
  backlog; it catches up by itself when the disk does (the coalesced writes drain).
- Everything on device (statistics, detectors, events, the guard) runs on the training
  thread, at the training's pace, whatever the disk does.

Guarantees: every submitted flush (less what was dropped, counted) reaches its sinks before
:meth:`BackgroundWriter.drain` returns (``GradLens.close()`` drains before closing the sinks);
an ``OSError`` is the sink's warning, as in the training thread, and any other exception is one
warning and the loss of that flush for that sink, never a dead writer. A killed process
(SIGKILL) loses the flushes still queued (usually none).
"""

from __future__ import annotations

import threading
import warnings
from collections import deque
from typing import Any

from gradlens.core import run as R
from gradlens.sink_api import StatRows

DEFAULT_MAX_ROWS = 1_000_000
"""Rows (and histograms) a sink without ``max_backlog_rows`` may have waiting on the writer."""


class _Pending:
    """The records of one or more flushes waiting for one sink, as the flushes' own lists
    (shared between sinks: never mutated, only referenced)."""

    __slots__ = ("coalesced", "dropped", "events", "hists", "n", "rows", "sink")

    def __init__(self, sink: Any, rows: list, hists: list, events: list) -> None:
        self.sink = sink
        self.rows, self.hists, self.events = [rows], [hists], [events]
        self.n = len(rows) + len(hists)
        self.dropped = 0  # rows and histograms given up on, added to the sink's rows_dropped
        self.coalesced = 0  # flushes merged into this one


class BackgroundWriter:
    """One daemon thread writing submitted flushes to their sinks, in order per sink."""

    def __init__(self, max_pending: int = 4, max_rows: int | None = None) -> None:
        self.max_pending = max_pending
        self.max_rows = max_rows
        self._items: deque[_Pending] = deque()
        self._waiting: dict[int, int] = {}  # id(sink) -> rows and histograms queued for it
        self._cond = threading.Condition()
        self._busy = False  # the thread is writing an item it took
        self._stop = False
        self._thread: threading.Thread | None = None
        self._warned = False
        self._behind_warned = False

    def submit(self, sink: Any, rows: list, hists: list, events: list) -> None:
        """Queue one flush for ``sink``; never waits (see the module docstring)."""
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._stop = False
                self._thread = threading.Thread(target=self._run, name="gradlens-writer",
                                                daemon=True)
                self._thread.start()
            self._waiting[id(sink)] = self._waiting.get(id(sink), 0) + len(rows) + len(hists)
            last = next((it for it in reversed(self._items) if it.sink is sink), None)
            if last is None or len(self._items) < self.max_pending:
                self._items.append(_Pending(sink, rows, hists, events))
            else:
                last.rows.append(rows)
                last.hists.append(hists)
                last.events.append(events)
                last.n += len(rows) + len(hists)
                last.coalesced += 1
                self._trim(sink)
                if not self._behind_warned:
                    self._behind_warned = True
                    self._warn_behind(sink)
            self._cond.notify()

    def _trim(self, sink: Any) -> None:
        """Drop the oldest rows and histograms waiting for ``sink`` past its cap."""
        cap = self.max_rows if self.max_rows is not None else getattr(
            sink, "max_backlog_rows", DEFAULT_MAX_ROWS)
        if self._waiting[id(sink)] <= cap:
            return
        parts = [(it, j) for it in self._items if it.sink is sink for j in range(len(it.rows))]
        for it, j in parts[:-1]:  # the oldest first; never the flush just submitted
            if self._waiting[id(sink)] <= cap:
                return
            n = len(it.rows[j]) + len(it.hists[j])
            it.rows[j], it.hists[j] = [], []
            it.n -= n
            it.dropped += n
            self._waiting[id(sink)] -= n

    def _warn_behind(self, sink: Any) -> None:
        where = getattr(sink, "logdir", None) or type(sink).__name__
        waiting = sum(it.n for it in self._items)
        warnings.warn(
            f"gradlens: the disk of {where} is slower than the training: {len(self._items)} "
            f"flushes ({waiting} rows) wait to be written. Training does not wait: later "
            "flushes are coalesced until the disk catches up, and past the backlog cap the "
            "oldest rows are dropped (run.json counts flushes_coalesced and rows_dropped; "
            "events are kept). This warning is not repeated.", RuntimeWarning, stacklevel=5)

    @property
    def backlog(self) -> int:
        """Flushes waiting (coalesced ones count once)."""
        with self._cond:
            return len(self._items)

    def drain(self) -> None:
        """Wait until every submitted flush is written."""
        with self._cond:
            while (self._items or self._busy) and self._thread is not None \
                    and self._thread.is_alive():
                self._cond.wait()

    def close(self) -> None:
        """Drain, then stop the thread."""
        if self._thread is None:
            return
        self.drain()
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()
        self._thread = None

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._stop:
                    self._cond.wait()
                if not self._items:
                    return
                item = self._items.popleft()
                self._waiting[id(item.sink)] -= item.n
                self._busy = True
            try:
                self._write(item)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _write(self, item: _Pending) -> None:
        sink = item.sink
        if item.dropped:
            sink.rows_dropped = getattr(sink, "rows_dropped", 0) + item.dropped
        if item.coalesced:
            sink.flushes_coalesced = getattr(sink, "flushes_coalesced", 0) + item.coalesced
        rows = StatRows.concat(item.rows)
        hists = [h for part in item.hists for h in part]
        events = [e for part in item.events for e in part]
        try:
            R.write_sink(sink, rows, hists, events)
        except Exception as err:  # a bug in a sink must not stop the writer
            if not self._warned:
                self._warned = True
                warnings.warn(f"gradlens: {type(sink).__name__} failed on the writer "
                              f"thread ({type(err).__name__}: {err}); that flush is "
                              "lost for it, training goes on", RuntimeWarning,
                              stacklevel=1)
