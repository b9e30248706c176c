"""Figures: right shape, right number of artists, Agg canvas, no pyplot state."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection, QuadMesh
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from gradlens.report.plots import (
    OUTPUT_COLOR,
    plot_global,
    plot_heatmap,
    plot_ranking,
    plot_role_spread,
    plot_run_comparison,
    plot_spike_timeline,
    spans_decades,
)
from gradlens.report.verdicts import short_layer_name
from tests.report._synth import layers, make_spikes, make_table

N_STEPS = 20
N_LAYERS = len(layers())


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return make_table(N_STEPS, seed=0, estimators=("noise_scale", "twobatch_trace"))


@pytest.fixture(scope="module")
def two(table) -> pd.DataFrame:
    other = make_table(N_STEPS, seed=4, estimators=("noise_scale",), loss_scale=1.3)
    return pd.concat([table.assign(run="scale"), other.assign(run="adamw")], ignore_index=True)


def _data_lines(ax) -> list:
    return [ln for ln in ax.lines if len(ln.get_xdata()) > 1]


def _check(fig: Figure) -> None:
    assert isinstance(fig, Figure)
    assert isinstance(fig.canvas, FigureCanvasAgg)
    assert plt.get_fignums() == []  # nothing registered with pyplot


def test_heatmap_is_layers_by_steps_in_model_order(table):
    fig = plot_heatmap(table.sample(frac=1.0, random_state=1), "noise_scale")
    _check(fig)
    assert len(fig.axes) == 2  # heatmap + colour bar
    mesh = fig.axes[0].collections[0]
    assert isinstance(mesh, QuadMesh)
    assert mesh.get_array().shape == (N_LAYERS, N_STEPS)
    ticks = fig.axes[0].get_yticklabels()
    assert [t.get_text() for t in ticks] == [short_layer_name(n) for n, _, _ in layers()]
    assert ticks[-1].get_text() == "lm_head" and ticks[-1].get_color() == OUTPUT_COLOR
    assert not isinstance(mesh.norm, LogNorm)  # values within a decade: linear scale


def test_heatmap_log_scale_when_values_span_decades(table):
    fig = plot_heatmap(table, "twobatch_trace")
    mesh = fig.axes[0].collections[0]
    assert isinstance(mesh.norm, LogNorm)
    assert "log scale" in fig.axes[1].get_ylabel()
    assert "raw" in fig.axes[0].get_title()


def test_heatmap_unknown_stat_raises(table):
    with pytest.raises(ValueError, match="no finite values"):
        plot_heatmap(table, "pe_trace")


def test_ranking_one_dot_and_one_ci_per_layer(table):
    fig = plot_ranking(table, "noise_scale", n_boot=200)
    _check(fig)
    ax = fig.axes[0]
    dots = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(dots) == 1 and len(dots[0].get_offsets()) == N_LAYERS
    assert len(ax.collections[0].get_segments()) == N_LAYERS  # CI bars
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[-1] == "lm_head"  # largest mean at the top
    assert ax.get_yticklabels()[-1].get_color() == OUTPUT_COLOR


def test_ranking_top_keeps_the_output_layer():
    df = make_table(N_STEPS, seed=3, output_first=0.0, estimators=("noise_scale",))
    ax = plot_ranking(df, "noise_scale", n_boot=100, top=3).axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert "lm_head" in labels and len(labels) in (3, 4)


def test_spike_timeline_lanes_and_annotations(table):
    fig = plot_spike_timeline(make_spikes(), table)
    _check(fig)
    assert len(fig.axes) == 2  # loss above, events below
    loss_ax, ax = fig.axes
    lines = _data_lines(loss_ax)
    assert [len(ln.get_xdata()) for ln in lines] == [N_STEPS, 2, 2, 2]  # loss + 3 spike steps
    assert sum(len(c.get_offsets()) for c in ax.collections) == 4
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "grad_norm", "grad_norm_global", "loss"]
    texts = [t.get_text() for t in ax.texts]
    assert "lm_head, L1.mlp.down" in texts and "lm_head, embed" in texts
    assert len(texts) == 3  # two attributed global events + one per-layer event


def test_spike_timeline_without_events():
    fig = plot_spike_timeline(make_spikes().iloc[:0])
    assert len(fig.axes) == 1
    assert fig.axes[0].texts[0].get_text() == "no spike events"


def test_run_comparison_one_panel_per_role_one_line_per_run(two):
    fig = plot_run_comparison(two, "noise_scale")
    _check(fig)
    assert len(fig.axes) == 5  # the kinds (the synthetic run's old role names mapped)
    assert [ax.get_title() for ax in fig.axes] == ["embedding", "attention", "mlp", "norms",
                                                   "output"]
    for ax in fig.axes:
        assert len(_data_lines(ax)) == 2
    assert len(plot_run_comparison(two, "unit_rms_cv").axes) == 4  # norm gains: no columns


def test_global_loss_one_line_per_run(two):
    fig = plot_global(two, "loss")
    _check(fig)
    lines = _data_lines(fig.axes[0])
    assert len(lines) == 2 and all(len(ln.get_xdata()) == N_STEPS for ln in lines)


def test_role_spread_box_per_role(two):
    fig = plot_role_spread(two, "unit_rms_cv")
    _check(fig)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [
        "embedding", "attention", "mlp", "output"]


def test_spans_decades():
    assert spans_decades([1.0, 500.0]) and not spans_decades([1.0, 50.0])
    assert not spans_decades([-1.0, 500.0])
