"""TensorBoardSink: event files read back with TensorBoard's EventAccumulator."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2, metadata

from gradlens.schema import GLOBAL, SPIKES_TEXT_TAG, tb_group_tag, tb_spike_tag, tb_tag
from gradlens.sinks.base import Histogram, LogdirError
from gradlens.tensorboard.dashboards import build_layout
from gradlens.tensorboard.sink import TensorBoardSink
from tests.sinks._records import sample_rows

Q = "model.layers.0.self_attn.q_proj.weight"
K = "model.layers.0.self_attn.k_proj.weight"


def _accumulate(logdir: Path) -> EventAccumulator:
    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0,
                                                      "histograms": 0})
    ea.Reload()
    return ea


def _scalars(ea: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in ea.Scalars(tag)]


@pytest.fixture
def written(tmp_path: Path, rows, events, meta) -> EventAccumulator:
    sink = TensorBoardSink(tmp_path, per_layer=True)
    sink.open(meta)
    sink.write_stats(rows)
    sink.write_histograms([
        Histogram(2, "lm_head.weight", "unit_rms_hist", [0.0, 0.5, 1.0, 2.0], [1.0, 6.0, 3.0]),
        Histogram(2, Q, "unit_rms_hist", [0.0, 1.0], [0.0]),  # empty: skipped
        # right limits with an underflow bucket, and exact moments (the lens's layout)
        Histogram(3, K, "unit_rms_hist", [0.5, 1.0, 2.0], [2.0, 1.0, 1.0],
                  moments=[0.0, 1.5, 4.0, 2.25, 3.25]),
        Histogram(3, "model.norm.weight", "unit_rms_hist", [math.nan, 1.0], [1.0, 1.0]),
    ])
    sink.write_events(events)
    sink.flush()
    sink.close()
    sink.close()  # idempotent
    return _accumulate(tmp_path)


def test_scalars(written: EventAccumulator, rows) -> None:
    for step, layer, _, stat, value in rows:
        got = dict(_scalars(written, tb_tag(stat, layer)))[step]
        if math.isnan(value):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(value, rel=1e-6)  # float32 in TensorBoard
    assert _scalars(written, "gradlens/global/loss") == [(1, 5.0), (2, 2.5),
                                                          (3, pytest.approx(5 / 3))]
    assert math.isnan(dict(_scalars(written, tb_tag("grad_norm", Q)))[1])
    assert dict(_scalars(written, tb_tag("grad_norm", K)))[1] == math.inf


def test_group_aggregates_use_finite_values(written: EventAccumulator, rows) -> None:
    # step 1: q_proj is NaN, k_proj is +inf -> no finite attention value at step 1
    assert [s for s, _ in _scalars(written, tb_group_tag("grad_norm", "attention", "mean"))] \
        == [2, 3]
    mlp = [r[4] for r in rows if r[0] == 2 and "mlp" in r[1]]
    assert _scalars(written, tb_group_tag("grad_norm", "mlp", "mean"))[1] == \
        (2, pytest.approx(sum(mlp) / 2, rel=1e-6))
    assert _scalars(written, tb_group_tag("grad_norm", "mlp", "min"))[1][1] == \
        pytest.approx(min(mlp), rel=1e-6)
    assert _scalars(written, tb_group_tag("grad_norm", "mlp", "max"))[1][1] == \
        pytest.approx(max(mlp), rel=1e-6)
    # step 1: up_proj is -inf -> the mlp aggregates are down_proj's value alone
    down = [r[4] for r in rows if r[0] == 1 and "down_proj" in r[1]]
    for agg in ("mean", "min", "max"):
        assert _scalars(written, tb_group_tag("grad_norm", "mlp", agg))[0] == \
            (1, pytest.approx(down[0], rel=1e-6))
    assert not [t for t in written.Tags()["scalars"] if t.startswith("gradlens/by_group/loss")]


def test_histograms(written: EventAccumulator) -> None:
    assert sorted(written.Tags()["histograms"]) == [
        tb_tag("unit_rms_hist", "lm_head.weight"), tb_tag("unit_rms_hist", K)]
    (h,) = written.Histograms(tb_tag("unit_rms_hist", "lm_head.weight"))
    v = h.histogram_value
    assert h.step == 2 and v.num == 10.0 and v.min == 0.0 and v.max == 2.0
    assert list(v.bucket_limit) == [0.5, 1.0, 2.0] and list(v.bucket) == [1.0, 6.0, 3.0]
    assert v.sum == pytest.approx(1 * 0.25 + 6 * 0.75 + 3 * 1.5)
    (h,) = written.Histograms(tb_tag("unit_rms_hist", K))
    v = h.histogram_value
    assert h.step == 3 and list(v.bucket_limit) == [0.5, 1.0, 2.0]
    assert list(v.bucket) == [2.0, 1.0, 1.0]
    assert (v.min, v.max, v.num, v.sum, v.sum_squares) == (0.0, 1.5, 4.0, 2.25, 3.25)


def test_spikes_as_text_and_scalars(written: EventAccumulator, events) -> None:
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in
             written.Tensors(SPIKES_TEXT_TAG)}
    assert sorted(texts) == [2, 3]
    assert texts[2].count("\n") == 1 and "**grad_norm**" in texts[2]
    assert "`model.layers.0.mlp.up_proj.weight`" in texts[2]
    assert "top layers" in texts[3] and "**nonfinite**" in texts[3]
    assert SPIKES_TEXT_TAG in written.PluginTagToContent("text")
    # two grad_norm events at step 2: the larger score is kept
    assert _scalars(written, tb_spike_tag("grad_norm")) == [(2, 9.5)]
    assert _scalars(written, tb_spike_tag("grad_norm_global")) == [(3, 6.0)]
    assert _scalars(written, tb_spike_tag("nonfinite")) == [(3, math.inf)]


def test_custom_scalars_layout_installed(written: EventAccumulator, meta) -> None:
    assert metadata.CONFIG_SUMMARY_TAG in written.PluginTagToContent(metadata.PLUGIN_NAME)
    (t,) = written.Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(t.tensor_proto.string_val[0])
    assert layout == build_layout(meta["layers"], per_layer=True)
    titles = [c.title for c in layout.category]
    assert "By statistic: Norms" in titles and "By group: Attention" in titles


def test_default_scalars_are_run_level_and_per_group(tmp_path: Path, rows, meta) -> None:
    """Without per_layer: no tag per (layer, statistic); the run-level rows and the group
    aggregates (same values as with per_layer) only, and a layout without per-layer charts."""
    with TensorBoardSink(tmp_path) as sink:
        sink.open(meta)
        sink.write_stats(rows)
    ea = _accumulate(tmp_path)
    tags = set(ea.Tags()["scalars"])
    layers = {r[1] for r in rows if r[1] != GLOBAL}
    assert not [t for t in tags if any(t.endswith("/" + la) for la in layers)]
    assert {t for t in tags if t.startswith("gradlens/global/")} == {
        tb_tag(r[3], GLOBAL) for r in rows if r[1] == GLOBAL}
    mlp = [r[4] for r in rows if r[0] == 2 and "mlp" in r[1] and r[3] == "grad_norm"]
    assert _scalars(ea, tb_group_tag("grad_norm", "mlp", "max"))[1] == \
        (2, pytest.approx(max(mlp), rel=1e-6))
    (t,) = ea.Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(t.tensor_proto.string_val[0])
    assert layout == build_layout(meta["layers"], per_layer=False)
    assert not [r for c in layout.category for ch in c.chart for r in ch.multiline.tag
                if not r.startswith(("^gradlens/global/", "^gradlens/spikes/"))]


def test_meta_stats_restrict_the_layout(tmp_path: Path, meta) -> None:
    with TensorBoardSink(tmp_path) as sink:
        sink.open({**meta, "stats": ["grad_norm", "loss"]})
        layout = sink.layout
    charts = [ch for c in layout.category for ch in c.chart]
    tags = [tag for ch in charts for tag in ch.multiline.tag]
    assert tags and all("grad_norm" in t or "loss" in t or "spikes" in t for t in tags)


def test_without_open_and_without_dashboards(tmp_path: Path) -> None:
    with TensorBoardSink(tmp_path, dashboards=False, group_aggregates=False) as sink:
        sink.write_stats(sample_rows())
    ea = _accumulate(tmp_path)
    assert not ea.Tags()["tensors"]
    assert not [t for t in ea.Tags()["scalars"] if "by_group" in t]


def test_non_writable_logdir(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(LogdirError):
        TensorBoardSink(tmp_path / "f" / "run")


def test_write_after_close_raises(tmp_path: Path) -> None:
    sink = TensorBoardSink(tmp_path)
    sink.close()
    with pytest.raises(RuntimeError, match="closed"):
        sink.write_stats(sample_rows())
