"""report.load: reading run directories, and the errors for everything that is not one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gradlens.report import (
    CorruptLineWarning,
    CorruptPartWarning,
    CorruptRunError,
    EmptyRunError,
    RunError,
    RunNotFoundError,
    TruncatedRunWarning,
    load_meta,
    load_run,
    load_spikes,
)
from gradlens.schema import SPIKE_FIELDS, STAT_COLUMNS, TABLE_FORMATS
from gradlens.sinks.table import TableSink
from tests.sinks._records import layer_dicts, same_values, sample_events, sample_rows


def _run(path: Path, fmt: str = "csv", rows=None, events=None) -> Path:
    with TableSink(path, format=fmt) as sink:
        sink.open({"name": "r", "layers": layer_dicts()})
        sink.write_stats(sample_rows() if rows is None else rows)
        sink.write_events(sample_events() if events is None else events)
    return path


@pytest.mark.parametrize("fmt", TABLE_FORMATS)
def test_load_every_format(tmp_path: Path, fmt: str) -> None:
    rows = sample_rows()
    run = _run(tmp_path / fmt, fmt)
    df = load_run(run)
    assert tuple(df.columns) == STAT_COLUMNS
    assert df.dtypes["step"] == "int64" and df.dtypes["value"] == "float64"
    assert df["layer"].tolist() == [r[1] for r in rows]
    assert same_values(df["value"].tolist(), [r[4] for r in rows])
    spikes = load_spikes(run)
    assert tuple(spikes.columns) == SPIKE_FIELDS and len(spikes) == 4
    assert load_meta(run)["layers"] == layer_dicts()
    # a file inside the run directory is accepted too
    assert len(load_run(run / "run.json")) == len(rows)


def test_errors_are_value_errors() -> None:
    for cls in (RunNotFoundError, EmptyRunError, CorruptRunError):
        assert issubclass(cls, RunError) and issubclass(cls, ValueError)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(RunNotFoundError, match="does not exist"):
        load_run(tmp_path / "nope")
    with pytest.raises(RunNotFoundError, match="does not exist"):
        load_spikes(tmp_path / "nope")
    with pytest.raises(RunNotFoundError, match="does not exist"):
        load_meta(tmp_path / "nope")


def test_not_a_run(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(RunNotFoundError, match="not a gradlens run"):
        load_run(tmp_path)
    with pytest.raises(RunNotFoundError, match="not a gradlens run"):
        load_spikes(tmp_path)
    with pytest.raises(RunNotFoundError, match="is a file"):
        load_run(tmp_path / "notes.txt")


def test_not_a_run_hints(tmp_path: Path) -> None:
    (tmp_path / "events.out.tfevents.1.host").write_bytes(b"")
    with pytest.raises(RunNotFoundError, match="TensorBoard events only"):
        load_run(tmp_path)
    parent = tmp_path / "sweep"
    _run(parent / "adamw")
    with pytest.raises(RunNotFoundError, match="adamw"):
        load_run(parent)


def test_empty_run(tmp_path: Path) -> None:
    sink = TableSink(tmp_path, "csv")
    sink.open({"name": "empty"})
    live = load_run(tmp_path)  # a live run before its first flush: empty, not an error
    assert live.empty and tuple(live.columns) == STAT_COLUMNS
    assert live.dtypes["step"] == "int64" and live.dtypes["value"] == "float64"
    assert load_spikes(tmp_path).empty
    assert load_meta(tmp_path)["finished"] is False
    (tmp_path / "stats.csv").write_text("step,layer,role,stat,value\n")
    assert load_run(tmp_path).empty
    sink.close()  # ended without a row: now an error that says so
    with pytest.raises(EmptyRunError, match="no rows yet"):
        load_run(tmp_path)
    (tmp_path / "stats.csv").unlink()
    with pytest.raises(EmptyRunError, match="no rows yet"):
        load_run(tmp_path)


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ("2,model.x,hidden,grad_norm,0.5,7", "6 fields"),
        ("2,model.x,hidden,grad_norm", "4 fields"),
        ("two,model.x,hidden,grad_norm,0.5", "step 'two'"),
        ("2,model.x,hidden,grad_norm,big", "value 'big'"),
        ("2,,hidden,grad_norm,0.5", "an empty layer"),
    ],
)
def test_corrupt_csv_line_is_skipped_naming_file_and_line(tmp_path: Path, bad: str,
                                                          problem: str) -> None:
    _run(tmp_path)
    path = tmp_path / "stats.csv"
    lines = path.read_text().splitlines()
    lines.insert(5, bad)  # line 6 of the file
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(CorruptLineWarning, match=rf"stats\.csv, line 6: {problem}.*skipped"):
        df = load_run(tmp_path, dedupe=False)
    assert list(df.itertuples(index=False, name=None))[4:] == sample_rows()[4:]


def test_corrupt_csv_header(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "stats.csv").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(CorruptRunError, match="line 1"):
        load_run(tmp_path)


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ('{"step": 2, "layer": "x", "role": "hidden", "stat": ', "not valid JSON"),
        ('{"step": 2, "layer": "x", "role": "hidden", "value": 1.0}', r"missing field\(s\) \['stat'\]"),
        ('{"step": 2.5, "layer": "x", "role": "hidden", "stat": "s", "value": 1.0}', "step 2.5"),
        ('{"step": 2, "layer": "x", "role": "hidden", "stat": "s", "value": "1"}', "value '1'"),
        ("[1, 2]", "missing field"),
    ],
)
def test_corrupt_jsonl_line_is_skipped_naming_file_and_line(tmp_path: Path, bad: str,
                                                            problem: str) -> None:
    _run(tmp_path, "jsonl")
    path = tmp_path / "stats.jsonl"
    lines = path.read_text().splitlines()
    lines.insert(2, bad)  # line 3
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(CorruptLineWarning, match=rf"stats\.jsonl, line 3: {problem}"):
        df = load_run(tmp_path, dedupe=False)
    assert list(df.itertuples(index=False, name=None))[4:] == sample_rows()[4:]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_truncated_last_line_is_dropped_with_a_warning(tmp_path: Path, fmt: str) -> None:
    rows = sample_rows()
    _run(tmp_path, fmt)
    for name in (f"stats.{fmt}", "spikes.jsonl"):
        path = tmp_path / name
        path.write_bytes(path.read_bytes()[:-5])
    with pytest.warns(TruncatedRunWarning, match=rf"stats\.{fmt}: dropped a partial last line"):
        df = load_run(tmp_path)
    assert same_values(df["value"].tolist(), [r[4] for r in rows[:-1]])
    with pytest.warns(TruncatedRunWarning, match="spikes.jsonl"):
        assert len(load_spikes(tmp_path)) == 3


def test_only_a_truncated_line_is_an_empty_run(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "stats.jsonl").write_text('{"step": 1, "la')
    with pytest.warns(TruncatedRunWarning), pytest.raises(EmptyRunError):
        load_run(tmp_path)


def test_corrupt_parquet_file(tmp_path: Path) -> None:
    _run(tmp_path, "parquet")
    (tmp_path / "stats-000002.parquet").write_bytes(b"PAR1 not really")
    with pytest.warns(CorruptPartWarning, match=r"stats-000002\.parquet"):
        df = load_run(tmp_path)  # the damaged flush is lost, the others are read
    assert same_values(df["value"].tolist(), [r[4] for r in sample_rows()])
    (tmp_path / "stats-000001.parquet").write_bytes(b"PAR1 neither")
    with pytest.warns(CorruptPartWarning), pytest.raises(CorruptRunError, match="none of its 2"):
        load_run(tmp_path)


def test_tables_in_two_formats(tmp_path: Path) -> None:
    _run(tmp_path, "csv")
    (tmp_path / "stats.jsonl").write_text("")
    with pytest.raises(CorruptRunError, match="several formats"):
        load_run(tmp_path)


def test_duplicate_rows_of_a_resumed_run_keep_the_last(tmp_path: Path) -> None:
    first = [(s, "w", "hidden", "grad_norm", float(s)) for s in (1, 2, 3)]
    again = [(s, "w", "hidden", "grad_norm", 10.0 * s) for s in (3, 4)]
    _run(tmp_path, rows=first, events=[])
    with TableSink(tmp_path, resume=True) as sink:
        sink.write_stats(again)
    df = load_run(tmp_path)
    assert df["step"].tolist() == [1, 2, 3, 4]
    assert df["value"].tolist() == [1.0, 2.0, 30.0, 40.0]
    assert len(load_run(tmp_path, dedupe=False)) == 5


def test_spikes_without_events(tmp_path: Path) -> None:
    _run(tmp_path, events=[])
    spikes = load_spikes(tmp_path)
    assert spikes.empty and tuple(spikes.columns) == SPIKE_FIELDS


def test_spikes_keep_nan_and_inf(tmp_path: Path) -> None:
    _run(tmp_path)
    spikes = load_spikes(tmp_path)
    assert math.isnan(spikes["value"].iloc[3]) and spikes["score"].iloc[3] == math.inf
    assert spikes["layers"].iloc[2] == list(sample_events()[2].layers)


def test_meta_errors(tmp_path: Path) -> None:
    _run(tmp_path)
    (tmp_path / "run.json").write_text("{\"name\": ")
    with pytest.raises(CorruptRunError, match=r"run\.json: not valid JSON"):
        load_meta(tmp_path)
    (tmp_path / "run.json").unlink()
    with pytest.raises(RunNotFoundError, match=r"no run\.json"):
        load_meta(tmp_path)
    assert len(load_run(tmp_path)) == len(sample_rows())
    (tmp_path / "run.json").write_text(json.dumps([1]))
    with pytest.raises(CorruptRunError, match="JSON object"):
        load_meta(tmp_path)
