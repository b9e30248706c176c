"""The range files' summaries (gradlens.table_summary) against a brute-force reference.

Counts, maxes and step bounds are exact; a block's sum accumulates in row order like the
reference's running sum, so it is compared exactly too.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from gradlens.sinks._parquet import rows_table, write_range
from gradlens.table_summary import block_size, read_summary, summary_path

LAYERS = [("emb", "embedding"), ("a", "hidden"), ("b", "hidden"), ("global", "global")]


def _rows(steps: list[int], seed: int = 0) -> list[tuple]:
    rng = np.random.default_rng(seed)
    rows = []
    for s in steps:
        for layer, role in LAYERS:
            for stat in ("grad_norm", "grad_rms"):
                if layer == "b" and stat == "grad_rms" and s % 4 == 0:
                    continue  # no row
                v = float(rng.normal() * 10.0 ** int(rng.integers(-3, 4)))
                v = (math.nan, math.inf, -math.inf, v, v, v, v)[int(rng.integers(0, 7))]
                rows.append((s, layer, role, stat, v))
    return rows


def _brute(rows: list[tuple], stat: str, width: int):
    last = {}
    for s, layer, role, st, v in rows:  # the last-written row of each (step, layer, stat)
        if st == stat and layer != "global":
            last.pop((s, layer), None)
            last[(s, layer)] = (role, v)
    layers, roles = [], {}
    for _s, layer, role, st, _v in rows:  # first-appearance order and role of the first row
        if st == stat and layer != "global" and layer not in roles:
            layers.append(layer)
            roles[layer] = role
    blocks = sorted({s // width for s, _ in last})
    cells = {}
    steps = {b: sorted({s for s, _ in last if s // width == b}) for b in blocks}
    for (s, layer), (_role, v) in last.items():  # in the order the kept rows were written
        c = cells.setdefault((layer, s // width), [0, 0.0, -math.inf])
        if math.isfinite(v):
            c[0] += 1
            c[1] += v
            c[2] = max(c[2], v)
    return layers, roles, blocks, steps, cells


@pytest.mark.parametrize("again", [[105, 130], [163]])  # steps re-written out of order / last
def test_a_summary_holds_the_rows_aggregates(tmp_path: Path, again: list[int]) -> None:
    steps = list(range(100, 164))
    rows = _rows(steps)
    rows += [(s, la, ro, st, v + 1.0) for s, la, ro, st, v in _rows(again, seed=1)]
    f = write_range(tmp_path, 1, 64, rows_table(rows), fsync=False)
    assert summary_path(f).name == "stats-000001-000064.summary.bin"
    assert block_size(np.array(steps)) == 8
    for stat in ("grad_norm", "grad_rms"):
        b = read_summary(f, stat)
        assert b is not None and b.block == 8
        layers, roles, blocks, bsteps, cells = _brute(rows, stat, 8)
        assert b.layers == layers and b.roles == [roles[n] for n in layers]
        assert b.ids.tolist() == blocks
        assert b.first.tolist() == [bsteps[k][0] for k in blocks]
        assert b.last.tolist() == [bsteps[k][-1] for k in blocks]
        assert b.count.tolist() == [len(bsteps[k]) for k in blocks]
        for i, layer in enumerate(layers):
            for j, k in enumerate(blocks):
                n, total, peak = cells.get((layer, k), [0, 0.0, -math.inf])
                assert (b.n[i, j], b.total[i, j], b.peak[i, j]) == (n, total, peak)
    assert read_summary(f, "loss") is not None and read_summary(f, "loss").layers == []


def test_the_block_follows_the_logging_interval() -> None:
    assert block_size(np.arange(0, 640, 10)) == 128  # 8 x 10, up to a power of two
    assert block_size(np.arange(0, 64)) == 8
    assert block_size(np.array([7])) == 8
    assert block_size(np.arange(0, 64_000, 1000)) == 8192
