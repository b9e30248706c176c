"""Layers in model order (``run.json`` first, then the names), shared by the rankings, the
verdicts, the figures and the plugin; the names' vocabulary (kinds, short labels, block order)
is :mod:`gradlens.kinds`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from gradlens.kinds import block_index, in_block_rank, short_labels, short_layer_name
from gradlens.report.verdicts.base import layer_roles
from gradlens.schema import GLOBAL

__all__ = ["layer_order", "short_labels", "short_layer_name"]


def layer_order(
    df: pd.DataFrame | None = None,
    meta: Mapping[str, Any] | None = None,
    layers: Iterable[str] | None = None,
) -> list[str]:
    """Layers in model order, ``global`` excluded.

    The order of ``meta["layers"]`` (run.json, written in ``named_parameters`` order) wins; layers
    it does not list follow, sorted by (embedding first, block index, output last), then within
    a block attention before MLP before the rest, projections in their usual order (q, k, v, o;
    gate, up, down), ties kept in order of first appearance.
    """
    if layers is None:
        layers = [] if df is None or df.empty else pd.unique(df["layer"].astype(str))
    present = [str(x) for x in layers if str(x) != GLOBAL]
    seen = set(present)
    roles = layer_roles(df) if df is not None and not df.empty else {}
    ordered: list[str] = []
    if meta and isinstance(meta.get("layers"), Sequence):
        for d in meta["layers"]:
            name = d.get("name") if isinstance(d, Mapping) else None
            if name in seen and name not in ordered:
                ordered.append(name)
            if isinstance(d, Mapping):
                roles.setdefault(str(name), str(d.get("role", "")))
    rest = [x for x in present if x not in set(ordered)]

    def key(item: tuple[int, str]) -> tuple[int, float, int, int, int]:
        pos, name = item
        role = roles.get(name) or {"embed": "embedding", "pos_embed": "embedding",
                                   "lm_head": "output"}.get(short_layer_name(name), "")
        group = 0 if role == "embedding" else 2 if role == "output" else 1
        part, leaf = in_block_rank(name, role or "vector")
        return group, block_index(name), part, leaf, pos

    rest = [name for _, name in sorted(enumerate(rest), key=key)]
    return ordered + rest
