"""Runs written by the previous version (``stats.csv`` / ``stats.jsonl``, stored under
``old_runs/``) still load, show in the plugin, export, and resume in their own format."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from gradlens.cli import main
from gradlens.report import load_meta, load_run
from gradlens.schema import GLOBAL
from gradlens.sinks.table import TableSink
from gradlens.tensorboard.plugin.data import RunStore

OLD = Path(__file__).parent / "old_runs"


def _reference(run: Path) -> list[tuple[int, str, str, str, float]]:
    """The rows parsed with the csv / json modules alone."""
    if (run / "stats.csv").exists():
        with open(run / "stats.csv", newline="") as f:
            r = csv.reader(f)
            assert next(r) == ["step", "layer", "role", "stat", "value"]
            return [(int(a), b, c, d, float(e)) for a, b, c, d, e in r]
    out = []
    for line in (run / "stats.jsonl").read_text().splitlines():
        d = json.loads(line)
        out.append((d["step"], d["layer"], d["role"], d["stat"], float(d["value"])))
    return out


def _same(a: list[float], b: list[float]) -> bool:
    return all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", ["v1_csv", "v1_jsonl"])
def test_an_old_run_loads_exports_and_shows(tmp_path: Path, name: str) -> None:
    run = OLD / name
    ref = _reference(run)
    assert len(ref) > 100
    df = load_run(run)
    assert list(df.itertuples(index=False, name=None))[:5] == ref[:5]
    assert _same(df["value"].tolist(), [r[4] for r in ref])
    assert load_meta(run)["finished"] is True
    # export to CSV, and the export reads back the same
    out = tmp_path / "out.csv"
    assert main(["export", str(run), "--csv", "-o", str(out)]) == 0
    back = tmp_path / "back"
    back.mkdir()
    shutil.copy(out, back / "stats.csv")
    assert _same(load_run(back)["value"].tolist(), df["value"].tolist())
    # the plugin: run list and a heatmap column equal to the table's values
    store = RunStore(OLD)
    entry = next(r for r in store.list_runs() if r["run"] == name)
    steps = sorted({r[0] for r in ref})
    assert entry["error"] is None and entry["n_steps"] == len(steps)
    assert entry["n_layers"] == len({r[1] for r in ref if r[1] != GLOBAL})
    hm = store.heatmap(name, "grad_norm")
    first = hm["layers"][0]["name"]
    want = [r[4] for r in ref if r[1] == first and r[3] == "grad_norm"]
    np.testing.assert_allclose(hm["values"][0], want, rtol=1e-4)  # 5 significant digits


def test_an_old_csv_run_resumes_in_csv(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(OLD / "v1_csv", run)
    n = len(_reference(run))
    with pytest.warns(UserWarning, match="already holds a run"):
        sink = TableSink(run)  # no format given: the run's own
    assert sink.format == "csv"
    sink.open({"name": "resumed"})
    sink.write_stats([(4, "w", "hidden", "grad_norm", 0.5)])
    sink.close("finished")
    assert not list(run.glob("stats-*.parquet"))
    df = load_run(run)
    assert len(df) == n + 1 and df["value"].iloc[-1] == 0.5
