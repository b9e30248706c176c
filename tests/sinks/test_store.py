"""The parquet store: a part per flush, merged ranges, filtered reads, leftovers of a killed
writer, a failed merge, and the CSV export."""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path

import pandas as pd
import pytest

from gradlens.report import load_run
from gradlens.report._parquet import table_info
from gradlens.report.export import export_csv
from gradlens.sinks import _parquet
from gradlens.sinks.table import TableSink

LAYERS = [("emb", "embedding"), ("a", "hidden"), ("b", "hidden"), ("global", "global")]
STATS = ("grad_norm", "grad_rms", "nonfinite_count")


def _step_rows(step: int, scale: float = 1.0) -> list[tuple[int, str, str, str, float]]:
    rows = []
    for i, (layer, role) in enumerate(LAYERS):
        for j, stat in enumerate(STATS):
            v = scale * (step + 0.01 * i + 0.001 * j)
            if (step + i + j) % 17 == 0:
                v = math.nan
            rows.append((step, layer, role, stat, v))
    return rows


def _write(run: Path, steps, scale: float = 1.0, **kw) -> list[tuple]:
    sink = TableSink(run, **kw)
    sink.open({"name": "r"})
    rows = []
    for s in steps:
        r = _step_rows(s, scale)
        sink.write_stats(r)
        sink.flush()
        rows += r
    sink.close("finished")
    return rows


def _sorted(df: pd.DataFrame) -> list[tuple]:
    recs = [(s, la, ro, st, "nan" if math.isnan(v) else v)
            for s, la, ro, st, v in df.itertuples(index=False, name=None)]
    return sorted(recs, key=lambda r: (r[0], r[1], r[3]))


def _frame(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["step", "layer", "role", "stat", "value"])


def test_parts_are_merged_and_read_back_exactly(tmp_path: Path) -> None:
    rows = _write(tmp_path, range(1, 131))
    names = sorted(p.name for p in tmp_path.glob("stats-*.parquet"))
    assert names == ["stats-000001-000064.parquet", "stats-000065-000128.parquet",
                     "stats-000129.parquet", "stats-000130.parquet"]
    df = load_run(tmp_path)
    assert _sorted(df) == _sorted(_frame(rows))
    assert str(df["value"].dtype) == "float64" and str(df["step"].dtype) == "int64"
    # a merged file: one row group per statistic, rows grouped by statistic in write order
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(tmp_path / names[0])
    assert pf.metadata.num_row_groups == len(STATS)
    merged = pf.read().to_pandas()
    assert merged["stat"].is_monotonic_increasing
    for _, g in merged.groupby("stat"):
        assert g["step"].is_monotonic_increasing
    info = table_info(tmp_path)
    assert info["steps"] == list(range(1, 131))
    assert info["stats"] == sorted(STATS) and info["global"] == sorted(STATS)


def test_filtered_reads_equal_filtering_the_whole_table(tmp_path: Path) -> None:
    _write(tmp_path, range(1, 100))
    full = load_run(tmp_path)
    for kw, keep in [
        (dict(stats=["grad_rms"]), full["stat"] == "grad_rms"),
        (dict(layers=["a", "global"]), full["layer"].isin(["a", "global"])),
        (dict(steps=(30, 70)), full["step"].between(30, 70)),
        (dict(stats=["grad_norm"], steps=(None, 10)), (full["stat"] == "grad_norm")
         & (full["step"] <= 10)),
    ]:
        got = load_run(tmp_path, **kw)
        assert _sorted(got) == _sorted(full[keep]), kw
    cat = load_run(tmp_path, categorical=True)
    assert str(cat["layer"].dtype) == "category"
    assert _sorted(cat.astype({"layer": str, "role": str, "stat": str})) == _sorted(full)


def test_a_resumed_run_keeps_the_last_written_row(tmp_path: Path) -> None:
    _write(tmp_path, range(1, 80))
    with pytest.warns(UserWarning, match="already holds a run"):
        again = _write(tmp_path, range(70, 90), scale=10.0)  # re-did steps 70..79
    df = load_run(tmp_path)
    assert sorted(set(df["step"])) == list(range(1, 90))
    want = {(r[0], r[1], r[3]): r[4] for r in again}
    got = df[df["step"] >= 70]
    assert len(got) == len(again)
    for s, la, _, st, v in got.itertuples(index=False, name=None):
        w = want[(s, la, st)]
        assert (math.isnan(v) and math.isnan(w)) or v == w


def test_what_a_killed_merge_or_write_leaves_is_harmless(tmp_path: Path) -> None:
    keep = tmp_path / "keep"
    keep.mkdir()
    run = tmp_path / "run"
    sink = TableSink(run)
    sink.open({})
    for s in range(1, 64):
        sink.write_stats(_step_rows(s))
        sink.flush()
        shutil.copy(run / f"stats-{s:06d}.parquet", keep)
    sink.write_stats(_step_rows(64))
    sink.flush()  # merges 1..64
    expected = _sorted(load_run(run))
    sink.close()
    # killed after the merged file was renamed in, before the parts were deleted; and while
    # writing a part (its temporary file)
    for f in keep.iterdir():
        shutil.copy(f, run)
    (run / ".stats-000065.parquet.999.tmp").write_bytes(b"PAR1 half")
    # and while writing the range's summary (after the range file): the old summary stays
    summary = (run / "stats-000001-000064.summary.bin").read_bytes()
    (run / ".stats-000001-000064.summary.bin.999.tmp").write_bytes(summary[:50])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _sorted(load_run(run)) == expected
    with pytest.warns(UserWarning, match="already holds a run"):
        TableSink(run).close()  # the next writer deletes both
    assert sorted(p.name for p in run.iterdir() if "stats" in p.name) == [
        "stats-000001-000064.parquet", "stats-000001-000064.summary.bin"]
    assert (run / "stats-000001-000064.summary.bin").read_bytes() == summary
    assert _sorted(load_run(run)) == expected


def test_a_failed_merge_keeps_the_parts_and_merges_later(tmp_path: Path, monkeypatch) -> None:
    real = _parquet.merge_parts
    calls = []

    def failing(logdir, parts, **kw):
        calls.append(len(parts))
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(logdir, parts, **kw)

    monkeypatch.setattr(_parquet, "merge_parts", failing)
    with pytest.warns(RuntimeWarning, match="No space left"):
        rows = _write(tmp_path, range(1, 66))
    assert calls == [64, 65]  # retried at the next flush with one more part
    assert [p.name for p in tmp_path.glob("stats-*.parquet")] == ["stats-000001-000065.parquet"]
    assert _sorted(load_run(tmp_path)) == _sorted(_frame(rows))


def test_export_csv_reads_back_as_the_run(tmp_path: Path) -> None:
    _write(tmp_path / "run", range(1, 70))
    path, n = export_csv(tmp_path / "run")
    assert path == tmp_path / "run.csv" and n == 69 * len(LAYERS) * len(STATS)
    back = tmp_path / "back"
    back.mkdir()
    shutil.move(path, back / "stats.csv")
    assert _sorted(load_run(back)) == _sorted(load_run(tmp_path / "run"))


def test_a_set_of_steps(tmp_path: Path) -> None:
    _write(tmp_path / "pq", range(1, 100))
    _write(tmp_path / "csv", range(1, 100), format="csv")
    for fmt in ("pq", "csv"):
        full = load_run(tmp_path / fmt)
        got = load_run(tmp_path / fmt, steps=range(3, 100, 7))
        assert _sorted(got) == _sorted(full[full["step"].isin(range(3, 100, 7))])
        assert load_run(tmp_path / fmt, steps=[]).empty


def test_the_report_reads_every_kth_step_past_max_rows(tmp_path: Path, monkeypatch) -> None:
    from gradlens.report.load import EmptyRunError, load_for_report

    _write(tmp_path / "run", range(1, 101))  # 100 steps x 12 rows
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_for_report(tmp_path / "run", max_rows=1200)) == 1200
    with pytest.warns(UserWarning, match=r"every 3th logged step \(34 of 100\)"):
        df = load_for_report(tmp_path / "run", max_rows=500)
    want = list(range(1, 101))[::-1][::3][::-1]
    assert sorted(set(df["step"])) == want and want[-1] == 100 and want[0] == 1
    full = load_run(tmp_path / "run")
    assert _sorted(df) == _sorted(full[full["step"].isin(want)])
    monkeypatch.setenv("GRADLENS_REPORT_MAX_ROWS", "0")
    assert len(load_for_report(tmp_path / "run")) == 1200
    live = TableSink(tmp_path / "live")
    live.open({})
    assert load_run(tmp_path / "live").empty  # a live run reads empty...
    with pytest.raises(EmptyRunError, match="a report needs rows"):
        load_for_report(tmp_path / "live")  # ...but a report needs rows
    live.close()


def test_a_row_repeated_inside_one_file_keeps_the_last(tmp_path: Path) -> None:
    from gradlens.report._parquet import steps_disjoint

    sink = TableSink(tmp_path)
    sink.open({})
    for s in range(1, 70):
        rows = _step_rows(s)
        if s in (5, 66):  # the same (step, layer, stat) twice in one flush, the second wins
            rows.append((s, "a", "hidden", "grad_rms", -1.0))
        sink.write_stats(rows)
        sink.flush()
    sink.close()
    assert steps_disjoint(tmp_path)  # so each file is deduplicated on its own
    df = load_run(tmp_path)
    assert len(df) == 69 * len(LAYERS) * len(STATS)
    for s in (5, 66):
        got = df[(df["step"] == s) & (df["layer"] == "a") & (df["stat"] == "grad_rms")]
        assert got["value"].tolist() == [-1.0]
    assert len(load_run(tmp_path, dedupe=False)) == len(df) + 2
