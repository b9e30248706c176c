"""Rows as columns (``sink_api.StatRows``): the collector's rows against a per-row construction
from the device values, the sinks' column paths against their per-row equivalents (CSV and JSON
lines against the ``csv`` and ``json`` modules, a range merged from the rows kept in memory
against one read back from its parts)."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from gradlens import GradLens
from gradlens.catalog import scope
from gradlens.core import lens as lens_module
from gradlens.core import records
from gradlens.data import build_llama
from gradlens.kinds import layer_kind
from gradlens.schema import GLOBAL
from gradlens.sinks import MemorySink, StatRows
from gradlens.sinks import table as table_module
from gradlens.sinks.table import TableSink
from gradlens.table_summary import read_summary

from ._records import sample_rows

WEIRD = [(1, 'a,"b"', "hidden", "grad_norm", 1.5), (1, "line\nbreak", "r,1", "s t", math.nan),
         (2, "é", GLOBAL, "loss", math.inf), (2, 'a,"b"', "hidden", "grad_norm", -math.inf),
         (3, "x", "y", "z", 1e-300)]


def _same(a: list[tuple], b: list[tuple]) -> bool:
    """Equal rows, NaN equal to NaN."""
    return len(a) == len(b) and all(
        x[:4] == y[:4] and (x[4] == y[4] or (math.isnan(x[4]) and math.isnan(y[4])))
        and type(x[0]) is int and type(x[4]) is float for x, y in zip(a, b, strict=True))


def test_columns_read_back_as_the_rows() -> None:
    rows = sample_rows() + WEIRD
    cols = StatRows.of(rows)
    assert len(cols) == len(rows) and _same(list(cols), rows) and _same(cols.tuples(), rows)
    assert _same([cols[i] for i in range(len(rows))], rows)
    assert _same(list(cols[3:11]), rows[3:11])
    assert cols.column("layer") == [r[1] for r in rows]
    assert list(cols) == list(cols) == cols.tuples()  # NaN is the one math.nan: rows compare
    got = [(s, list(part)) for s, part in cols.step_slices()]
    want = [(s, list(g)) for s, g in itertools.groupby(rows, key=lambda r: r[0])]
    assert [s for s, _ in got] == [s for s, _ in want]
    assert all(_same(a, b) for (_, a), (_, b) in zip(got, want, strict=True))


def test_concat_remaps_codes_of_different_tables() -> None:
    a, b = sample_rows((1, 2)), WEIRD
    both = StatRows.concat([StatRows.of(a), [], b, StatRows.of(a[:3])])
    assert _same(list(both), a + b + a[:3])
    same = StatRows.concat([StatRows.of(a), StatRows.of(a)])
    assert _same(list(same), a + a)
    assert len(StatRows.concat([])) == 0 and len(StatRows.concat([[], []])) == 0


def test_the_collectors_rows_equal_a_per_row_construction_from_the_device_values(
        monkeypatch) -> None:
    """Every logged step's rows against rows built one by one from the step's device tensors:
    per statistic the present layers (a global-scope statistic's NaN placeholders left out),
    then the run-level value; the order kept."""
    torch.manual_seed(0)
    model = build_llama("tiny", seed=3)
    mem = MemorySink()
    lens = GradLens(model, preset="standard", sinks=[mem], log_every=1)
    seen: list[tuple] = []

    def spy(lens_, pending, host):
        out = records.to_records(lens_, pending, host)
        seen.append((list(pending), out[0]))
        return out

    monkeypatch.setattr(lens_module, "to_records", spy)
    try:
        for _ in range(3):
            for micro in torch.randint(0, model.config.vocab_size, (2, 4, 16)):
                model(input_ids=micro, labels=micro).loss.backward()
            lens.step()
            model.zero_grad()
    finally:
        lens.close()
    L = len(lens.layers)
    labels = [(i.name, layer_kind(i.name, i.role.value)) for i in lens.layers]
    assert len(seen) == 3
    for pending, rows in seen:
        want = []
        for step, kind, payload in pending:
            if kind == "row":
                want.append((step, *payload))
            elif kind == "step" and payload.logging:
                for key, t in payload.values.items():
                    if key.startswith("_"):
                        continue
                    v = t.detach().to(lens.dtype).double().reshape(-1).tolist()
                    if scope(key) == "run":
                        want.append((step, GLOBAL, GLOBAL, key, v[0]))
                        continue
                    for k in range(L):
                        if payload.present[k] and not (
                                len(v) == L + 1 and scope(key) == "global" and math.isnan(v[k])):
                            want.append((step, *labels[k], key, v[k]))
                    if len(v) == L + 1:
                        want.append((step, GLOBAL, GLOBAL, key, v[L]))
                for name, n in (("microbatches", payload.micro), ("batch_size", payload.batch)):
                    if n:
                        want.append((step, GLOBAL, GLOBAL, name, float(n)))
        assert len(want) > 100 and _same(list(rows), want)
    assert _same(mem.rows, [r for _, rows in seen for r in rows])


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_text_lines_equal_the_csv_and_json_modules(tmp_path: Path, fmt: str) -> None:
    rows = sample_rows() + WEIRD
    sink = TableSink(tmp_path, fmt)
    sink.write_stats(StatRows.of(rows[:7]))
    sink.write_stats(rows[7:])  # a plain list goes the same way
    sink.write_stats(StatRows.of(rows[:2]))  # the cached fragments again
    sink.close()
    rows = rows + rows[:2]
    text = (tmp_path / f"stats.{fmt}").read_text(encoding="utf-8")
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["step", "layer", "role", "stat", "value"])
        w.writerows((s, a, b, c, repr(float(v))) for s, a, b, c, v in rows)
        assert text == buf.getvalue()
    else:
        want = "".join(json.dumps({"step": s, "layer": a, "role": b, "stat": c, "value": v})
                       + "\n" for s, a, b, c, v in rows)
        assert text == want


def test_a_range_merged_from_memory_equals_one_read_back(tmp_path: Path, monkeypatch) -> None:
    """The range file (rows, their order, row groups, metadata) and its summary are the same
    whether the merge used the rows kept in memory or read its parts back."""
    rng = np.random.default_rng(0)
    layers = [(f"model.layers.{i}.w", "hidden") for i in range(7)] + [(GLOBAL, GLOBAL)]
    stats = ["grad_norm", "a_stat", "zz", "grad_rms"]

    def flush_rows(step: int) -> list[tuple]:
        out = []
        for stat in stats if step % 3 else stats[::-1]:
            for layer, role in layers[: 8 if stat != "zz" else 3]:
                v = float(rng.normal()) if rng.random() > 0.1 else math.nan
                out.append((step, layer, role, stat, v))
        return out

    flushes = [flush_rows(s) for s in [*range(1, 40), 39, *range(40, 70)]]  # a step again
    files = {}
    for name, keep in (("memory", table_module.KEEP_ROWS), ("disk", 0)):
        monkeypatch.setattr(table_module, "KEEP_ROWS", keep)
        sink = TableSink(tmp_path / name)
        for rows in flushes:
            sink.write_stats(rows)
            sink.flush()
        sink.close()
        files[name] = tmp_path / name / "stats-000001-000064.parquet"
    a, b = (pq.ParquetFile(files[k]) for k in ("memory", "disk"))
    assert a.metadata.num_row_groups == b.metadata.num_row_groups == len(stats)
    assert [a.metadata.row_group(i).num_rows for i in range(len(stats))] == \
        [b.metadata.row_group(i).num_rows for i in range(len(stats))]
    stat_col = a.schema_arrow.names.index("stat")
    for i in range(len(stats)):  # what a reader skips row groups by
        sa = a.metadata.row_group(i).column(stat_col).statistics
        sb = b.metadata.row_group(i).column(stat_col).statistics
        assert sa.has_min_max and (sa.min, sa.max) == (sb.min, sb.max) and sa.min == sa.max
    ta, tb = a.read(), b.read()
    assert all(ta.schema.field(c).type == "string" for c in ("layer", "role", "stat"))
    assert ta.schema.metadata == tb.schema.metadata and ta.schema == tb.schema
    assert ta.drop(["value"]).equals(tb.drop(["value"]))
    va, vb = ta["value"].to_numpy(), tb["value"].to_numpy()
    assert np.array_equal(va, vb, equal_nan=True)
    for stat in stats:
        sa, sb = read_summary(files["memory"], stat), read_summary(files["disk"], stat)
        assert sa is not None and sb is not None and sa.layers == sb.layers
        assert sa.roles == sb.roles and sa.block == sb.block
        for f in ("ids", "first", "last", "count", "n", "total", "peak"):
            assert np.array_equal(getattr(sa, f), getattr(sb, f)), (stat, f)
