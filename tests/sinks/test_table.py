"""TableSink: the three formats round-trip through report.load_run, kill-safety, reopening."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gradlens.report.load import TruncatedRunWarning, load_meta, load_run, load_spikes
from gradlens.schema import STAT_COLUMNS, TABLE_FORMATS
from gradlens.sinks.base import LogdirError
from gradlens.sinks.table import TableSink
from tests.sinks._records import same_values

FORMATS = pytest.mark.parametrize("fmt", TABLE_FORMATS)


def _stats_files(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith("stats"))


@FORMATS
def test_round_trip(tmp_path: Path, fmt: str, rows, events, meta) -> None:
    run = tmp_path / "run"
    sink = TableSink(run, format=fmt)
    sink.open(meta)
    started = load_meta(run)
    assert started["finished"] is False and started["table_format"] == fmt
    assert started["layers"] == meta["layers"]
    sink.write_stats(rows[:9])
    sink.flush()
    sink.write_stats(rows[9:])
    sink.write_events(events)
    sink.flush()
    sink.close()
    sink.close()  # idempotent

    df = load_run(run)
    assert tuple(df.columns) == STAT_COLUMNS
    assert str(df["step"].dtype) == "int64" and str(df["value"].dtype) == "float64"
    assert list(df.itertuples(index=False, name=None))[4:] == rows[4:]
    assert same_values(df["value"].tolist(), [r[4] for r in rows])  # NaN, inf, -inf, 1e-17
    assert df["value"].iloc[2] == math.inf and df["value"].iloc[3] == -math.inf

    sp = load_spikes(run)
    assert sp["step"].tolist() == [e.step for e in events]
    assert sp["layer"].tolist() == [e.layer for e in events]
    assert sp["layers"].tolist() == [list(e.layers) for e in events]
    assert same_values(sp["value"].tolist(), [e.value for e in events])
    assert sp["score"].iloc[3] == math.inf

    done = load_meta(run)
    assert done["finished"] is True and done["last_step"] == 3
    assert done["rows_written"] == len(rows) and done["events_written"] == len(events)
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_csv_header_once_and_parquet_one_file_per_flush(tmp_path: Path, rows) -> None:
    csv_sink = TableSink(tmp_path / "c", format="csv")
    pq_sink = TableSink(tmp_path / "p", format="parquet")
    for sink in (csv_sink, pq_sink):
        for step in (1, 2, 3):
            sink.write_stats([r for r in rows if r[0] == step])
            sink.flush()
        sink.flush()  # nothing pending: no empty file
        sink.close()
    text = (tmp_path / "c" / "stats.csv").read_text()
    assert text.count("step,layer,role,stat,value") == 1
    assert text.startswith("step,layer,role,stat,value\n")
    assert _stats_files(tmp_path / "p") == [
        "stats-000001.parquet", "stats-000002.parquet", "stats-000003.parquet"]
    assert len(load_run(tmp_path / "p")) == len(rows)


def test_rows_reach_the_file_at_flush(tmp_path: Path, rows) -> None:
    sink = TableSink(tmp_path, format="jsonl")
    sink.write_stats(rows)
    assert not (tmp_path / "stats.jsonl").exists()
    sink.flush()
    assert len((tmp_path / "stats.jsonl").read_text().splitlines()) == len(rows)
    sink.close()


def test_jsonl_is_one_object_per_line_with_nan_tokens(tmp_path: Path, rows) -> None:
    with TableSink(tmp_path, format="jsonl") as sink:
        sink.write_stats(rows)
    lines = (tmp_path / "stats.jsonl").read_text().splitlines()
    assert '"value": NaN' in lines[1] and '"value": Infinity' in lines[2]
    assert '"value": -Infinity' in lines[3]
    assert [json.loads(x)["layer"] for x in lines] == [r[1] for r in rows]


def test_close_without_writes_leaves_no_table(tmp_path: Path) -> None:
    sink = TableSink(tmp_path / "run")
    sink.close()
    sink.close()
    assert list((tmp_path / "run").iterdir()) == []


def test_write_after_close_raises(tmp_path: Path, rows) -> None:
    sink = TableSink(tmp_path)
    sink.close()
    with pytest.raises(RuntimeError, match="closed"):
        sink.write_stats(rows)


def test_non_writable_logdir_fails_at_construction(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    with pytest.raises(LogdirError, match="cannot create the log directory"):
        TableSink(blocker / "run")
    with pytest.raises(LogdirError, match="not a directory"):
        TableSink(blocker)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_logdir_fails_at_construction(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(LogdirError, match="not writable"):
            TableSink(tmp_path)
    finally:
        tmp_path.chmod(0o700)


def test_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown table format 'xlsx'"):
        TableSink(tmp_path, format="xlsx")


def test_parquet_without_pyarrow_says_what_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"pip install 'gradlens\[parquet\]'"):
        TableSink(tmp_path, format="parquet")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- reopening a run dir


@FORMATS
def test_reopening_appends_with_a_warning(tmp_path: Path, fmt: str, rows, events, meta) -> None:
    with TableSink(tmp_path, format=fmt) as sink:
        sink.open(meta)
        sink.write_stats([r for r in rows if r[0] == 1])
        sink.write_events(events[:1])
    with pytest.warns(UserWarning, match="appending"):
        sink = TableSink(tmp_path, format=fmt)
    assert sink.resumed and sink.last_step == 1
    with sink:
        sink.open(meta)
        sink.write_stats([r for r in rows if r[0] > 1])
        sink.write_events(events[1:])
    assert same_values(load_run(tmp_path)["value"].tolist(), [r[4] for r in rows])
    assert len(load_spikes(tmp_path)) == len(events)
    m = load_meta(tmp_path)
    assert m["resumed"] == 1 and m["last_step"] == 3 and m["finished"] is True
    if fmt == "csv":
        assert (tmp_path / "stats.csv").read_text().count("step,") == 1


def test_reopening_with_resume_flags(tmp_path: Path, rows) -> None:
    with TableSink(tmp_path) as sink:
        sink.write_stats(rows)
    with pytest.raises(FileExistsError, match="resume=True"):
        TableSink(tmp_path, resume=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TableSink(tmp_path, resume=True).close()
        TableSink(tmp_path / "fresh", resume=False).close()


def test_reopening_in_another_format_is_refused(tmp_path: Path, rows) -> None:
    with TableSink(tmp_path, format="jsonl") as sink:
        sink.write_stats(rows)
    with pytest.raises(ValueError, match="format='jsonl'"):
        TableSink(tmp_path, format="csv")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_reopening_cuts_a_partial_last_line(tmp_path: Path, fmt: str, rows, events) -> None:
    with TableSink(tmp_path, format=fmt) as sink:
        sink.write_stats(rows[:5])
        sink.write_events(events[:2])
    for name in (f"stats.{fmt}", "spikes.jsonl"):
        with open(tmp_path / name, "ab") as f:
            f.write(b'{"step": 7, "lay' if fmt == "jsonl" or name == "spikes.jsonl" else b"7,mod")
    with pytest.warns(UserWarning, match="partial last line"):
        sink = TableSink(tmp_path, format=fmt, resume=True)
    with sink:
        sink.write_stats(rows[5:])
        sink.write_events(events[2:])
    assert same_values(load_run(tmp_path)["value"].tolist(), [r[4] for r in rows])
    assert len(load_spikes(tmp_path)) == len(events)


def test_partial_csv_header_is_replaced(tmp_path: Path, rows) -> None:
    (tmp_path / "stats.csv").write_bytes(b"step,lay")
    with pytest.warns(UserWarning, match="partial last line"):
        sink = TableSink(tmp_path, resume=True)
    with sink:
        sink.write_stats(rows)
    assert len(load_run(tmp_path)) == len(rows)


def test_foreign_csv_is_refused(tmp_path: Path) -> None:
    (tmp_path / "stats.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not written by gradlens"):
        TableSink(tmp_path)


# ---------------------------------------------------------------------- kill-safety

_KILLED = textwrap.dedent(
    """
    import sys, time
    from gradlens.schema import SpikeEvent
    from gradlens.sinks.table import TableSink

    sinks = [TableSink(f"{sys.argv[1]}/{fmt}", format=fmt) for fmt in ("csv", "jsonl", "parquet")]
    for sink in sinks:
        sink.open({"name": "killed"})
        for step in range(1, 6):
            sink.write_stats([(step, f"layer{k}", "hidden", "grad_norm", step + k / 10)
                              for k in range(50)])
            sink.write_events([SpikeEvent(step, "global", "loss", 1.0, float("nan"))])
            sink.flush()
        sink.write_stats([(99, "layer0", "hidden", "grad_norm", 1.0)])  # never flushed
    print("flushed", flush=True)
    time.sleep(120)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_after_flush_leaves_every_flushed_row(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _KILLED, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.strip() == "flushed", proc.stderr.read() if proc.stderr else ""
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    for fmt in ("csv", "jsonl", "parquet"):
        run = tmp_path / fmt
        df = load_run(run)
        assert len(df) == 250 and df["step"].max() == 5
        assert df["value"].iloc[-1] == pytest.approx(5 + 49 / 10)
        assert len(load_spikes(run)) == 5
        assert load_meta(run)["finished"] is False and load_meta(run)["ended"] is None


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_killed_mid_write_loses_only_the_last_line(tmp_path: Path, fmt: str, rows) -> None:
    with TableSink(tmp_path, format=fmt) as sink:
        sink.write_stats(rows)
    path = tmp_path / f"stats.{fmt}"
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # cut inside the last row
    with pytest.warns(TruncatedRunWarning, match="partial last line"):
        df = load_run(tmp_path)
    assert len(df) == len(rows) - 1


def test_csv_lines_equal_the_csv_module(tmp_path: Path, meta) -> None:
    """The cached "layer,role,stat" fragments quote as csv.writer does (commas, quotes,
    newlines in names), and values are written as repr() writes them."""
    import csv
    import io

    rows = [(1, 'a,b "c"', "x\ny", "grad_norm", 0.1), (1, "plain", "", "s", math.nan),
            (2, 'a,b "c"', "x\ny", "grad_norm", -math.inf), (2, "plain", "", "s", 1e-300)]
    sink = TableSink(tmp_path / "run", "csv")
    sink.open(meta)
    sink.write_stats(rows)
    sink.close()
    ref = io.StringIO()
    csv.writer(ref, lineterminator="\n").writerows(rows)
    text = (tmp_path / "run" / "stats.csv").read_text()
    assert text.endswith(ref.getvalue()) and text.count("\n") == 1 + len(rows) + 2
