"""Sink I/O on a writer thread: the training thread formats nothing and waits for no disk.

A flush still makes its ONE device-to-host transfer and builds its records on the training
thread (validity warnings are raised there); the sinks that declare ``background = True``
(the CSV/JSONL/Parquet table and TensorBoard) then get the records on one writer thread, in
flush order. Sinks that do not (the in-memory sink, user sinks by default) are written at once.

Guarantees: every submitted flush reaches its sinks before :meth:`BackgroundWriter.drain`
returns (``GradLens.close()`` drains before closing the sinks); at most ``max_pending``
flushes wait in the queue (a slower disk then slows the training, as synchronous writes
would, instead of growing memory); an ``OSError`` is the sink's warning, as in the training
thread, and any other exception is one warning and the loss of that flush for that sink, never
a dead writer. A killed process (SIGKILL) loses the flushes still queued: at most
``max_pending``, usually none.
"""

from __future__ import annotations

import queue
import threading
import warnings
from typing import Any

from gradlens.core import run as R


class BackgroundWriter:
    """One daemon thread writing submitted flushes to their sinks, in order."""

    def __init__(self, max_pending: int = 4) -> None:
        self._queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None
        self._warned = False

    def submit(self, sink: Any, rows: list, hists: list, events: list) -> None:
        """Queue one flush for ``sink`` (blocks while ``max_pending`` flushes are queued)."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="gradlens-writer",
                                            daemon=True)
            self._thread.start()
        self._queue.put((sink, rows, hists, events))

    def drain(self) -> None:
        """Wait until every submitted flush is written."""
        if self._thread is not None:
            self._queue.join()

    def close(self) -> None:
        """Drain, then stop the thread."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._queue.join()
        self._thread.join()
        self._thread = None

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                sink, rows, hists, events = item
                try:
                    R.write_sink(sink, rows, hists, events)
                except Exception as err:  # a bug in a sink must not stop the writer
                    if not self._warned:
                        self._warned = True
                        warnings.warn(f"gradlens: {type(sink).__name__} failed on the writer "
                                      f"thread ({type(err).__name__}: {err}); that flush is "
                                      "lost for it, training goes on", RuntimeWarning,
                                      stacklevel=1)
            finally:
                self._queue.task_done()
