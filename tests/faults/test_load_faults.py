"""load_run / load_spikes around damage: good rows recovered, bad lines named, clear errors."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest

from gradlens.report.load import (
    CorruptLineWarning,
    CorruptRunError,
    load_run,
    load_spikes,
)
from gradlens.schema import SpikeEvent
from gradlens.sinks.table import TableSink


def _rows(steps) -> list[tuple[int, str, str, str, float]]:
    return [(s, f"layer{k}", "hidden", "grad_norm", s + k / 10) for s in steps for k in range(3)]


def _write(run: Path, fmt: str, steps=(1, 2, 3)) -> Path:
    with TableSink(run, format=fmt) as sink:
        sink.open({})
        sink.write_stats(_rows(steps))
    return run / f"stats.{fmt}"


def _insert(path: Path, lineno: int, line: bytes) -> None:
    lines = path.read_bytes().split(b"\n")
    lines.insert(lineno - 1, line)
    path.write_bytes(b"\n".join(lines))


def _load_warned(run: Path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = load_run(run, dedupe=False)
    return df, [str(w.message) for w in caught if issubclass(w.category, CorruptLineWarning)]


@pytest.mark.parametrize(("fmt", "garbage", "problem"), [
    ("csv", b"\xff\xfe\x13garbled\xc3", "not UTF-8 text"),
    ("csv", b"1,layer0,hid\x00den,grad_norm,0.5", "a NUL byte in a field"),
    ("csv", b"1,layer0,hidden,grad_norm", "4 fields instead of 5"),
    ("jsonl", b"\xff\xfe\x13garbled\xc3", "not UTF-8 text"),
    ("jsonl", b'{"step": 1, "layer": "lay\x00er0", "role": "hidden", "stat": "s", "value": 1}',
     "a NUL byte in a field"),
    ("jsonl", b'{"step": 1, "layer": "lay\\u0000er0", "role": "hidden", "stat": "s", "value": 1}',
     "a NUL byte in a field"),
    ("jsonl", b'{"step": 1, "layer": "layer0", "ro', "not valid JSON"),
])
def test_a_damaged_middle_line_is_skipped_and_the_rest_read(tmp_path: Path, fmt: str,
                                                            garbage: bytes,
                                                            problem: str) -> None:
    path = _write(tmp_path, fmt)
    _insert(path, 5, garbage)
    df, texts = _load_warned(tmp_path)
    assert list(df.itertuples(index=False, name=None)) == _rows((1, 2, 3))
    assert len(texts) == 1
    assert texts[0].startswith(f"{path}, line 5: {problem}")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_nul_bytes_are_skipped_with_the_line_named(tmp_path: Path, fmt: str) -> None:
    path = _write(tmp_path, fmt)
    line = (b"2,lay\x00er,hidden,grad_norm,1.0" if fmt == "csv" else
            b'{"step": 2, "layer": "lay\\u0000er", "role": "hidden", "stat": "s", "value": 1}')
    _insert(path, 3, line)
    df, texts = _load_warned(tmp_path)
    assert texts == [f"{path}, line 3: a NUL byte in a field; skipped that line (damaged in the "
                     "middle of the file, not by a killed run) and read the rest"]
    assert len(df) == 9 and not df["layer"].str.contains("\x00").any()


def test_many_damaged_lines_warn_ten_times_then_once(tmp_path: Path) -> None:
    path = _write(tmp_path, "csv", steps=range(1, 11))
    for k in range(15):
        _insert(path, 3 + 2 * k, b"garbage")
    df, texts = _load_warned(tmp_path)
    assert len(df) == 30
    assert len(texts) == 11
    assert texts[-1].startswith(f"{path}: skipped 5 more damaged lines (lines 23..31)")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_file_of_nothing_but_damage_is_an_error(tmp_path: Path, fmt: str) -> None:
    path = _write(tmp_path, fmt)
    header = b"step,layer,role,stat,value\n" if fmt == "csv" else b""
    path.write_bytes(header + b"garbage\nmore garbage\n")
    with pytest.raises(CorruptRunError, match="no line of the file is a good row"):
        load_run(tmp_path)


def test_json_null_value_is_nan(tmp_path: Path) -> None:
    path = _write(tmp_path, "jsonl")
    _insert(path, 2, b'{"step": 1, "layer": "x", "role": "hidden", "stat": "s", "value": null}')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df = load_run(tmp_path, dedupe=False)
    assert len(df) == 10 and math.isnan(df["value"].iloc[1]) and str(df["value"].dtype) == "float64"


def test_parquet_with_the_right_columns_and_wrong_types_names_the_file(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    _write(tmp_path, "parquet")
    bad = tmp_path / "stats-000002.parquet"
    pq.write_table(pa.table({"step": ["one"], "layer": ["x"], "role": ["hidden"],
                             "stat": ["s"], "value": [1.0]}), bad)
    with pytest.raises(CorruptRunError, match=rf"{bad}: column types \(step string, "):
        load_run(tmp_path)


def test_spikes_jsonl_that_is_a_directory_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path, "csv")
    (tmp_path / "spikes.jsonl").mkdir()
    with pytest.raises(CorruptRunError, match=r"spikes\.jsonl is not a file"):
        load_spikes(tmp_path)


def test_resumed_run_events_are_deduplicated_keeping_the_last(tmp_path: Path) -> None:
    first = [SpikeEvent(4, "l", "grad_norm", 1.0, 9.5), SpikeEvent(5, "l", "grad_norm", 2.0, 11.0)]
    with TableSink(tmp_path) as sink:  # crashed after step 5; the checkpoint was at step 3
        sink.write_stats(_rows((4, 5)))
        sink.write_events(first)
    redo = [SpikeEvent(4, "l", "grad_norm", 1.5, 9.75),  # the same spike, detected again
            SpikeEvent(4, "global", "loss", 3.0, 12.0),  # another kind at the same step
            SpikeEvent(6, "l", "grad_norm", 2.0, 10.0)]
    with pytest.warns(UserWarning, match="already holds a run"), TableSink(tmp_path) as sink:
        sink.write_stats(_rows((4, 5, 6)))
        sink.write_events(redo)
    sp = load_spikes(tmp_path)
    assert list(zip(sp["step"], sp["layer"], sp["kind"], sp["score"], strict=True)) == [
        (5, "l", "grad_norm", 11.0), (4, "l", "grad_norm", 9.75), (4, "global", "loss", 12.0),
        (6, "l", "grad_norm", 10.0)]
    assert len(load_spikes(tmp_path, dedupe=False)) == 5
    assert len(load_run(tmp_path)) == 9


def test_csv_empty_value_is_nan_but_a_missing_field_is_damage(tmp_path: Path) -> None:
    path = _write(tmp_path, "csv")
    _insert(path, 2, b"1,x,hidden,s,")  # pandas writes NaN as an empty field
    _insert(path, 3, b"1,y,hidden,s")  # a field short: damaged
    df, texts = _load_warned(tmp_path)
    assert len(df) == 10 and math.isnan(df["value"].iloc[0]) and df["layer"].iloc[0] == "x"
    assert texts == [f"{path}, line 3: 4 fields instead of 5; skipped that line (damaged in "
                     "the middle of the file, not by a killed run) and read the rest"]
