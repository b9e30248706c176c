"""Write errors in the middle of a run never leave a sink, never lose a good row, never leave
half a line; run.json says how the run ended and what was dropped."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest

from gradlens.report.load import load_meta, load_run, load_spikes
from gradlens.schema import SpikeEvent
from gradlens.sinks import _files
from gradlens.sinks.base import MultiSink
from gradlens.sinks.table import TableSink
from tests.faults._faults import Faults, recorded, write_warnings
from tests.sinks._records import sample_events, sample_rows

LINES = pytest.mark.parametrize("fmt", ["csv", "jsonl"])


def _step_rows(step: int) -> list[tuple[int, str, str, str, float]]:
    return [(step, f"layer{k}", "hidden", "grad_norm", step + k / 10) for k in range(5)]


def _flush_steps(sink: TableSink, steps) -> None:
    for step in steps:
        sink.write_stats(_step_rows(step))
        sink.flush()


def _strict_load(run: Path, **kw):
    """load_run with every warning an error: a half line or a bad line would fail here."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_run(run, **kw)


@LINES
@pytest.mark.parametrize("mode", ["open", "write", "partial"])
def test_fault_mid_run_warns_once_keeps_rows_and_retries(tmp_path: Path, fmt: str,
                                                          mode: str) -> None:
    run = tmp_path / "run"
    sink = TableSink(run, format=fmt)
    faults = Faults(sink.files)
    sink.open({"name": "t"})
    _flush_steps(sink, [1, 2])
    path = run / f"stats.{fmt}"
    good = path.read_bytes()
    faults.mode = mode
    with recorded() as caught:
        _flush_steps(sink, [3, 4, 5])  # three failing flushes: nothing raised
    texts = write_warnings(caught)
    assert len(texts) == 1, texts
    assert str(path) in texts[0]
    assert ("Operation not permitted" if mode == "open" else "No space left") in texts[0]
    assert faults.calls == 3
    assert path.read_bytes() == good  # a partial write was cut back to the last good line
    assert sink.rows_written == 10 and sink.rows_dropped == 0

    faults.mode = None
    with recorded() as caught:
        _flush_steps(sink, [6])  # the retry writes steps 3..6 at once
        sink.close()
    assert write_warnings(caught) == []
    df = _strict_load(run, dedupe=False)  # no row twice, none missing, no half line
    assert df["step"].tolist() == [s for s in range(1, 7) for _ in range(5)]
    assert df["value"].tolist() == [s + k / 10 for s in range(1, 7) for k in range(5)]
    meta = load_meta(run)
    assert meta["rows_written"] == 30 and meta["rows_dropped"] == 0
    assert meta["finished"] is True and meta["ended"] == "finished"


@LINES
def test_partial_write_whose_cut_back_fails_is_cut_at_the_retry(
        tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = TableSink(tmp_path, format=fmt)
    faults = Faults(sink.files)
    _flush_steps(sink, [1])
    faults.mode = "partial"

    def no_truncate(fd: int, size: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(_files.os, "ftruncate", no_truncate)
    with recorded():
        _flush_steps(sink, [2])
    half = (tmp_path / f"stats.{fmt}").read_bytes()
    assert not half.endswith(b"\n")  # the half line is on disk for now
    monkeypatch.undo()
    faults.mode = None
    _flush_steps(sink, [3])
    sink.close()
    df = _strict_load(tmp_path, dedupe=False)
    assert df["step"].tolist() == [s for s in (1, 2, 3) for _ in range(5)]


@LINES
def test_fault_after_the_data_was_written_is_not_duplicated(
        tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync fails after the bytes went out: they are cut back and written once, later."""
    sink = TableSink(tmp_path, format=fmt)
    _flush_steps(sink, [1])
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(_files.os, "fsync", failing_fsync)
    with recorded() as caught:
        _flush_steps(sink, [2])
    assert len(write_warnings(caught)) == 1 and "Input/output error" in write_warnings(caught)[0]
    monkeypatch.setattr(_files.os, "fsync", real_fsync)
    _flush_steps(sink, [3])
    sink.close()
    assert _strict_load(tmp_path, dedupe=False)["step"].tolist() == [
        s for s in (1, 2, 3) for _ in range(5)]


def test_backlog_cap_drops_the_oldest_steps_and_counts_them(tmp_path: Path) -> None:
    sink = TableSink(tmp_path, "csv", max_backlog_rows=10)  # two steps of five rows
    faults = Faults(sink.files)
    sink.open({})
    _flush_steps(sink, [1])
    faults.mode = "write"
    with recorded():
        _flush_steps(sink, [2, 3, 4, 5, 6])
    assert sink.rows_dropped == 15  # steps 2, 3, 4
    faults.mode = None
    sink.flush()
    sink.close()
    assert sorted(set(_strict_load(tmp_path)["step"])) == [1, 5, 6]
    meta = load_meta(tmp_path)
    assert meta["rows_dropped"] == 15 and meta["rows_written"] == 15


def test_close_while_failing_counts_what_is_lost(tmp_path: Path) -> None:
    sink = TableSink(tmp_path, "csv")
    faults = Faults(sink.files)
    sink.open({})
    _flush_steps(sink, [1])
    faults.mode = "write"
    sink.write_events(sample_events())
    with recorded() as caught:
        _flush_steps(sink, [2])
        sink.close()  # does not raise
    lost = [str(w.message) for w in caught if "closed with" in str(w.message)]
    assert lost == [f"gradlens: TableSink closed with 5 rows and 4 events it could not write "
                    f"to {tmp_path}; they are lost (5 rows and 4 events dropped in all)"]
    meta = load_meta(tmp_path)
    assert (meta["rows_written"], meta["rows_dropped"]) == (5, 5)
    assert (meta["events_written"], meta["events_dropped"]) == (0, 4)


def test_events_are_retried_too(tmp_path: Path) -> None:
    sink = TableSink(tmp_path, format="jsonl")
    faults = Faults(sink.files)
    faults.mode = "partial"
    events = sample_events()
    sink.write_events(events[:2])
    with recorded():
        sink.flush()
    assert not (tmp_path / "spikes.jsonl").exists() or \
        (tmp_path / "spikes.jsonl").read_bytes() == b""
    faults.mode = None
    sink.write_events(events[2:])
    sink.close()
    assert load_spikes(tmp_path)["kind"].tolist() == [e.kind for e in events]


def test_run_directory_deleted_then_restored(tmp_path: Path) -> None:
    run = tmp_path / "run"
    sink = TableSink(run)
    sink.open({"name": "deleted"})
    _flush_steps(sink, [1])
    shutil.rmtree(run)
    with recorded() as caught:
        _flush_steps(sink, [2])  # the directory is gone: the rows wait
    texts = write_warnings(caught)
    assert len(texts) == 1 and "No such file or directory" in texts[0]
    assert not run.exists()  # not recreated behind the user's back
    run.mkdir()
    _flush_steps(sink, [3])
    assert load_meta(run)["name"] == "deleted"  # run.json rewritten when the rows landed
    sink.close()
    df = _strict_load(run)  # a fresh file, with its header
    assert sorted(set(df["step"])) == [2, 3]
    assert load_meta(run)["finished"] is True


def test_parquet_failure_leaves_no_file_and_keeps_the_numbering(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pyarrow")
    sink = TableSink(tmp_path, format="parquet")
    _flush_steps(sink, [1])

    def full(path: Path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(sink, "_open_file_for_parquet", full)
    with recorded() as caught:
        _flush_steps(sink, [2, 3])
    assert len(write_warnings(caught)) == 1
    monkeypatch.undo()
    _flush_steps(sink, [4])
    sink.close()
    assert sorted(p.name for p in tmp_path.iterdir() if "parquet" in p.name) == [
        "stats-000001.parquet", "stats-000002.parquet"]
    assert _strict_load(tmp_path, dedupe=False)["step"].tolist() == [
        s for s in (1, 2, 3, 4) for _ in range(5)]


def test_how_the_run_ended(tmp_path: Path) -> None:
    killed = TableSink(tmp_path / "killed")
    killed.open({})
    killed.write_stats(sample_rows())
    killed.flush()
    meta = load_meta(tmp_path / "killed")  # what kill -9 leaves: nothing more is written
    assert meta["finished"] is False and meta["ended"] is None

    with pytest.raises(ZeroDivisionError), TableSink(tmp_path / "raised") as sink:
        sink.open({})
        sink.write_stats(sample_rows())
        raise ZeroDivisionError
    meta = load_meta(tmp_path / "raised")
    assert meta["finished"] is False and meta["ended"] == "interrupted"
    assert meta["rows_written"] == len(sample_rows())

    sink = TableSink(tmp_path / "sigterm")
    sink.open({})
    sink.close(ended="interrupted")
    sink.close(ended="finished")  # idempotent: the first call decides
    assert json.loads((tmp_path / "sigterm" / "run.json").read_text())["ended"] == "interrupted"
    with pytest.raises(ValueError, match=r"ended must be one of \('finished', 'interrupted'\), "
                                         r"got 'crashed'"):
        TableSink(tmp_path / "bad").close(ended="crashed")


def test_multisink_passes_ended_and_sums_dropped_rows(tmp_path: Path) -> None:
    a, b = TableSink(tmp_path / "a", "csv", max_backlog_rows=0), TableSink(tmp_path / "b")
    Faults(a.files).mode = "write"

    class OldStyle(TableSink):  # a user's sink written before close took ``ended``
        def close(self) -> None:  # type: ignore[override]
            super().close()

    c = OldStyle(tmp_path / "c")
    multi = MultiSink([a, b, c])
    multi.open({})
    with recorded():
        multi.write_stats(_step_rows(1))
        multi.flush()
    assert multi.rows_dropped == 5
    multi.close(ended="interrupted")
    assert load_meta(tmp_path / "a")["ended"] == "interrupted"
    assert load_meta(tmp_path / "b")["ended"] == "interrupted"
    assert load_meta(tmp_path / "c")["ended"] == "finished"


def test_spike_event_round_trip_after_fault(tmp_path: Path) -> None:
    sink = TableSink(tmp_path)
    faults = Faults(sink.files)
    faults.mode = "open"
    sink.write_events([SpikeEvent(1, "l", "grad_norm", 1.0, 9.5)])
    with recorded():
        sink.flush()
    faults.mode = None
    sink.close()
    assert load_spikes(tmp_path)["score"].tolist() == [9.5]
