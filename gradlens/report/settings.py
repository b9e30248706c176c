"""The run's settings as the report's header shows them, from ``run.json`` and the table.

- ``optimizer``: class and hyperparameters from ``run.json``'s ``optimizer_settings``
  (written by :mod:`gradlens.core.settings`): the values every group shares, then per group
  those that differ (``AdamW lr=0.003 betas=(0.9, 0.95) ...; decay: weight_decay=0.1``);
- ``batch size``: examples per optimizer step (the ``batch_size`` rows, or ``run.json``);
- ``learning rate``: per group, the first and last logged ``lr/<group>`` and the largest.
Runs written before these settings were recorded show the optimizer's class only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from gradlens.schema import GLOBAL

__all__ = ["SETTINGS_COLUMNS", "run_settings"]

SETTINGS_COLUMNS = ("optimizer", "batch size", "learning rate")
_SHOWN_FIRST = ("lr", "betas", "momentum", "eps", "weight_decay")
_HIDDEN = {"n_params", "name", "foreach", "fused", "capturable", "differentiable",
           "maximize", "initial_lr"}


def _val(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "(" + ", ".join(_val(x) for x in v) + ")"
    return str(v)


def _pairs(d: Mapping[str, Any]) -> str:
    keys = [k for k in _SHOWN_FIRST if k in d] + sorted(k for k in d if k not in _SHOWN_FIRST)
    return " ".join(f"{k}={_val(d[k])}" for k in keys if k not in _HIDDEN and d[k] is not None)


def optimizer_text(meta: Mapping[str, Any]) -> str:
    """One line: class, shared hyperparameters, then per group the differing ones."""
    s = meta.get("optimizer_settings")
    if not isinstance(s, Mapping):
        return str(meta.get("optimizer") or "")
    groups = [g for g in s.get("groups", []) if isinstance(g, Mapping)]
    name = str(s.get("class", meta.get("optimizer", "")))
    if s.get("wrapper"):
        name += f" (in {s['wrapper']})"
    if not groups:
        return name
    shared = {k: v for k, v in groups[0].items()
              if all(k in g and g[k] == v for g in groups[1:])}
    text = f"{name} {_pairs(shared)}".strip()
    for g in groups if len(groups) > 1 else []:
        own = {k: v for k, v in g.items() if k not in shared}
        if _pairs(own):
            text += f"; {g.get('name')}: {_pairs(own)}"
    return text


def lr_text(df: pd.DataFrame) -> str:
    """Per group: ``first -> last (max M)`` of the logged learning rate."""
    rows = df[(df["layer"] == GLOBAL) & df["stat"].astype(str).str.startswith("lr/")]
    parts = []
    for stat, g in rows.sort_values("step").groupby("stat", sort=True):
        v = g["value"].to_numpy()
        group = str(stat)[3:]
        parts.append(f"{group}: {v[0]:.3g} -> {v[-1]:.3g} (max {v.max():.3g})")
    return "; ".join(parts)


def batch_text(df: pd.DataFrame, meta: Mapping[str, Any]) -> str:
    b = df.loc[(df["layer"] == GLOBAL) & (df["stat"] == "batch_size"), "value"]
    if len(b):
        lo, hi = b.min(), b.max()
        return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"
    told = meta.get("batch_size")
    return "" if told is None else f"{told:g}"


def run_settings(meta: Mapping[str, Any], df: pd.DataFrame) -> dict[str, str]:
    """The header's settings cells of one run (:data:`SETTINGS_COLUMNS`)."""
    return {"optimizer": optimizer_text(meta), "batch size": batch_text(df, meta),
            "learning rate": lr_text(df)}
