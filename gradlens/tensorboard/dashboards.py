"""TensorBoard custom-scalar dashboards from declarative templates.

The templates are the JSON files of the top-level ``dashboards/`` folder, shipped in the package
as ``gradlens/tensorboard/templates`` (read with :mod:`importlib.resources`). A template names statistics
and layer groups, never layer names; :func:`build_layout` turns the templates and the layers of
one run (``run.json``'s ``layers``) into a ``layout_pb2.Layout``, which
:class:`~gradlens.tensorboard.sink.TensorBoardSink` writes once, at ``open``.

Template file::

    {"title": "By statistic", "order": 1, "description": "...",
     "categories": [
       {"title": "Norms", "closed": false, "charts": [
          {"kind": "layers", "stat": "grad_norm"},
          {"kind": "group_margin", "stat": "grad_rms"}]},
       {"title": "{group}", "for_each_group": true, "groups": ["attention", "mlp"],
        "charts": [{"kind": "layers", "stat": "grad_norm", "title": "grad_norm of {group}"}]}]}

Chart kinds (every chart takes an optional ``title``; ``{group}`` in a title is replaced by the
group's display name):

- ``layers``: one line per layer of ``stat`` (multiline chart, regex
  ``^gradlens/<stat>/``); with ``group`` (or inside a ``for_each_group`` category) only that
  group's layers (regex alternation of their exact names). ``matrices_only``: leave out 1-D
  layers, and skip the chart for a group that has none.
- ``group_margin``: mean with a min-max band over the layers of a group (margin chart, exact
  tags ``gradlens/by_group/<stat>/<group>/{mean,min,max}``); without ``group``, one band per
  group present in the run.
- ``global``: run-level ``stats`` (exact tags ``gradlens/global/<stat>``).
- ``spikes``: the spike-score scalars ``gradlens/spikes/<kind>`` (optionally only ``kinds``).

Given the statistics a run writes (``run.json``'s ``stats``), every one that no template charts
(a user statistic, an opt-in family's) gets a chart in a generated last category, "Other
statistics" (:func:`other_chart`).

A ``for_each_group`` category is repeated for each group present in the run (in
``schema.LAYER_GROUPS`` order, or only the listed ``groups``); its title must contain
``{group}``. Category titles in the layout are prefixed with the template's title.

Templates are validated when loaded: an unknown key, chart kind, statistic, group or spike kind
raises :class:`DashboardError` naming the file and the chart.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gradlens import catalog
from gradlens.schema import (
    GLOBAL,
    GROUP_AGGREGATES,
    LAYER_GROUPS,
    tb_group_tag,
    tb_spike_tag,
    tb_tag,
)
from gradlens.sinks.base import layer_group
from gradlens.tensorboard._templates import (
    CHART_KINDS,
    GROUP_TITLES,
    CategoryTemplate,
    ChartTemplate,
    DashboardError,
    DashboardTemplate,
    dashboard_files,
    load_templates,
    parse_template,
)

__all__ = [
    "CHART_KINDS",
    "GROUP_TITLES",
    "OTHER_TITLE",
    "CategoryTemplate",
    "ChartTemplate",
    "DashboardError",
    "DashboardTemplate",
    "build_layout",
    "dashboard_files",
    "layout_summary",
    "layout_tags",
    "load_templates",
    "parse_template",
]


OTHER_TITLE = "Other statistics"


@dataclass
class _Layer:
    name: str
    group: str
    matrix: bool


def _layers(layers: Iterable[Mapping[str, Any]]) -> list[_Layer]:
    out = []
    for layer in layers:
        name = str(layer["name"])
        role = str(layer.get("role", ""))
        group = layer.get("group") or layer_group(name, role)
        if "layout" in layer:
            matrix = layer["layout"] != "vector"
        elif role:
            matrix = role != "vector"
        else:
            matrix = len(layer.get("shape", (0, 0))) >= 2
        out.append(_Layer(name, str(group), matrix))
    return out


def _alternation(names: Sequence[str]) -> str:
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def build_layout(
    layers: Iterable[Mapping[str, Any]] = (),
    templates: Sequence[DashboardTemplate] | None = None,
    stats: Collection[str] | None = None,
    per_layer: bool = True,
) -> Any:
    """Turn templates and a run's layers into a TensorBoard custom-scalars ``Layout``.

    Args:
        layers: ``run.json``-style dicts with ``name`` and ``group`` (or ``role``, from which
            the group is derived), and ``layout`` (``"vector"`` marks 1-D layers).
        templates: validated templates (default: :func:`load_templates`).
        stats: the statistics the run writes, when known: charts of other statistics are left
            out (and categories left empty), and those no template charts get the "Other
            statistics" category. ``None`` keeps every chart.
        per_layer: the run has per-layer scalars. False (what ``TensorBoardSink`` writes by
            default): a ``layers`` chart becomes the ``group_margin`` chart of the same groups
            (the per-layer lines are in the gradlens tab).

    Returns:
        ``tensorboard.plugins.custom_scalar.layout_pb2.Layout``. Group charts of groups absent
        from ``layers`` are left out, so a run without layer metadata gets the per-statistic
        charts only.
    """
    from tensorboard.plugins.custom_scalar import layout_pb2

    templates = load_templates() if templates is None else templates
    info = _layers(layers)
    present = [g for g in LAYER_GROUPS if any(la.group == g for la in info)]

    def keep(stat: str) -> bool:
        return stats is None or stat in stats

    def members(group: str, matrices_only: bool) -> list[str]:
        return [la.name for la in info if la.group == group and (la.matrix or not matrices_only)]

    def chart(c: ChartTemplate, group: str | None) -> Any | None:
        group = group or c.group
        gtitle = GROUP_TITLES[group] if group else ""
        title = c.title.replace("{group}", gtitle) if c.title else None
        stat = c.stat or ""
        if c.kind == "layers" and not per_layer:
            c = dataclasses.replace(c, kind="group_margin")
        if c.kind == "layers":
            if not keep(stat):
                return None
            prefix = f"^{re.escape(tb_tag(stat, ''))}"
            if group is None:
                regex = prefix
            else:
                names = members(group, c.matrices_only)
                if not names:
                    return None
                regex = f"{prefix}{_alternation(names)}$"
            return layout_pb2.Chart(
                title=title or (f"{stat} ({gtitle})" if group and c.group else stat),
                multiline=layout_pb2.MultilineChartContent(tag=[regex]),
            )
        if c.kind == "group_margin":
            if not keep(stat):
                return None
            groups = [group] if group else present
            groups = [g for g in groups if members(g, c.matrices_only)]
            if not groups:
                return None
            series = [
                layout_pb2.MarginChartContent.Series(
                    **{k: tb_group_tag(stat, g, a) for k, a in
                       zip(("value", "lower", "upper"), GROUP_AGGREGATES, strict=True)}
                )
                for g in groups
            ]
            default = (f"{stat}: mean, min-max over {gtitle} layers" if group
                       else f"{stat} by group: mean, min-max")
            return layout_pb2.Chart(title=title or default,
                                    margin=layout_pb2.MarginChartContent(series=series))
        if c.kind == "global":
            wanted = [s for s in c.stats if keep(s)]
            if not wanted:
                return None
            tags = [f"^{re.escape(tb_tag(s, GLOBAL))}$" for s in wanted]
            return layout_pb2.Chart(title=title or ", ".join(wanted),
                                    multiline=layout_pb2.MultilineChartContent(tag=tags))
        # spikes
        base = re.escape(tb_spike_tag(""))
        regex = f"^{base}{_alternation(c.kinds)}$" if c.kinds else f"^{base}"
        return layout_pb2.Chart(title=title or "spike scores (largest per step and kind)",
                                multiline=layout_pb2.MultilineChartContent(tag=[regex]))

    categories = []
    for t in templates:
        for cat in t.categories:
            if cat.for_each_group:
                instances: list[str | None] = [
                    g for g in present if not cat.groups or g in cat.groups
                ]
            else:
                instances = [None]
            for g in instances:
                charts = [ch for ch in (chart(c, g) for c in cat.charts) if ch is not None]
                # without per-layer scalars two charts may become the same margin chart
                charts = list({ch.margin.SerializeToString() if ch.HasField("margin")
                               else id(ch): ch for ch in charts}.values())
                if not charts:
                    continue
                ctitle = cat.title.replace("{group}", GROUP_TITLES[g]) if g else cat.title
                categories.append(layout_pb2.Category(
                    title=f"{t.title}: {ctitle}", chart=charts, closed=cat.closed,
                ))
    if stats is not None:  # what no template charts: one generated category
        charted = set().union(*(t.stats for t in templates))
        charts = [ch for ch in (chart(other_chart(st), None) for st in stats
                                if st not in charted) if ch is not None]
        if charts:
            head = f"{templates[0].title}: " if templates else ""
            categories.append(layout_pb2.Category(title=head + OTHER_TITLE, chart=charts,
                                                  closed=True))
    return layout_pb2.Layout(category=categories)


def other_chart(stat: str) -> ChartTemplate:
    """The generated chart of a statistic no template charts: its run-level row for a
    ``global`` or ``run`` statistic (gradlens.catalog's scope), else its layers."""
    spec = catalog.STATS.get(stat)
    if spec is not None and spec.scope != "layer":
        return ChartTemplate("global", stats=(stat,))
    return ChartTemplate("layers", stat=stat)


def layout_tags(layout: Any) -> tuple[list[str], list[str]]:
    """Every tag a layout names: ``(multiline regexes, margin exact tags)``."""
    regexes: list[str] = []
    exact: list[str] = []
    for cat in layout.category:
        for ch in cat.chart:
            if ch.HasField("multiline"):
                regexes.extend(ch.multiline.tag)
            else:
                for s in ch.margin.series:
                    exact.extend((s.value, s.lower, s.upper))
    return regexes, exact


def layout_summary(layout: Any) -> Any:
    """The ``Summary`` proto that installs ``layout`` (what TensorBoard's custom-scalars plugin
    reads from the tag ``custom_scalars__config__``); no TensorFlow needed."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.plugins.custom_scalar import metadata

    tensor = TensorProto(dtype="DT_STRING", string_val=[layout.SerializeToString()],
                         tensor_shape=TensorShapeProto())
    smd = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
        plugin_name=metadata.PLUGIN_NAME))
    return Summary(value=[Summary.Value(tag=metadata.CONFIG_SUMMARY_TAG, tensor=tensor,
                                        metadata=smd)])
