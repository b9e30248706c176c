"""The heatmap from the range files' summaries equals the heatmap from the rows.

Tolerances: a column's ``n`` and ``max`` come out of the summaries exactly (counts add, a max
of maxes is the max); its ``sum`` is a sum of per-block partial sums instead of one running
sum, so it differs from the rows' by rounding only: at most ``(n - 1) * 2**-53 * sum|x|`` for
``n`` terms (each addition rounds once), asserted as ``n * 2**-52 * sum|x|``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from gradlens.sinks import _parquet
from gradlens.sinks.table import TableSink
from gradlens.table_summary import SUMMARY_SUFFIX, read_summary
from gradlens.tensorboard.plugin._bins import bin_width, matrix_columns
from gradlens.tensorboard.plugin.data import RunStore, round_sig

from ._runs import synthetic_layers

STATS = ("grad_norm", "grad_rms", "update_ratio")


def _values(steps: np.ndarray, n_layers: int, seed: int = 0) -> dict[str, np.ndarray]:
    """{stat: layers x steps}: log-normal, with NaN, +-inf, and missing rows (NaN marks them
    in ``missing``)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, stat in enumerate(STATS):
        v = np.exp(rng.normal(0, 2, size=(n_layers, len(steps))))
        if k == 1:
            v *= np.where(rng.random(v.shape) < 0.5, -1.0, 1.0)  # values of both signs
        v[rng.random(v.shape) < 0.02] = np.nan
        v[rng.random(v.shape) < 0.01] = np.inf
        v[rng.random(v.shape) < 0.01] = -np.inf
        out[stat] = v
    return out


def _write(run: Path, steps: np.ndarray, n_layers: int = 13, seed: int = 0) -> dict:
    """A parquet run through the sink, one flush per step; ``update_ratio`` logged every 3rd
    step only, and layer 2 missing at every 5th step. Returns ``{stat: (steps, matrix)}``
    with NaN where no row was written."""
    lay = synthetic_layers(n_layers)
    vals = _values(steps, n_layers, seed)
    sink = TableSink(run, fsync=False)
    sink.open({"name": run.name, "layers": [{"name": n, "role": r} for n, r in lay]})
    truth = {s: np.full((n_layers, len(steps)), np.nan) for s in STATS}
    for j, step in enumerate(steps.tolist()):
        rows = [(step, "global", "global", "loss", 1.0)]
        for stat in STATS:
            if stat == "update_ratio" and j % 3:
                continue
            for i, (name, role) in enumerate(lay):
                if i == 2 and j % 5 == 0:
                    continue
                rows.append((step, name, role, stat, float(vals[stat][i, j])))
                truth[stat][i, j] = vals[stat][i, j]
        sink.write_stats(rows)
        sink.flush()
    sink.close("finished")
    out = {}
    for stat in STATS:
        has = np.ones(len(steps), bool) if stat != "update_ratio" else np.arange(len(steps)) % 3 == 0
        out[stat] = (steps[has], truth[stat][:, has])
    return out


def _reference(steps: np.ndarray, m: np.ndarray, max_cols: int):
    """Columns by the documented rule, brute force: (first, last) per column, and per layer
    the n / sum / sum|x| / max of finite values (float64, one running sum per cell)."""
    if len(steps) <= max_cols:
        keys = np.arange(len(steps))
    else:
        w = 2
        while steps[-1] // w - steps[0] // w + 1 > max_cols:
            w *= 2
        keys = steps // w
    cols = sorted(set(keys.tolist()))
    bounds, n, s, a, mx = [], [], [], [], []
    for c in cols:
        idx = np.flatnonzero(keys == c)
        bounds.append((int(steps[idx[0]]), int(steps[idx[-1]])))
        rn, rs, ra, rm = [], [], [], []
        for row in m[:, idx]:
            f = [x for x in row.tolist() if math.isfinite(x)]
            total = 0.0
            for x in f:
                total += x
            rn.append(len(f))
            rs.append(total)
            ra.append(sum(abs(x) for x in f))
            rm.append(max(f) if f else -math.inf)
        n.append(rn)
        s.append(rs)
        a.append(ra)
        mx.append(rm)
    return bounds, *(np.array(x).T for x in (n, s, a, mx))


def _strip(body: dict) -> dict:
    """Without the run's name and version, and the colour scale's kind (from every step's
    value when the rows were read, from the columns when the summaries gave them)."""
    return {k: v for k, v in body.items() if k not in ("run", "version", "scale")}


def _raw_copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    for f in dest.glob(f"*{SUMMARY_SUFFIX}"):
        f.unlink()
    return dest


def test_summaries_give_the_columns_of_the_rows(tmp_path: Path) -> None:
    # 300 logged steps 10 apart: 4 range files (blocks of B = 128 steps: 8 x the gap, rounded
    # up to a power of two) and 44 parts
    steps = np.arange(0, 3000, 10)
    truth = _write(tmp_path / "runs" / "a", steps)
    summaries = sorted(p.name for p in (tmp_path / "runs" / "a").glob(f"*{SUMMARY_SUFFIX}"))
    assert summaries == [f"stats-{a:06d}-{a + 63:06d}.summary.bin" for a in (1, 65, 129, 193)]
    store = RunStore(tmp_path / "runs")
    store.list_runs()
    table = store._run(tmp_path / "runs" / "a").table
    assert table is not None
    lay = [n for n, _ in synthetic_layers(13)]
    lay = [*lay[:2], *lay[3:], lay[2]]  # first-appearance order: layer 2 has no row at step 0
    for stat in STATS:
        st, m = truth[stat]
        for max_cols in (3, 10, 24, 40):  # w = 2048, 512, 128, 128
            found = table.stat_columns(stat, max_cols)
            assert found is not None, (stat, max_cols)  # the summaries were used
            layers, roles, n_steps, cols = found
            assert layers == lay and n_steps == len(st)
            assert roles == dict(synthetic_layers(13))
            bounds, n, s, a, mx = _reference(st, m, max_cols)
            assert list(zip(cols.first.tolist(), cols.last.tolist(), strict=True)) == bounds
            perm = [*range(2), *range(3, 13), 2]
            n, s, a, mx = n[perm], s[perm], a[perm], mx[perm]
            np.testing.assert_array_equal(cols.n, n)
            np.testing.assert_array_equal(cols.peak, mx)
            bound = np.maximum(n, 1) * 2.0 ** -52 * a
            assert np.all(np.abs(cols.total - s) <= bound), stat
            # and the rows' path (the statistic's matrix) gives the same columns
            r_steps, r_m = table.stat_matrix(stat)[2:]
            r = matrix_columns(r_steps, r_m, bin_width(int(r_steps[0]), int(r_steps[-1]),
                                                       len(r_steps), max_cols))
            np.testing.assert_array_equal(r.n, cols.n)
            np.testing.assert_array_equal(r.peak, cols.peak)
            np.testing.assert_array_equal(r.first, cols.first)
            assert np.all(np.abs(r.total - s) <= bound)
        # columns narrower than the blocks (w = 64 < B = 128): the rows' path
        assert table.stat_columns(stat, 47) is None


def test_the_routes_answer_the_same_with_and_without_summaries(tmp_path: Path) -> None:
    steps = np.arange(0, 3000, 10)
    _write(tmp_path / "runs" / "a", steps)
    _raw_copy(tmp_path / "runs" / "a", tmp_path / "runs" / "b")
    store = RunStore(tmp_path / "runs")
    for route, kw in (("heatmap", dict(agg="max")), ("heatmap", dict(agg="mean")),
                      ("role_summary", dict(agg="mean")), ("role_summary", dict(agg="max"))):
        for stat in STATS:
            for max_cols in (12, 24, 40):
                x = getattr(store, route)("a", stat, max_cols=max_cols, **kw)
                y = getattr(store, route)("b", stat, max_cols=max_cols, **kw)
                assert _strip(x) == _strip(y), (route, stat, max_cols)
    assert store._runs[tmp_path / "runs" / "a"].wide == {}  # "a" never read a matrix
    assert set(store._runs[tmp_path / "runs" / "b"].wide) == set(STATS)
    for max_cols in (100, 400):  # w < B, or one column per step: both from the rows
        for stat in STATS:
            x, y = (store.heatmap(r, stat, max_cols=max_cols) for r in ("a", "b"))
            assert _strip(x) == _strip(y)


def test_a_damaged_foreign_or_missing_summary_falls_back_to_the_rows(tmp_path: Path) -> None:
    steps = np.arange(0, 2600, 10)
    _write(tmp_path / "runs" / "a", steps)
    want = _strip(RunStore(tmp_path / "runs").heatmap("a", "grad_norm", max_cols=20,
                                                      agg="mean"))
    run = tmp_path / "runs" / "a"
    s1, s2, s3, _s4 = sorted(run.glob(f"*{SUMMARY_SUFFIX}"))
    r1 = s1.with_name(s1.name.replace(SUMMARY_SUFFIX, ".parquet"))
    assert read_summary(r1, "grad_norm") is not None
    s2.write_bytes(s2.read_bytes()[:100])  # torn (a copy cut short; the writer renames whole)
    shutil.copy(s1, s3)  # another range's summary under this range's name
    for path in (r1.with_name(s2.name.replace(SUMMARY_SUFFIX, ".parquet")),
                 r1.with_name(s3.name.replace(SUMMARY_SUFFIX, ".parquet"))):
        assert read_summary(path, "grad_norm") is None
    store = RunStore(tmp_path / "runs")
    assert _strip(store.heatmap("a", "grad_norm", max_cols=20, agg="mean")) == want
    s1.unlink()
    store = RunStore(tmp_path / "runs")
    assert _strip(store.heatmap("a", "grad_norm", max_cols=20, agg="mean")) == want
    assert store._runs[run].wide  # nothing summarized before the damage: the rows


def test_a_resumed_run_with_steps_in_two_files_is_read_from_the_rows(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "a"
    _write(run, np.arange(0, 1400, 10))
    with pytest.warns(UserWarning, match="already holds a run"):
        again = _write(run, np.arange(1000, 2000, 10), seed=1)  # re-did steps 1000..1390
    store = RunStore(tmp_path / "runs")
    store.list_runs()
    assert store._run(run).table.stat_columns("grad_norm", 20) is None
    hm = store.heatmap("a", "grad_norm", max_cols=2000, agg="max")
    st, m = again["grad_norm"]
    col = {c[0]: i for i, c in enumerate(hm["columns"])}
    row = [x["name"] for x in hm["layers"]].index(synthetic_layers(13)[5][0])
    got = [hm["values"][row][col[s]] for s in st.tolist()]
    ref = [None if not math.isfinite(v) else float(f"{v:.5g}") for v in m[5].tolist()]
    assert got == ref  # the re-done steps show the second session's values


def test_a_summary_that_cannot_be_written_leaves_the_merge_done(tmp_path: Path,
                                                               monkeypatch) -> None:
    def failing(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_parquet, "write_summary", failing)
    with pytest.warns(RuntimeWarning, match="summary was not written"):
        truth = _write(tmp_path / "runs" / "a", np.arange(0, 1300, 10))
    run = tmp_path / "runs" / "a"
    assert not list(run.glob(f"*{SUMMARY_SUFFIX}"))
    assert sorted(p.name for p in run.glob("stats-*.parquet"))[:2] == [
        "stats-000001-000064.parquet", "stats-000065-000128.parquet"]
    hm = RunStore(tmp_path / "runs").heatmap("a", "grad_norm", max_cols=10, agg="max")
    _bounds, n, _s, _a, mx = _reference(*truth["grad_norm"], 10)
    vals = np.array([[np.nan if v is None else v for v in r] for r in hm["values"]])
    names = [x["name"] for x in hm["layers"]]
    idx = [names.index(n_) for n_, _ in synthetic_layers(13)]
    ref = np.where(n > 0, mx, np.nan)
    np.testing.assert_array_equal(vals[idx], round_sig(ref))


def test_round_sig_is_the_5g_string() -> None:
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.lognormal(0, 6, 200_000), -rng.lognormal(0, 25, 20_000),
                        [0.0, -0.0, 1e-300, 5e-324, 1e300, 99999.5, 1e5, 12345.5, 1e-17,
                         9.99999e-18, 1e22, np.nan, np.inf, -np.inf]])
    ref = np.array([float(f"{v:.5g}") for v in x.tolist()])
    np.testing.assert_array_equal(round_sig(x), ref)
    assert json.dumps(round_sig(np.array([0.123456789]))[0]) == "0.12346"
