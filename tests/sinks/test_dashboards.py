"""Dashboard templates: validation, layout building, and every charted tag is writable."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gradlens.schema import GLOBAL, SPIKE_KINDS, STATS, SpikeEvent, tb_group_tag, tb_tag
from gradlens.tensorboard.dashboards import (
    DashboardError,
    build_layout,
    dashboard_files,
    layout_tags,
    load_templates,
)
from gradlens.tensorboard.sink import TensorBoardSink
from tests.sinks._records import GROUPS, LAYERS, layer_dicts

ATTN = [n for n, g in GROUPS.items() if g == "attention"]


def _write_template(tmp_path: Path, data: dict, name: str = "bad.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def _template(chart: dict, **category) -> dict:
    return {"title": "T", "categories": [{"title": "C", "charts": [chart], **category}]}


def test_packaged_templates_load() -> None:
    names = [f.name for f in dashboard_files()]
    assert "by_statistic.json" in names and "by_group.json" in names
    templates = load_templates()
    assert [t.title for t in templates] == ["By statistic", "By group"]
    used = set().union(*(t.stats for t in templates))
    assert used <= set(STATS)
    # every category of built-in statistics has a chart in the packaged templates
    assert {STATS[s].category for s in used} >= {
        s.category for s in STATS.values() if s.category not in ("custom", "lag")}


@pytest.mark.parametrize("per_layer", [True, False])
def test_every_statistic_a_run_writes_has_a_chart(per_layer: bool) -> None:
    """The templates chart the presets' statistics; any other one a run writes (an opt-in
    family's, a user's) gets a chart in the generated "Other statistics" category."""
    from gradlens import catalog
    from gradlens.tensorboard.dashboards import OTHER_TITLE

    stats = catalog.stat_names([*catalog.FULL, "grad_lag"])
    layout = build_layout(layer_dicts(), stats=stats, per_layer=per_layer)
    regexes, exact = layout_tags(layout)
    for stat in stats:
        tags = {tb_tag(stat, GLOBAL), tb_tag(stat, LAYERS[0][0]), tb_tag(stat, LAYERS[-1][0]),
                *(tb_group_tag(stat, g, "mean") for g in set(GROUPS.values()))}
        assert any(re.match(r, t) for r in regexes for t in tags) or tags & set(exact), stat
    (other,) = [c for c in layout.category if c.title == f"By statistic: {OTHER_TITLE}"]
    charted = {ch.title.split(" by group")[0] for ch in other.chart}
    in_templates = set().union(*(t.stats for t in load_templates()))
    assert charted == set(stats) - in_templates  # each once, none a template charts
    assert {"grad_lag1_dot", "grad_lag2_dot", "pe_signal"} <= charted
    assert not [c for c in build_layout(layer_dicts()).category if OTHER_TITLE in c.title]


def _every_tag_the_lens_writes(tmp_path: Path, per_layer: bool = True) -> set[str]:
    """Write one step of every statistic for every layer (column statistics for matrices
    only, as the lens does), the run-level rows and one event of every kind; return the
    scalar tags TensorBoard reads back."""
    rows = []
    for name, role, layout, _ in LAYERS:
        for stat, info in STATS.items():
            if info.scope != "layer" or (info.category == "columns" and layout == "vector"):
                continue
            rows.append((1, name, role, stat, 1.0))
    for stat, info in STATS.items():
        if info.scope != "layer" or stat in ("grad_norm", "grad_norm_z", "grad_norm_preclip"):
            rows.append((1, GLOBAL, GLOBAL, stat, 1.0))
    events = [SpikeEvent(1, GLOBAL, kind, 1.0, 2.0) for kind in SPIKE_KINDS]
    with TensorBoardSink(tmp_path, per_layer=per_layer) as sink:
        sink.open({"layers": layer_dicts()})
        sink.write_stats(rows)
        sink.write_events(events)
    ea = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    ea.Reload()
    return set(ea.Tags()["scalars"])


@pytest.mark.parametrize("per_layer", [True, False])
def test_every_charted_tag_is_a_tag_the_lens_writes(tmp_path: Path, per_layer: bool) -> None:
    written = _every_tag_the_lens_writes(tmp_path, per_layer)
    layout = build_layout(layer_dicts(), per_layer=per_layer)
    regexes, exact = layout_tags(layout)
    assert regexes and exact
    for regex in regexes:
        assert any(re.match(regex, t) for t in written), f"no written tag matches {regex!r}"
    missing = sorted(set(exact) - written)
    assert not missing, f"margin charts name tags that are never written: {missing[:5]}"
    for cat in layout.category:  # and no empty chart: every chart names at least one tag
        for ch in cat.chart:
            assert list(ch.multiline.tag) or list(ch.margin.series), (cat.title, ch.title)


def test_group_categories_hold_only_their_layers() -> None:
    layout = build_layout(layer_dicts())
    cats = {c.title: c for c in layout.category}
    assert [t for t in cats if t.startswith("By group")] == [
        "By group: Embedding", "By group: Attention", "By group: MLP", "By group: Norms",
        "By group: Output"]
    attn = cats["By group: Attention"]
    (regex,) = next(ch for ch in attn.chart if ch.title == "grad_norm").multiline.tag
    matched = [n for n, *_ in LAYERS if re.match(regex, f"gradlens/grad_norm/{n}")]
    assert matched == ATTN
    assert not re.match(regex, "gradlens/grad_norm/model.layers.0.self_attn.q_proj.weightX")
    margin = next(ch for ch in attn.chart if ch.HasField("margin"))
    s = margin.margin.series[0]
    assert (s.value, s.lower, s.upper) == tuple(
        tb_group_tag("grad_rms", "attention", a) for a in ("mean", "min", "max"))
    # the norms group has only 1-D layers: no column-spread charts there
    norms = [ch.title for ch in cats["By group: Norms"].chart]
    assert not [t for t in norms if "unit_rms" in t]
    assert [t for t in (ch.title for ch in attn.chart) if "unit_rms_cv" in t]


def test_layout_without_layers_keeps_the_statistic_charts() -> None:
    layout = build_layout([])
    titles = [c.title for c in layout.category]
    assert titles and all(t.startswith("By statistic") for t in titles)
    assert not layout_tags(layout)[1]  # no margin chart without groups


def test_groups_derived_from_roles_when_missing() -> None:
    layers = [{"name": n, "role": r, "layout": lay} for n, r, lay, _ in LAYERS]
    assert build_layout(layers) == build_layout(layer_dicts())


def test_stats_filter_drops_charts() -> None:
    layout = build_layout(layer_dicts(), stats={"grad_norm"})
    regexes, exact = layout_tags(layout)
    assert all("grad_norm" in r or "spikes" in r for r in regexes)
    # only the group margins of the one statistic kept (grad_norm's, in the default view)
    assert exact and all(t.startswith("gradlens/by_group/grad_norm/") for t in exact)
    assert "By statistic: Variance estimators" not in [c.title for c in layout.category]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_template({"kind": "layers", "stat": "grad_nrom"}), r"unknown stat 'grad_nrom'.*grad_norm"),
        (_template({"kind": "global", "stats": ["loss", "los"]}), "unknown stat 'los'"),
        (_template({"kind": "lines", "stat": "grad_norm"}), "unknown chart kind 'lines'"),
        (_template({"kind": "layers", "stat": "grad_norm", "colour": "red"}), "unknown key"),
        (_template({"kind": "layers", "stat": "grad_norm", "group": "mlps"}),
         "unknown group 'mlps'"),
        (_template({"kind": "spikes", "kinds": ["nan"]}), "unknown spike kind 'nan'"),
        (_template({"kind": "layers"}), "needs a 'stat'"),
        (_template({"kind": "layers", "stat": "grad_norm"}, for_each_group=True),
         "must contain '{group}'"),
        ({"title": "T", "categories": []}, "non-empty list 'categories'"),
    ],
)
def test_template_errors_name_the_file(tmp_path: Path, data: dict, message: str) -> None:
    path = _write_template(tmp_path, data)
    with pytest.raises(DashboardError, match=message) as info:
        load_templates([path])
    assert "bad.json" in str(info.value)


def test_invalid_json_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "broken.json"
    p.write_text("{\"title\": ")
    with pytest.raises(DashboardError, match=r"broken\.json: not valid JSON"):
        load_templates([p])


def test_custom_template(tmp_path: Path) -> None:
    path = _write_template(tmp_path, {
        "title": "Mine", "categories": [{
            "title": "{group} only", "for_each_group": True, "groups": ["mlp"],
            "charts": [{"kind": "layers", "stat": "grad_rms", "title": "rms of {group}"}]}]},
        "mine.json")
    layout = build_layout(layer_dicts(), load_templates([path]))
    assert [c.title for c in layout.category] == ["Mine: MLP only"]
    assert layout.category[0].chart[0].title == "rms of MLP"


def _deep_layers(n_blocks: int) -> list[dict]:
    out = [{"name": "model.embed_tokens.weight", "role": "embedding"}]
    for b in range(n_blocks):
        for leaf in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
            out.append({"name": f"model.layers.{b}.{leaf}.weight", "role": "hidden"})
        out.append({"name": f"model.layers.{b}.input_layernorm.weight", "role": "vector",
                    "layout": "vector"})
    return [*out, {"name": "lm_head.weight", "role": "output"}]


def test_layouts_stay_readable_at_48_blocks() -> None:
    """The default view charts groups, never every layer; per-layer lines come one group each."""
    from gradlens.schema import LAYER_GROUPS

    layers = _deep_layers(48)  # 242 layers
    layout = build_layout(layers)
    default = [c for c in layout.category if c.title.startswith("By statistic")]
    assert default
    for cat in default:
        for ch in cat.chart:
            if ch.HasField("multiline"):  # only run-level and spike charts draw lines
                assert all(t.startswith(("^gradlens/global/", "gradlens/global/",
                                         "^gradlens/spikes/")) for t in ch.multiline.tag), ch
            else:
                assert len(ch.margin.series) <= len(LAYER_GROUPS)
    names = [d["name"] for d in layers]
    biggest = max(sum(1 for n in names if f".{g}" in n) for g in ("self_attn", "mlp"))
    for cat in layout.category:
        if not cat.title.startswith("By group"):
            continue
        for ch in cat.chart:
            for regex in getattr(ch.multiline, "tag", []):
                hits = [n for n in names if re.search(regex, f"gradlens/grad_norm/{n}")]
                assert len(hits) <= biggest < len(names), (cat.title, len(hits))
    titles = [ch.title for c in default for ch in c.chart]
    assert "total gradient norm the optimizer consumes (after clipping)" in titles
    assert "total gradient norm before clipping (as a trainer reports it)" in titles
    assert not any("as consumed; before clipping" in t for t in titles)
