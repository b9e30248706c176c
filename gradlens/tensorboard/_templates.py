"""The dashboard templates: their data classes, their validation, and loading the packaged ones
(the file format is described in :mod:`gradlens.tensorboard.dashboards`)."""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradlens.schema import LAYER_GROUPS, SPIKE_KINDS, STATS

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = [
    "CHART_KINDS",
    "GROUP_TITLES",
    "CategoryTemplate",
    "ChartTemplate",
    "DashboardError",
    "DashboardTemplate",
    "dashboard_files",
    "load_templates",
    "parse_template",
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
    """The packaged template files (``gradlens/tensorboard/templates/*.json``), sorted by name."""
    folder = resources.files("gradlens.tensorboard") / "templates"
    if not folder.is_dir():
        raise DashboardError(
            "the dashboard templates are missing (gradlens/tensorboard/templates is not a folder); "
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
