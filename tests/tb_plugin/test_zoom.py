"""Server-side zoom: the heatmap of a step range, binned afresh at the finest width.

The reference is brute force from the run's table (:func:`gradlens.report.load.load_run`):
the statistic's rows in ``start..end``, cut into columns ``step // w`` with ``w`` the
documented rule (1 when the range has at most ``max_cols`` logged steps, else the smallest
power of two >= 2 with ``last // w - first // w + 1 <= max_cols``), and per layer and column
the max / mean of the finite values (float64, one running sum).

Tolerances: a column's max is a max of values, exact whatever the order, so the served value
equals the reference rounded to 5 significant digits (what the JSON carries). A mean from
the summaries is a sum of per-block partial sums: it differs from one running sum by at most
``(n - 1) * 2**-53 * sum|x|`` (asserted as ``n * 2**-52 * sum|x| / n``, unrounded); the JSON
value then differs from the reference by that plus half a unit of the 5th significant digit.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from tensorboard.plugins import base_plugin
from werkzeug.test import Client

from gradlens.report.load import load_run
from gradlens.sinks.table import TableSink
from gradlens.table_summary import SUMMARY_SUFFIX
from gradlens.tensorboard.plugin import GradLensPlugin
from gradlens.tensorboard.plugin._bins import cells
from gradlens.tensorboard.plugin._json import round_sig
from gradlens.tensorboard.plugin._tables import Table

from ._runs import synthetic_layers

N_LAYERS = 9
STATS = ("grad_norm", "update_ratio")  # update_ratio: every 3rd step


def _write(run: Path, steps: np.ndarray, *, seed: int = 0, close: bool = True) -> TableSink:
    """A parquet run through the real sink, a flush every 10 steps (64 flushes per range
    file and its summary, blocks of 8 steps); values log-normal with NaN and +-inf."""
    lay = synthetic_layers(N_LAYERS)
    rng = np.random.default_rng(seed)
    sink = TableSink(run, fsync=False)
    sink.open({"name": run.name, "layers": [{"name": n, "role": r} for n, r in lay]})
    _append(sink, steps, rng)
    if close:
        sink.close("finished")
    return sink


def _append(sink: TableSink, steps: np.ndarray, rng: np.random.Generator) -> None:
    lay = synthetic_layers(N_LAYERS)
    for j, step in enumerate(steps.tolist()):
        rows = [(step, "global", "global", "loss", 1.0)]
        for stat in STATS:
            if stat == "update_ratio" and step % 3:
                continue
            v = np.exp(rng.normal(0, 2, size=len(lay)))
            v[rng.random(len(lay)) < 0.02] = np.nan
            v[rng.random(len(lay)) < 0.005] = np.inf
            rows += [(step, n, r, stat, float(x)) for (n, r), x in zip(lay, v, strict=True)]
        sink.write_stats(rows)
        if j % 10 == 9:
            sink.flush()
    sink.flush()


def _reference(run: Path, stat: str, start: int | None, end: int | None, max_cols: int):
    """(width, [first, last] per column, {layer: (max, mean, n, sum|x|) per column},
    logged steps in the range)."""
    df = load_run(run)
    df = df[(df["stat"] == stat) & (df["layer"] != "global")]
    if start is not None:
        df = df[df["step"] >= start]
    if end is not None:
        df = df[df["step"] <= end]
    steps = np.unique(df["step"].to_numpy())
    if len(steps) <= max_cols:
        w = 1
    else:
        w = 2
        while steps[-1] // w - steps[0] // w + 1 > max_cols:
            w *= 2
    keys = sorted({int(s) // w for s in steps})
    bounds = [[int(steps[steps // w == k][0]), int(steps[steps // w == k][-1])] for k in keys]
    out = {}
    for layer, g in df.groupby("layer", sort=False):
        per = {k: [] for k in keys}
        for s, v in zip(g["step"].tolist(), g["value"].tolist(), strict=True):
            if math.isfinite(v):
                per[s // w].append(v)
        cols = []
        for k in keys:
            f = per[k]
            total = 0.0
            for x in f:
                total += x
            cols.append((max(f) if f else math.nan, total / len(f) if f else math.nan,
                         len(f), sum(abs(x) for x in f)))
        out[layer] = cols
    return w, bounds, out, len(steps)


def _client(logdir: Path) -> tuple[GradLensPlugin, Client]:
    plugin = GradLensPlugin(base_plugin.TBContext(logdir=str(logdir)))
    apps = plugin.get_plugin_apps()
    return plugin, Client(lambda env, sr: apps[env["PATH_INFO"]](env, sr))


def _get(c: Client, route: str, **params) -> tuple[int, dict]:
    resp = c.get(route, query_string={k: v for k, v in params.items() if v is not None})
    return resp.status_code, json.loads(resp.get_data(as_text=True))


def _check(body: dict, ref, agg: str) -> None:
    w, bounds, want, _n = ref
    assert body["width"] == w
    assert body["columns"] == bounds
    for layer, row in zip(body["layers"], body["values"], strict=True):
        for got, (mx, mean, n, a) in zip(row, want[layer["name"]], strict=True):
            if n == 0:
                assert got is None
            elif agg == "max":
                assert got == float(round_sig(np.array([mx]))[0]), (layer, got, mx)
            else:  # the summed blocks' rounding, then the JSON's 5 significant digits
                assert abs(got - mean) <= a * 2.0 ** -52 + 5e-5 * abs(mean), (layer, got, mean)
    assert {la["name"] for la in body["layers"]} == set(want)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``a``: 3000 logged steps with summaries; ``b``: the same files without them; ``c``: the
    same rows as a CSV table."""
    logdir = tmp_path_factory.mktemp("zoom") / "runs"
    _write(logdir / "a", np.arange(3000))
    shutil.copytree(logdir / "a", logdir / "b")
    for f in (logdir / "b").glob(f"*{SUMMARY_SUFFIX}"):
        f.unlink()
    assert len(list((logdir / "a").glob(f"*{SUMMARY_SUFFIX}"))) == 4
    (logdir / "c").mkdir()
    shutil.copy(logdir / "a" / "run.json", logdir / "c" / "run.json")
    load_run(logdir / "a").to_csv(logdir / "c" / "stats.csv", index=False, na_rep="nan")
    return logdir


# (start, end, max_cols): width 1; narrower than the blocks (rows); blocks with unaligned
# edges (summaries + the edge rows); open ends
CASES = [(400, 600, 400), (1003, 2390, 400), (37, 2950, 400), (37, 2950, 100),
         (None, 1999, 64), (2001, None, 50), (1500, 1500, 400)]


@pytest.mark.parametrize(("start", "end", "max_cols"), CASES)
def test_zoom_equals_a_brute_force_reference(runs: Path, start, end, max_cols) -> None:
    _, c = _client(runs)
    for stat in STATS:
        for agg in ("max", "mean"):
            ref = _reference(runs / "a", stat, start, end, max_cols)
            answers = []
            for run in ("a", "b", "c"):
                code, body = _get(c, "/heatmap", run=run, stat=stat, agg=agg, start=start,
                                  end=end, max_cols=max_cols)
                assert code == 200, body
                _check(body, ref, agg)
                assert body["range"] == [ref[1][0][0] if start is None else start,
                                         ref[1][-1][1] if end is None else end]
                assert body["n_steps"] == ref[3]
                answers.append({k: v for k, v in body.items()
                                if k not in ("run", "version", "scale")})
            if agg == "max":  # with and without summaries, parquet or CSV: the same answer
                assert answers[0] == answers[1] == answers[2], (stat, start, end)
    # the full view is binned (3000 steps > 400 columns)
    code, full = _get(c, "/heatmap", run="a", stat="grad_norm")
    assert code == 200 and full["width"] == 8 and full["range"] is None


def test_zoom_reads_the_summaries_and_only_the_edge_rows(runs: Path, monkeypatch) -> None:
    scans: list[tuple] = []
    orig = Table._scan

    def spy(self, stat, only, lo=None, hi=None, steps=None):
        scans.append((stat, lo, hi, None if steps is None else len(steps)))
        return orig(self, stat, only, lo, hi, steps)

    monkeypatch.setattr(Table, "_scan", spy)
    plugin, c = _client(runs)
    code, body = _get(c, "/heatmap", run="a", stat="grad_norm", start=37, end=2950,
                      max_cols=100)
    assert code == 200 and body["width"] == 32
    run = plugin.store._runs[runs / "a"]
    assert run.wide == {}  # no whole matrix read
    # the rows read: steps 37..39 (a block cut by the range's start) and the parts after the
    # last range file (steps 2560..2950), never the steps inside the summarized blocks
    assert len(scans) == 1 and scans[0][1:] == (37, 2950, 3 + 2950 - 2560 + 1)
    scans.clear()
    code, body = _get(c, "/heatmap", run="b", stat="grad_norm", start=1000, end=1200)
    assert code == 200 and body["width"] == 1 and len(body["columns"]) == 201
    assert scans == [("grad_norm", 1000, 1200, None)]  # the range's rows, filtered


def test_role_summary_zooms_too(runs: Path) -> None:
    _, c = _client(runs)
    code, hm = _get(c, "/heatmap", run="a", stat="grad_norm", agg="mean", start=37, end=2950,
                    max_cols=100)
    code2, roles = _get(c, "/roles", run="a", stat="grad_norm", agg="mean", start=37, end=2950,
                        max_cols=100)
    assert code == code2 == 200
    assert roles["columns"] == hm["columns"] and roles["width"] == hm["width"] == 32
    hidden = [i for i, la in enumerate(hm["layers"]) if la["role"] == "attention"]
    vals = np.array([[np.nan if v is None else v for v in hm["values"][i]] for i in hidden])
    got = np.array([np.nan if v is None else v for v in roles["roles"]["attention"]["max"]])
    np.testing.assert_allclose(got, np.nanmax(vals, axis=0), rtol=1e-4)


@pytest.mark.parametrize(("params", "name"), [
    ({"start": "ten"}, "start"), ({"end": "1.5"}, "end"), ({"start": 20, "end": 10}, "start"),
])
def test_bad_ranges_answer_400_naming_the_argument(runs: Path, params, name) -> None:
    _, c = _client(runs)
    for route in ("/heatmap", "/roles"):
        code, body = _get(c, route, run="a", stat="grad_norm", **params)
        assert code == 400 and body["error"].startswith(name), body
    code, body = _get(c, "/heatmap", run="a", stat="grad_norm", start=5000, end=6000)
    assert code == 400 and "no logged step" in body["error"] and "5000..6000" in body["error"]
    code, body = _get(c, "/heatmap", run="a", stat="nope", start=5, end=60)
    assert code == 400 and "no per-layer rows" in body["error"]


def test_a_live_runs_zoom_follows_new_steps(tmp_path: Path) -> None:
    sink = _write(tmp_path / "runs" / "live", np.arange(2000), close=False)
    _, c = _client(tmp_path / "runs")
    code, first = _get(c, "/heatmap", run="live", stat="grad_norm", start=1900)
    assert code == 200 and first["columns"][-1] == [1999, 1999] and first["width"] == 1
    _append(sink, np.arange(2000, 2100), np.random.default_rng(1))
    code, again = _get(c, "/heatmap", run="live", stat="grad_norm", start=1900)
    assert code == 200 and again["version"] != first["version"]
    assert again["columns"][-1] == [2099, 2099] and len(again["columns"]) == 200
    assert again["values"][0][:100] == first["values"][0]  # the shown steps keep their values
    sink.close("finished")


def test_cells_of_the_summaries_path_within_the_summed_rounding(runs: Path) -> None:
    """Unrounded: the zoom's means from the summaries vs one running sum per cell."""
    table = Table(runs / "a")
    table.refresh()
    table.summary()
    layers, _roles, _n, w, cols = table.range_columns("grad_norm", 37, 2950, 100)
    assert w == 32
    _w, bounds, want, _n = _reference(runs / "a", "grad_norm", 37, 2950, 100)
    assert [[int(a), int(b)] for a, b in zip(cols.first, cols.last, strict=True)] == bounds
    mean, mx = cells(cols, "mean"), cells(cols, "max")
    for i, layer in enumerate(layers):
        ref = np.array(want[layer])
        np.testing.assert_array_equal(mx[i], ref[:, 0])
        n, a = ref[:, 2], ref[:, 3]
        ok = n > 0
        assert np.all(np.abs(mean[i][ok] - ref[ok, 1]) <= n[ok] * 2.0 ** -52 * a[ok] / n[ok])
