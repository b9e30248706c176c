"""A sink that keeps everything in Python lists: for tests and notebooks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from gradlens.schema import SPIKE_FIELDS, STAT_COLUMNS, SpikeEvent
from gradlens.sinks.base import Histogram, Sink, StatRow, StatRows

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["MemorySink"]


class MemorySink(Sink):
    """Keep rows, histograms and events in memory.

    Attributes:
        rows: every stat row, in the order written.
        histograms: every :class:`~gradlens.sinks.base.Histogram`.
        events: every :class:`~gradlens.schema.SpikeEvent`.
        meta: the run metadata given to :meth:`open` (``{}`` before).
        flushes: how many times :meth:`flush` was called.

    The data stays readable after :meth:`close`; only further writes are refused.
    """

    def __init__(self) -> None:
        self.rows: list[StatRow] = []
        self.histograms: list[Histogram] = []
        self.events: list[SpikeEvent] = []
        self.meta = {}
        self.flushes = 0

    def write_stats(self, rows: Sequence[StatRow]) -> None:
        self._ensure_open()
        if isinstance(rows, StatRows):  # the collector's: converted in C
            self.rows.extend(rows.tuples())
            return
        self.rows.extend(
            (int(s), str(layer), str(role), str(stat), float(v)) for s, layer, role, stat, v in rows
        )

    def write_histograms(self, hists: Sequence[Histogram]) -> None:
        self._ensure_open()
        self.histograms.extend(hists)

    def write_events(self, events: Sequence[SpikeEvent]) -> None:
        self._ensure_open()
        self.events.extend(events)

    def flush(self) -> None:
        self._check_not_closed()
        self.flushes += 1

    def frame(self) -> pd.DataFrame:
        """The rows as a long table: ``step`` int64, ``layer``, ``role``, ``stat``, ``value``
        float64 (the columns of ``schema.STAT_COLUMNS``, like ``report.load_run``)."""
        import pandas as pd

        df = pd.DataFrame.from_records(self.rows, columns=list(STAT_COLUMNS))
        return df.astype({"step": "int64", "value": "float64"})

    def events_frame(self) -> pd.DataFrame:
        """The events as a table with the columns of ``schema.SPIKE_FIELDS``."""
        import pandas as pd

        df = pd.DataFrame.from_records(
            [e.to_json() for e in self.events], columns=list(SPIKE_FIELDS)
        )
        return df.astype({"step": "int64", "value": "float64", "score": "float64"})
