"""The /heatmap route's colour-scale kind is the report's (gradlens.report.scales) for the same
values: symlog for signed heavy-tailed statistics, log for positive ones over decades, else linear."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import LogNorm, Normalize, SymLogNorm

from gradlens.report.load import load_run
from gradlens.schema import STAT_COLUMNS
from tests.tb_plugin._runs import synthetic_layers
from tests.tb_plugin.test_routes import client, get

STEPS = np.arange(40)


def signed_values(n_layers: int, seed: int) -> dict[str, np.ndarray]:
    """layers x steps: a signed heavy-tailed statistic, a positive one over decades, a narrow
    signed one."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(0.0, 1.0, size=(n_layers, len(STEPS)))
    signal[2, 7], signal[5, 30] = -3e4, 2e4  # two noisy steps, far beyond the rest
    return {"twobatch_signal": signal,
            "grad_norm": np.exp(rng.normal(0.0, 2.0, size=(n_layers, len(STEPS)))),
            "loss_z": rng.uniform(-1.0, 2.0, size=(n_layers, len(STEPS)))}


def write_signed_run(run: Path, values: dict[str, np.ndarray]) -> None:
    """run.json + stats.csv with the given per-layer values and a run-level ``global`` row of
    each statistic (which neither the report's heatmap nor the plugin's colours)."""
    run.mkdir(parents=True, exist_ok=True)
    lay = synthetic_layers(next(iter(values.values())).shape[0])
    (run / "run.json").write_text(json.dumps(
        {"name": run.name, "finished": True, "layers": [{"name": n, "role": r} for n, r in lay]}))
    frames = []
    for stat, v in values.items():
        frames.append(pd.DataFrame({"step": np.tile(STEPS, len(lay)),
                                    "layer": np.repeat([n for n, _ in lay], len(STEPS)),
                                    "role": np.repeat([r for _, r in lay], len(STEPS)),
                                    "stat": stat, "value": v.ravel()}))
        frames.append(pd.DataFrame({"step": STEPS, "layer": "global", "role": "global",
                                    "stat": stat, "value": -1e9}))
    pd.concat(frames)[list(STAT_COLUMNS)].to_csv(run / "stats.csv", index=False)


@pytest.mark.parametrize(("stat", "kind", "norm_type"), [
    ("twobatch_signal", "symlog", SymLogNorm), ("grad_norm", "log", LogNorm),
    ("loss_z", "linear", Normalize)])
def test_the_route_sends_the_reports_scale(tmp_path: Path, stat: str, kind: str,
                                           norm_type: type) -> None:
    values = signed_values(10, seed=3)
    write_signed_run(tmp_path / "r", values)
    _, c = client(tmp_path)
    code, hm = get(c, "/heatmap", run="r", stat=stat, max_cols=8)  # binned: the scale is not
    assert code == 200, hm
    # the report's heatmap of the same run, read by the report's loader and drawn
    from gradlens.report.plots import plot_heatmap  # after the plugin: see the report's imports

    norm = plot_heatmap(load_run(tmp_path / "r"), stat).axes[0].collections[0].norm
    assert type(norm) is norm_type and hm["scale"]["kind"] == kind
    v = values[stat]
    assert (hm["scale"]["min"], hm["scale"]["max"]) == (v.min(), v.max())
    if kind == "symlog":  # linear within +-the median |v| (numpy, on the values written)
        assert hm["scale"]["linthresh"] == pytest.approx(np.median(np.abs(v)), rel=1e-12)
        assert hm["scale"]["linthresh"] == pytest.approx(norm.linthresh, rel=1e-12)
    else:
        assert "linthresh" not in hm["scale"]


def test_the_scale_follows_the_files(tmp_path: Path) -> None:
    values = signed_values(6, seed=4)
    write_signed_run(tmp_path / "r", values)
    _, c = client(tmp_path)
    assert get(c, "/heatmap", run="r", stat="twobatch_signal")[1]["scale"]["kind"] == "symlog"
    # the run rewrites the statistic as positive values over decades: the next poll says log
    values["twobatch_signal"] = np.exp(np.linspace(-5.0, 5.0, 6 * len(STEPS))).reshape(6, -1)
    write_signed_run(tmp_path / "r", values)
    hm = get(c, "/heatmap", run="r", stat="twobatch_signal")[1]
    assert hm["scale"] == {"kind": "log", "min": pytest.approx(np.exp(-5.0)),
                           "max": pytest.approx(np.exp(5.0))}
