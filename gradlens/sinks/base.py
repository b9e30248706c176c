"""What the file-writing sinks share: the log directory check, the one write-error warning,
the backlog cap, and :class:`MultiSink`. The interface itself (:class:`Sink`, the records) is
:mod:`gradlens.sink_api`, imported here for the sinks."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gradlens.kinds import layer_group
from gradlens.schema import SpikeEvent
from gradlens.sink_api import ENDED, Histogram, Sink, StatRow, StatRows, check_ended, close_sink

__all__ = [
    "DEFAULT_BACKLOG_ROWS",
    "ENDED",
    "Histogram",
    "LogdirError",
    "MultiSink",
    "Sink",
    "StatRow",
    "StatRows",
    "WarnOnce",
    "check_ended",
    "close_sink",
    "ensure_writable_dir",
    "layer_group",
]

DEFAULT_BACKLOG_ROWS = 1_000_000
"""Default cap of a sink's in-memory backlog while its files cannot be written, in rows (a
spike event or a histogram counts as one row): about 100 MB of CSV text; past it the oldest
steps are dropped and counted."""

class LogdirError(OSError):
    """The log directory cannot be created or written to."""


def ensure_writable_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and its parents) and prove it is writable by creating a file in it.

    ``os.access`` is not enough (it says yes to root on a read-only mount), so a probe file is
    created and removed. Raises :class:`LogdirError` with a message that says what to do.
    """
    p = Path(path).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise LogdirError(
            f"log directory {str(p)!r} exists and is not a directory; pass a directory path"
        ) from None
    except OSError as err:
        raise LogdirError(
            f"cannot create the log directory {str(p)!r}: {err.strerror or err}; pass a path "
            "you can write to (logdir=...)"
        ) from err
    try:
        fd, probe = tempfile.mkstemp(prefix=".gradlens-probe-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise LogdirError(
            f"the log directory {str(p)!r} is not writable: {err.strerror or err}; fix its "
            "permissions or pass another logdir"
        ) from err
    return p


class WarnOnce:
    """The one ``RuntimeWarning`` a sink gives when its files cannot be written."""

    def __init__(self) -> None:
        self.warned = False

    def __call__(self, sink: Sink, path: object, err: BaseException, backlog: int) -> None:
        if self.warned:
            return
        self.warned = True
        warnings.warn(
            f"gradlens: {type(sink).__name__} cannot write {path}: {type(err).__name__}: {err}. "
            f"Training goes on; {backlog} unwritten rows are kept in memory and retried at each "
            "flush (the oldest steps are dropped past the backlog cap and counted in run.json "
            "as rows_dropped). Free disk space or restore the directory. This warning is not "
            "repeated.",
            RuntimeWarning,
            stacklevel=4,
        )


class MultiSink(Sink):
    """Fan every call out to several sinks, in order.

    ``close`` closes every sink even when one fails, then re-raises the first error.
    """

    def __init__(self, sinks: Iterable[Sink]) -> None:
        self.sinks: list[Sink] = list(sinks)
        self.meta = {}

    def open(self, meta: Mapping[str, Any]) -> None:
        super().open(meta)
        for s in self.sinks:
            s.open(meta)

    def write_stats(self, rows: Sequence[StatRow]) -> None:
        self._check_not_closed()
        for s in self.sinks:
            s.write_stats(rows)

    def write_histograms(self, hists: Sequence[Histogram]) -> None:
        self._check_not_closed()
        for s in self.sinks:
            s.write_histograms(hists)

    def write_events(self, events: Sequence[SpikeEvent]) -> None:
        self._check_not_closed()
        for s in self.sinks:
            s.write_events(events)

    def flush(self) -> None:
        self._check_not_closed()
        for s in self.sinks:
            s.flush()

    @property  # type: ignore[override]
    def rows_dropped(self) -> int:
        """The sum over the sinks."""
        return sum(s.rows_dropped for s in self.sinks)

    def close(self, ended: str | None = None) -> None:
        if self._closed:
            return
        ended = check_ended(ended)
        super().close(ended)
        first: BaseException | None = None
        for s in self.sinks:
            try:
                close_sink(s, ended)
            except Exception as err:
                first = first or err
        if first is not None:
            raise first
