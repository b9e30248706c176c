"""Colour scales of the report's heatmaps: log / symmetric log for heavy tails, shared by runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import LogNorm, Normalize, SymLogNorm

from gradlens.report.figures import figure_plan
from gradlens.report.plots import heatmap_norm, plot_heatmap
from gradlens.report.verdicts.registry import ReportContext, RunData
from gradlens.schema import VARIANCE_ESTIMATORS
from tests.report._synth import make_table


def test_one_huge_negative_value_does_not_flatten_the_map():
    rng = np.random.default_rng(0)
    v = rng.normal(1.0, 0.5, size=2000)
    v[17] = -160_000.0
    lin = Normalize(vmin=v.min(), vmax=v.max())
    norm = heatmap_norm(v)
    assert isinstance(norm, SymLogNorm)
    assert norm.linthresh == pytest.approx(np.median(np.abs(v[v != 0])))
    assert (norm.vmin, norm.vmax) == (pytest.approx(np.percentile(v, 0.5)),
                                      pytest.approx(np.percentile(v, 99.5)))
    others = np.delete(v, 17)
    # linear: every other value within 1e-4 of the top colour; symlog: a real spread of colours
    assert np.ptp(np.asarray(lin(others))) < 1e-4
    assert np.ptp(np.asarray(norm(others))) > 0.9  # the others use (nearly) every colour
    assert float(norm(-160_000.0)) == 0.0  # the outlier takes the end colour


def test_positive_values_over_decades_get_a_log_scale_and_narrow_ones_stay_linear():
    assert isinstance(heatmap_norm([1e-3, 1.0, 50.0]), LogNorm)
    n = heatmap_norm([1.0, 3.0, 7.0])
    assert type(n) is Normalize and (n.vmin, n.vmax) == (1.0, 7.0)
    assert type(heatmap_norm([-1.0, 0.5, 2.0])) is Normalize  # signed, not heavy-tailed
    with pytest.raises(ValueError, match="no finite values"):
        heatmap_norm([np.nan])


def test_report_heatmaps_share_one_colour_scale_across_runs():
    a = make_table(20, seed=0, estimators=("noise_scale",)).assign(run="a")
    b = make_table(20, seed=1, estimators=("noise_scale",)).assign(run="b")
    b.loc[b["stat"] == "noise_scale", "value"] *= 1e3  # run b's values are 1000x larger
    runs = [RunData(d, d.iloc[:0], {}, x, path=Path(x), slug=x) for x, d in (("a", a), ("b", b))]
    figs = {f.key: f for f in figure_plan(ReportContext(runs, pd.concat([a, b]), n_boot=50))}
    meshes = [figs[f"heatmap_noise_scale_{x}"].draw().axes[0].collections[0] for x in "ab"]
    both = pd.concat([a, b])
    vals = both.loc[(both["stat"] == "noise_scale") & (both["layer"] != "global"), "value"]
    for m in meshes:
        assert isinstance(m.norm, LogNorm)
        assert (m.norm.vmin, m.norm.vmax) == (pytest.approx(vals[vals > 0].min()),
                                             pytest.approx(vals.max()))
    alone = plot_heatmap(a, "noise_scale").axes[0].collections[0].norm
    assert alone.vmax < meshes[0].norm.vmax  # on its own scale run a would fill the colours


@pytest.mark.parametrize(("estimators", "expected"), [
    (VARIANCE_ESTIMATORS, {"compare_grad_norm", "compare_var_per_element", "compare_noise_scale",
                           "compare_unit_rms_cv", "ranking_twobatch_trace_r",
                           "ranking_var_per_element_r", "ranking_noise_scale_r",
                           "heatmap_grad_norm_r", "heatmap_var_per_element_r",
                           "heatmap_noise_scale_r", "heatmap_unit_rms_cv_r", "spikes_r",
                           "loss", "spread_unit_rms_cv"}),
    # one micro-batch (the gns preset): the per-example estimators stand in, in the overview's
    # comparisons too (the catalog's heatmap slots choose both)
    (("pe_trace", "pe_var_per_element", "pe_noise_scale", "temporal_var"),
     {"compare_grad_norm", "compare_pe_var_per_element", "compare_pe_noise_scale",
      "compare_unit_rms_cv", "ranking_pe_trace_r",
      "ranking_pe_var_per_element_r", "ranking_pe_noise_scale_r", "heatmap_grad_norm_r",
      "heatmap_pe_var_per_element_r", "heatmap_pe_noise_scale_r", "heatmap_unit_rms_cv_r",
      "spikes_r", "loss", "spread_unit_rms_cv"}),
])
def test_a_one_run_report_draws_a_few_figures_per_kind(estimators, expected):
    df = make_table(20, seed=0, estimators=tuple(estimators))
    run = RunData(df, df.iloc[:0], {}, "r", path=Path("r"), slug="r")
    assert {f.key for f in figure_plan(ReportContext([run], df, n_boot=50))} == expected
