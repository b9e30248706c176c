"""MemorySink: rows, events and histograms kept in lists; frames in the schema's columns."""

from __future__ import annotations

import math

from gradlens.schema import SPIKE_FIELDS, STAT_COLUMNS
from gradlens.sinks.base import Histogram
from gradlens.sinks.memory import MemorySink
from tests.sinks._records import same_values


def test_memory_sink_round_trip(rows, events, meta) -> None:
    sink = MemorySink()
    sink.open(meta)
    sink.write_stats(rows[:10])
    sink.write_stats(rows[10:])
    sink.write_events(events)
    hist = Histogram(2, "lm_head.weight", "unit_rms_hist", [0.0, 0.5, 1.0], [3.0, 4.0])
    sink.write_histograms([hist])
    sink.flush()
    sink.close()

    df = sink.frame()
    assert tuple(df.columns) == STAT_COLUMNS
    assert str(df["step"].dtype) == "int64" and str(df["value"].dtype) == "float64"
    assert df["step"].tolist() == [r[0] for r in rows]
    assert df["layer"].tolist() == [r[1] for r in rows]
    assert same_values(df["value"].tolist(), [r[4] for r in rows])
    assert math.isinf(df["value"].iloc[2]) and df["value"].iloc[3] == -math.inf

    assert sink.events == events
    ev = sink.events_frame()
    assert tuple(ev.columns) == SPIKE_FIELDS
    assert ev["layers"].iloc[2] == list(events[2].layers)
    assert same_values(ev["score"].tolist(), [e.score for e in events])
    assert sink.histograms == [hist]
    assert sink.meta["layers"][0]["group"] == "embedding"


def test_memory_sink_frames_are_empty_but_typed() -> None:
    sink = MemorySink()
    df = sink.frame()
    assert df.empty and tuple(df.columns) == STAT_COLUMNS
    assert str(df["step"].dtype) == "int64"
    assert sink.events_frame().empty


def test_memory_sink_works_without_open(rows) -> None:
    sink = MemorySink()
    sink.write_stats(rows)
    assert sink.opened and sink.meta == {}
    assert len(sink.frame()) == len(rows)
