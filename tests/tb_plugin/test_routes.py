"""The plugin's HTTP routes, on its WSGI apps, against numpy references of what they serve."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from tensorboard.plugins import base_plugin
from werkzeug.test import Client

from gradlens.kinds import KIND_COLORS, KINDS, layer_kind
from gradlens.tensorboard.plugin import GradLensPlugin
from gradlens.tensorboard.plugin import _tables as plugin_tables
from tests.tb_plugin._runs import synthetic_layers, write_run

ROOT = Path(__file__).resolve().parents[2]


def client(logdir: Path) -> tuple[GradLensPlugin, Client]:
    plugin = GradLensPlugin(base_plugin.TBContext(logdir=str(logdir)))
    apps = plugin.get_plugin_apps()

    def wsgi(environ, start_response):
        return apps[environ["PATH_INFO"]](environ, start_response)

    return plugin, Client(wsgi)


def get(c: Client, route: str, **params) -> tuple[int, dict]:
    resp = c.get(route, query_string=params)
    return resp.status_code, json.loads(resp.get_data(as_text=True))


def ordered(n_layers: int) -> list[str]:
    """Reference display order: by role (embedding, hidden, vector, output), model order inside."""
    rank = {k: i for i, k in enumerate(KINDS)}
    lay = [(n, layer_kind(n, r)) for n, r in synthetic_layers(n_layers)]
    return [n for _, (n, _r) in sorted(enumerate(lay), key=lambda t: (rank[t[1][1]], t[0]))]


def test_entry_point_and_frontend(tmp_path: Path) -> None:
    toml = (ROOT / "pyproject.toml").read_text()
    section = toml.split("[project.entry-points.tensorboard_plugins]\n", 1)[1].split("\n[", 1)[0]
    assert 'gradlens = "gradlens.tensorboard.plugin:GradLensPlugin"' in section
    assert '"tensorboard/plugin/static/*.js"' in toml.split("[tool.setuptools.package-data]", 1)[1]
    plugin, c = client(tmp_path)
    assert not plugin.is_active()  # nothing in the logdir yet
    write_run(tmp_path / "a", 7, np.arange(0, 20, 5))
    assert plugin.is_active()
    fm = plugin.frontend_metadata()
    assert fm.es_module_path == "/index.js" and fm.tab_name == "gradlens"
    resp = c.get("/index.js")
    assert resp.status_code == 200 and resp.mimetype == "application/javascript"
    js = resp.get_data(as_text=True)
    assert "export async function render()" in js
    # the module it imports, relative to the same route prefix
    assert 'from "./heatmap.js"' in js
    resp = c.get("/heatmap.js")
    assert resp.status_code == 200 and resp.mimetype == "application/javascript"
    assert "export function layoutRows(" in resp.get_data(as_text=True)


def test_heatmap_matches_a_numpy_reference(tmp_path: Path) -> None:
    steps = np.arange(0, 230, 10)  # 23 logged steps
    vals = write_run(tmp_path / "runs" / "scale", 12, steps, stats=("grad_norm", "grad_rms"))
    raw = vals["grad_norm"]
    raw[3, 4] = np.nan  # a missing value is ignored by its bin
    lay = [n for n, _ in synthetic_layers(12)]
    # rewrite with the NaN
    import pandas as pd
    df = pd.read_csv(tmp_path / "runs" / "scale" / "stats.csv")
    sel = (df["stat"] == "grad_norm") & (df["layer"] == lay[3]) & (df["step"] == steps[4])
    df.loc[sel, "value"] = np.nan
    df.to_csv(tmp_path / "runs" / "scale" / "stats.csv", index=False, na_rep="nan")
    _, c = client(tmp_path)

    code, runs = get(c, "/runs")
    assert code == 200
    assert [(r["run"], r["n_layers"], r["n_steps"], r["stats"]) for r in runs["runs"]] == [
        ("runs/scale", 12, 23, ["grad_norm", "grad_rms"])]

    order = ordered(12)
    idx = [lay.index(n) for n in order]
    for agg, fn in (("max", np.nanmax), ("mean", np.nanmean)):
        code, hm = get(c, "/heatmap", run="runs/scale", stat="grad_norm", max_cols=5, agg=agg)
        assert code == 200, hm
        assert [x["name"] for x in hm["layers"]] == order
        assert hm["n_steps"] == 23 and len(hm["columns"]) == 4
        # steps 0..220 in aligned ranges of w = 64 steps (32 would need 7 > 5 columns):
        # [0, 64), [64, 128), [128, 192), [192, 256): 7, 6, 7, 3 logged steps
        bounds = [(0, 7), (7, 13), (13, 20), (20, 23)]
        assert hm["columns"] == [[int(steps[a]), int(steps[b - 1])] for a, b in bounds]
        ref = np.array([[fn(raw[i, a:b]) for a, b in bounds] for i in idx])
        np.testing.assert_allclose(np.array(hm["values"], dtype=float), ref, rtol=1e-4)
        assert hm["vmin"] == pytest.approx(ref.min(), rel=1e-4)
        assert hm["vmax"] == pytest.approx(ref.max(), rel=1e-4)
    assert [(b["role"], b["first"], b["rows"], b["color"]) for b in hm["roles"]] == [
        (k, a, n, KIND_COLORS[k]) for k, a, n in (("embedding", 0, 1), ("attention", 1, 4),
                                                  ("mlp", 5, 4), ("norms", 9, 2),
                                                  ("output", 11, 1))]
    # no binning when the steps fit: the raw values, the NaN as null
    _, full = get(c, "/heatmap", run="runs/scale", stat="grad_norm")
    assert len(full["columns"]) == 23 and full["values"][order.index(lay[3])][4] is None

    # role summary: per role the median / min / max over its layers of the binned values
    code, rs = get(c, "/roles", run="runs/scale", stat="grad_norm", max_cols=5)
    assert code == 200
    bounds_mean = np.array([[np.nanmean(raw[i, a:b]) for a, b in bounds] for i in range(12)])
    hidden = [i for i, (n, r) in enumerate(synthetic_layers(12))
              if layer_kind(n, r) == "attention"]  # the old role names, mapped to kinds
    h = rs["roles"]["attention"]
    assert h["layers"] == 4 and h["color"] == KIND_COLORS["attention"]
    np.testing.assert_allclose(h["median"], np.median(bounds_mean[hidden], axis=0), rtol=1e-4)
    np.testing.assert_allclose(h["min"], bounds_mean[hidden].min(axis=0), rtol=1e-4)
    np.testing.assert_allclose(h["max"], bounds_mean[hidden].max(axis=0), rtol=1e-4)


def test_bad_requests_answer_400_with_a_message(tmp_path: Path) -> None:
    write_run(tmp_path / "a", 7, np.arange(5))
    _, c = client(tmp_path)
    cases = [
        (dict(run="nope", stat="grad_norm"), "no lens run 'nope' under the logdir (runs: a)"),
        (dict(stat="grad_norm"), "give ?run=<name>"),
        (dict(run="a", stat="noise_scale"), "statistic 'noise_scale' has no per-layer rows in "
                                            "this run (it has: grad_norm)"),
        (dict(run="a", stat="grad_norm", agg="median"), "agg must be one of ('max', 'mean')"),
        (dict(run="a", stat="grad_norm", max_cols="ten"), "max_cols must be an integer"),
        (dict(run="a", stat="grad_norm", max_cols=0), "max_cols must be in 1..4000"),
    ]
    for params, message in cases:
        code, body = get(c, "/heatmap", **params)
        assert code == 400 and message in body["error"], (params, body)
    # a run directory with run.json and no rows yet: the loader's message
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "run.json").write_text(json.dumps({"name": "b"}))
    code, body = get(c, "/heatmap", run="b", stat="grad_norm")
    assert code == 400 and "no rows yet" in body["error"]
    _, runs = get(c, "/runs")
    assert [r["run"] for r in runs["runs"]] == ["a", "b"] and "no rows yet" in runs["runs"][1]["error"]


def test_live_updates_reload_only_on_change(tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "live"
    write_run(run, 7, np.arange(10))
    calls = []
    real = plugin_tables.load_run
    monkeypatch.setattr(plugin_tables, "load_run", lambda p: calls.append(p) or real(p))
    _, c = client(tmp_path)
    _, first = get(c, "/heatmap", run="live", stat="grad_norm")
    _, again = get(c, "/heatmap", run="live", stat="grad_norm")
    assert len(calls) == 1 and again["version"] == first["version"]
    # the lens flushes: rows appended (the file grows)
    lay = synthetic_layers(7)
    with open(run / "stats.csv", "a") as f:
        for n, r in lay:
            f.write(f"10,{n},{r},grad_norm,2.5\n")
    _, later = get(c, "/heatmap", run="live", stat="grad_norm")
    assert len(calls) == 2 and later["version"] != first["version"]
    assert later["n_steps"] == 11 and later["columns"][-1] == [10, 10]
    assert {row[-1] for row in later["values"]} == {2.5}


def test_events_show_every_kind_with_its_fields(tmp_path: Path) -> None:
    run = tmp_path / "r"
    write_run(run, 7, np.arange(10))
    rows = [
        {"step": 3, "layer": "lm_head.weight", "kind": "grad_norm", "value": 9.0, "score": 4.2,
         "layers": []},
        {"step": 4, "layer": "global", "kind": "skipped_step", "value": 1.0, "score": 1.0,
         "layers": []},
        {"step": 5, "layer": "model.layers.0.mlp.up_proj.weight", "kind": "validity",
         "value": float("nan"), "score": 0.0, "layers": [], "family": "two_batch",
         "reason": "micro-batches of unequal size"},
    ]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lay'  # partial last line
    (run / "spikes.jsonl").write_text(text)
    _, c = client(tmp_path)
    code, ev = get(c, "/events", run="r")
    assert code == 200
    assert ev["kinds"] == {"grad_norm": 1, "skipped_step": 1, "validity": 1}
    assert [e["kind"] for e in ev["events"]] == ["grad_norm", "skipped_step", "validity"]
    v = ev["events"][2]
    assert v["family"] == "two_batch" and v["reason"] == "micro-batches of unequal size"
    assert v["value"] is None  # NaN is not JSON


def test_verdicts_of_the_report_covering_the_run(tmp_path: Path) -> None:
    for name in ("scale", "adamw"):
        write_run(tmp_path / "runs" / name, 7, np.arange(10), name=name)
    _, c = client(tmp_path)
    code, none = get(c, "/verdicts", run="runs/scale")
    assert code == 200 and none["verdicts"] == [] and "gradlens report" in none["hint"]
    report = tmp_path / "report"
    report.mkdir()
    verdicts = [
        {"question": "Q1", "answer": "yes", "numbers": {"p_value": 0.01}, "reason": "r",
         "kind": "output_highest", "stat": "noise_scale", "run": "scale",
         "run_dir": str(tmp_path / "runs" / "scale")},
        {"question": "Q1", "answer": "no", "numbers": {}, "reason": "r2",
         "kind": "output_highest", "stat": "noise_scale", "run": "adamw",
         "run_dir": str(tmp_path / "runs" / "adamw")},
    ]
    (report / "verdicts.json").write_text(json.dumps(verdicts))
    _, got = get(c, "/verdicts", run="runs/scale")
    assert [v["answer"] for v in got["verdicts"]] == ["yes"]
    assert got["source"] == str(report / "verdicts.json")


def test_heatmap_route_is_fast_at_200_layers_by_2000_steps(tmp_path: Path) -> None:
    """200 layers x 2,000 logged steps (0..19,990), binned to aligned ranges of 64 steps (313
    columns; 32 steps would need 625 > 400): the figure docs/api.md quotes."""
    write_run(tmp_path / "big", 200, np.arange(0, 20000, 10), stats=("grad_norm", "grad_rms"))
    _, c = client(tmp_path)
    t0 = time.perf_counter()
    code, hm = get(c, "/heatmap", run="big", stat="grad_norm")
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(3):
        code, hm = get(c, "/heatmap", run="big", stat="grad_norm")
    warm = (time.perf_counter() - t0) / 3
    assert code == 200 and len(hm["layers"]) == 200 and len(hm["columns"]) == 313
    assert hm["n_steps"] == 2000
    print(f"\nheatmap 200 x 2000 -> 200 x 313: first (reads the table) {cold:.2f} s, "
          f"cached {1e3 * warm:.0f} ms")
    assert warm < 2.0, warm


def test_parquet_and_csv_runs_answer_the_same(tmp_path: Path) -> None:
    """The same rows as CSV (read whole) and as the parquet store (70 flushes: a merged range
    of 64 and 6 parts, read from footers and per statistic): identical answers."""
    import pandas as pd

    from gradlens.sinks.table import TableSink

    steps = np.arange(0, 700, 10)
    write_run(tmp_path / "csv", 12, steps, stats=("grad_norm", "grad_rms"))
    df = pd.read_csv(tmp_path / "csv" / "stats.csv")
    sink = TableSink(tmp_path / "pq")
    sink.open(json.loads((tmp_path / "csv" / "run.json").read_text()))
    for _, g in df.groupby("step", sort=True):
        sink.write_stats(list(g.itertuples(index=False, name=None)))
        sink.flush()
    sink.close("finished")
    names = sorted(p.name for p in (tmp_path / "pq").glob("stats-*.parquet"))
    assert names[0] == "stats-000001-000064.parquet" and len(names) == 7
    _, c = client(tmp_path)
    _, runs = get(c, "/runs")
    a, b = ({k: v for k, v in r.items() if k not in ("run", "label")} for r in runs["runs"])
    assert a == b and a["n_steps"] == 70 and a["n_layers"] == 12 and a["last_step"] == 690
    for route, params in (("/heatmap", dict(stat="grad_norm")),
                          ("/heatmap", dict(stat="grad_rms", max_cols=7, agg="mean")),
                          ("/roles", dict(stat="grad_norm", max_cols=9))):
        _, x = get(c, route, run="csv", **params)
        _, y = get(c, route, run="pq", **params)
        for body in (x, y):
            body.pop("run")
            body.pop("version")
            if params.get("max_cols") == 7:  # pq's columns from the summaries: its colour
                body.pop("scale", None)  # scale's kind from them, not every step (_scale)
        assert x == y, route


def test_a_step_written_again_shows_its_last_value(tmp_path: Path) -> None:
    """A resumed run re-did step 50: both stores show the re-done values, steps in order."""
    import warnings

    from gradlens.sinks.table import TableSink

    lay = synthetic_layers(7)
    for fmt in ("csv", "parquet"):
        sink = TableSink(tmp_path / fmt, fmt)
        sink.open({"name": fmt, "layers": [{"name": n, "role": r} for n, r in lay]})
        for step in (*range(0, 70, 10), 50):  # 0..60, then 50 again
            value = 7.5 if step == 50 and sink.rows_written >= 7 * 7 else 1.0 + step
            sink.write_stats([(step, n, r, "grad_norm", value) for n, r in lay])
            sink.flush()
        sink.close("finished")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, c = client(tmp_path)
        for fmt in ("csv", "parquet"):
            code, hm = get(c, "/heatmap", run=fmt, stat="grad_norm")
            assert code == 200 and [a for a, _ in hm["columns"]] == list(range(0, 70, 10))
            assert {row[5] for row in hm["values"]} == {7.5}
            assert {row[4] for row in hm["values"]} == {41.0}
