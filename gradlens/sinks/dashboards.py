"""TensorBoard custom-scalar dashboards from declarative templates.

The templates are the JSON files of the top-level ``dashboards/`` folder, shipped in the package
as ``gradlens/dashboards`` (read with :mod:`importlib.resources`). A template names statistics
and layer groups, never layer names; :func:`build_layout` turns the templates and the layers of
one run (``run.json``'s ``layers``) into a ``layout_pb2.Layout``, which
:class:`~gradlens.sinks.tensorboard.TensorBoardSink` writes once, at ``open``.

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

A ``for_each_group`` category is repeated for each group present in the run (in
``schema.LAYER_GROUPS`` order, or only the listed ``groups``); its title must contain
``{group}``. Category titles in the layout are prefixed with the template's title.

Templates are validated when loaded: an unknown key, chart kind, statistic, group or spike kind
raises :class:`DashboardError` naming the file and the chart.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradlens.schema import (
    GLOBAL,
    GROUP_AGGREGATES,
    LAYER_GROUPS,
    SPIKE_KINDS,
    STATS,
    tb_group_tag,
    tb_spike_tag,
    tb_tag,
)
from gradlens.sinks.base import layer_group

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = [
    "GROUP_TITLES",
    "CategoryTemplate",
    "ChartTemplate",
    "DashboardError",
    "DashboardTemplate",
    "build_layout",
    "dashboard_files",
    "layout_summary",
    "layout_tags",
    "load_templates",
]

GROUP_TITLES = {
    "embedding": "Embedding",
    "attention": "Attention",
    "mlp": "MLP",
    "norms": "Norms",
    "output": "Output",
    "other": "Other",
}

CHART_KINDS = ("layers", "group_margin", "global", "spikes")
_CHART_KEYS = {
    "layers": {"kind", "title", "stat", "group", "matrices_only"},
    "group_margin": {"kind", "title", "stat", "group", "matrices_only"},
    "global": {"kind", "title", "stats"},
    "spikes": {"kind", "title", "kinds"},
}
_CATEGORY_KEYS = {"title", "charts", "closed", "for_each_group", "groups"}
_TOP_KEYS = {"title", "order", "description", "categories"}


class DashboardError(ValueError):
    """A dashboard template is malformed; the message names the file and the chart."""


@dataclass(frozen=True)
class ChartTemplate:
    """One chart of a template (see the module docstring for the kinds)."""

    kind: str
    title: str | None = None
    stat: str | None = None
    stats: tuple[str, ...] = ()
    group: str | None = None
    matrices_only: bool = False
    kinds: tuple[str, ...] = ()


@dataclass(frozen=True)
class CategoryTemplate:
    """A category of charts, possibly repeated for each layer group."""

    title: str
    charts: tuple[ChartTemplate, ...]
    closed: bool = False
    for_each_group: bool = False
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class DashboardTemplate:
    """One validated template file."""

    title: str
    categories: tuple[CategoryTemplate, ...]
    source: str
    order: int = 0
    description: str = ""
    stats: frozenset[str] = field(default_factory=frozenset)


# ---------------------------------------------------------------------- loading and validation


def dashboard_files() -> list[Traversable]:
    """The packaged template files (``gradlens/dashboards/*.json``), sorted by name."""
    folder = resources.files("gradlens") / "dashboards"
    if not folder.is_dir():
        raise DashboardError(
            "the dashboard templates are missing (gradlens/dashboards is not a folder); "
            "reinstall gradlens"
        )
    return sorted((f for f in folder.iterdir() if f.name.endswith(".json")), key=lambda f: f.name)


def _suggest(value: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(value, list(known), n=3)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def _check_keys(where: str, obj: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise DashboardError(
            f"{where}: unknown key(s) {unknown}{_suggest(unknown[0], allowed)}; allowed: "
            f"{sorted(allowed)}"
        )


def _check_stat(where: str, stat: Any) -> str:
    if not isinstance(stat, str) or stat not in STATS:
        raise DashboardError(
            f"{where}: unknown stat {stat!r}{_suggest(str(stat), STATS)}; statistics are "
            "the names in gradlens.schema.STATS"
        )
    return stat


def _check_group(where: str, group: Any) -> str:
    if group not in LAYER_GROUPS:
        raise DashboardError(
            f"{where}: unknown group {group!r}{_suggest(str(group), LAYER_GROUPS)}; use one of "
            f"{list(LAYER_GROUPS)}"
        )
    return str(group)


def _str_list(where: str, key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise DashboardError(f"{where}: {key!r} must be a non-empty list of strings")
    return value


def _parse_chart(where: str, raw: Any, in_group_category: bool) -> ChartTemplate:
    if not isinstance(raw, dict):
        raise DashboardError(f"{where}: a chart must be a JSON object, got {raw!r}")
    kind = raw.get("kind")
    if kind not in CHART_KINDS:
        raise DashboardError(
            f"{where}: unknown chart kind {kind!r}{_suggest(str(kind), CHART_KINDS)}; use one "
            f"of {list(CHART_KINDS)}"
        )
    _check_keys(where, raw, _CHART_KEYS[kind])
    title = raw.get("title")
    if title is not None and not isinstance(title, str):
        raise DashboardError(f"{where}: 'title' must be a string")
    if "matrices_only" in raw and not isinstance(raw["matrices_only"], bool):
        raise DashboardError(f"{where}: 'matrices_only' must be true or false")
    if kind in ("layers", "group_margin"):
        if "stat" not in raw:
            raise DashboardError(f"{where}: a {kind!r} chart needs a 'stat'")
        stat = _check_stat(where, raw["stat"])
        group = raw.get("group")
        if group is not None:
            if in_group_category:
                raise DashboardError(
                    f"{where}: a chart in a for_each_group category takes the category's group;"
                    " remove 'group'"
                )
            group = _check_group(where, group)
        return ChartTemplate(kind, title, stat=stat, group=group,
                             matrices_only=bool(raw.get("matrices_only", False)))
    if kind == "global":
        stats = _str_list(where, "stats", raw.get("stats"))
        return ChartTemplate(kind, title, stats=tuple(_check_stat(where, s) for s in stats))
    kinds = raw.get("kinds")
    if kinds is not None:
        for k in _str_list(where, "kinds", kinds):
            if k not in SPIKE_KINDS:
                raise DashboardError(
                    f"{where}: unknown spike kind {k!r}{_suggest(k, SPIKE_KINDS)}; use one of "
                    f"{list(SPIKE_KINDS)}"
                )
    return ChartTemplate(kind, title, kinds=tuple(kinds or ()))


def parse_template(data: Any, source: str) -> DashboardTemplate:
    """Validate a decoded template; ``source`` (a file name) appears in every error."""
    if not isinstance(data, dict):
        raise DashboardError(f"{source}: a dashboard template must be a JSON object")
    _check_keys(source, data, _TOP_KEYS)
    title = data.get("title")
    if not isinstance(title, str) or not title:
        raise DashboardError(f"{source}: needs a non-empty string 'title'")
    order = data.get("order", 0)
    if not isinstance(order, int):
        raise DashboardError(f"{source}: 'order' must be an integer")
    raw_categories = data.get("categories")
    if not isinstance(raw_categories, list) or not raw_categories:
        raise DashboardError(f"{source}: needs a non-empty list 'categories'")
    categories = []
    stats: set[str] = set()
    for i, raw in enumerate(raw_categories):
        where = f"{source}: category {i}"
        if not isinstance(raw, dict):
            raise DashboardError(f"{where}: a category must be a JSON object")
        _check_keys(where, raw, _CATEGORY_KEYS)
        ctitle = raw.get("title")
        if not isinstance(ctitle, str) or not ctitle:
            raise DashboardError(f"{where}: needs a non-empty string 'title'")
        where = f"{source}: category {i} ({ctitle!r})"
        each = raw.get("for_each_group", False)
        if not isinstance(each, bool):
            raise DashboardError(f"{where}: 'for_each_group' must be true or false")
        if each and "{group}" not in ctitle:
            raise DashboardError(f"{where}: a for_each_group category title must contain "
                                 "'{group}'")
        if not each and "{group}" in ctitle:
            raise DashboardError(f"{where}: '{{group}}' in a title needs for_each_group: true")
        groups: tuple[str, ...] = ()
        if "groups" in raw:
            if not each:
                raise DashboardError(f"{where}: 'groups' needs for_each_group: true")
            groups = tuple(_check_group(where, g) for g in _str_list(where, "groups",
                                                                      raw["groups"]))
        raw_charts = raw.get("charts")
        if not isinstance(raw_charts, list) or not raw_charts:
            raise DashboardError(f"{where}: needs a non-empty list 'charts'")
        charts = []
        for j, rc in enumerate(raw_charts):
            chart = _parse_chart(f"{where} chart {j}", rc, each)
            if chart.title and "{group}" in chart.title and not (each or chart.group):
                raise DashboardError(f"{where} chart {j}: '{{group}}' in a title needs a group")
            charts.append(chart)
            stats.update(s for s in (chart.stat, *chart.stats) if s)
        closed = raw.get("closed", False)
        if not isinstance(closed, bool):
            raise DashboardError(f"{where}: 'closed' must be true or false")
        categories.append(CategoryTemplate(ctitle, tuple(charts), closed, each, groups))
    description = data.get("description", "")
    return DashboardTemplate(title, tuple(categories), source, order, str(description),
                             frozenset(stats))


def load_templates(
    paths: Iterable[str | Path | Traversable] | None = None,
) -> list[DashboardTemplate]:
    """Read and validate templates (default: the packaged ones), sorted by ``order``."""
    files = dashboard_files() if paths is None else [
        Path(p) if isinstance(p, str) else p for p in paths
    ]
    out = []
    for f in files:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DashboardError(f"{f.name}: not valid JSON: {err}") from None
        except OSError as err:
            raise DashboardError(f"{f.name}: cannot be read: {err}") from None
        out.append(parse_template(data, f.name))
    return sorted(out, key=lambda t: (t.order, t.source))


# ---------------------------------------------------------------------- building a layout


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
            out (and categories left empty). ``None`` keeps every chart.
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
    return layout_pb2.Layout(category=categories)


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
