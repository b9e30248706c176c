"""examples/custom_statistic.py: a user statistic reaches the table, TensorBoard's scalars,
the predefined dashboards (their generated "Other statistics" category) and the report (a
layer x step heatmap, from the declaration run.json keeps), with the value checked against
one computed here from the same gradients."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gradlens
from gradlens import catalog
from gradlens.report import build_report, load_meta, load_run
from gradlens.schema import tb_group_tag

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_statistic.py"


def _example():
    spec = importlib.util.spec_from_file_location("example_custom_statistic", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_custom_statistic_in_table_and_tensorboard(tmp_path):
    ex = _example()
    out = ex.main(["--out", str(tmp_path / "run"), "--steps", "3"])
    df = load_run(out)
    rows = df[df.stat == "sign_opposition"]
    assert sorted(rows.step.unique()) == [1, 2, 3]
    assert rows.value.between(0, 1).all() and rows.value.std() > 0
    acc = EventAccumulator(out, size_guidance={"scalars": 0})
    acc.Reload()
    assert tb_group_tag("sign_opposition", "output", "mean") in acc.Tags()["scalars"]
    # the predefined dashboards: a chart in the generated category, on the written tags
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    (t,) = acc.Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(t.tensor_proto.string_val[0])
    (other,) = [c for c in layout.category if c.title == "By statistic: Other statistics"]
    (chart,) = [ch for ch in other.chart if "sign_opposition" in ch.title]
    series = [s.value for s in chart.margin.series]  # the default view: group margins
    assert tb_group_tag("sign_opposition", "output", "mean") in series
    assert set(series) <= set(acc.Tags()["scalars"])
    # the report: run.json keeps the declaration, and the report draws the heatmap
    spec = load_meta(out)["stat_specs"]["sign_opposition"]
    assert (spec["category"], spec["scope"], spec["heatmap"]) == ("custom", "layer",
                                                                  "sign_opposition")
    assert "grad_norm" not in load_meta(out)["stat_specs"]
    paths = build_report([out], tmp_path / "report", progress=False)
    key = next(k for k in paths.figures if k.startswith("heatmap_sign_opposition_"))
    assert paths.figures[key].stat().st_size > 0
    md = paths.markdown.read_text()
    assert f"figures/{key}.png" in md and "sign_opposition, layer x step" in md


def test_a_report_reads_user_declarations_from_the_run():
    """In a process where the user's class is not registered, the report still follows the
    declaration run.json recorded (no heatmap where the user asked for none)."""
    meta = {"stat_specs": {"mine": {"name": "mine", "doc": "d", "category": "custom",
                                    "scope": "layer", "reduce": "mean", "heatmap": None}}}
    assert "mine" not in catalog.STATS
    assert catalog.heatmap_stats({"grad_norm", "mine"}, [meta]) == ["grad_norm"]
    assert catalog.heatmap_stats({"grad_norm", "mine"}) == ["grad_norm", "mine"]


def test_custom_statistic_value_and_clash():
    import torch

    ex = _example()
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    lens = gradlens.GradLens(model, preset="minimal", statistics=[ex.SignOpposition])
    model(torch.randn(5, 4)).pow(2).sum().backward()
    want = {n: float((p.grad * p < 0).float().mean()) for n, p in model.named_parameters()}
    lens.step()
    lens.flush()
    got = lens.memory.frame()
    lens.close()
    for name, value in want.items():
        sel = got[(got.layer == name) & (got.stat == "sign_opposition")]
        assert float(sel.value.iloc[0]) == pytest.approx(value)

    class Clash(gradlens.LayerStatistic):
        name = "clash"
        emits = ("grad_norm",)

    with pytest.raises(ValueError, match="already exists"):
        gradlens.GradLens(model, statistics=[Clash])
