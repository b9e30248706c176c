"""What the plugin reads of a run's table: a summary from the files' footers, and one
statistic at a time.

For the parquet table (the default), :meth:`Table.summary` reads no row (the footers' step
and statistic lists, cached per file) and :meth:`Table.stat_matrix` reads only the row groups
of one statistic and four columns (:mod:`gradlens.report._parquet`). A run in CSV or JSON
lines (written by an older version, or with ``table_format="csv"``) is read whole once per
change of its file, as before.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradlens.report.load import find_tables, load_run
from gradlens.schema import GLOBAL

__all__ = ["Table"]


class Table:
    """One run directory's table; :meth:`refresh` with the format and files found now."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fmt: str | None = None
        self._footers: dict[Path, Any] = {}
        self._df: pd.DataFrame | None = None

    def refresh(self) -> None:
        """Forget what depends on the files' content (called when they changed)."""
        tables = find_tables(self.path)
        self.fmt = tables[0] if tables else None
        self._df = None

    def _frame(self) -> pd.DataFrame:
        if self._df is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a partial last line of a live run
                self._df = load_run(self.path)
        return self._df

    def summary(self) -> dict[str, Any]:
        """``stats`` (of per-layer rows), ``steps`` (sorted distinct logged steps), and
        ``layers`` (per-layer names, only for a text table; None for parquet)."""
        if self.fmt is None:
            return {"stats": [], "steps": [], "layers": None}
        if self.fmt == "parquet":
            from gradlens.report._parquet import table_info

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a damaged part: the views say what they read
                info = table_info(self.path, self._footers)
            return {"stats": info["stats"], "steps": info["steps"], "layers": None}
        df = self._frame()
        per_layer = df[df["layer"] != GLOBAL]
        return {"stats": sorted(pd.unique(per_layer["stat"]).tolist()),
                "steps": sorted(pd.unique(df["step"]).tolist()),
                "layers": pd.unique(per_layer["layer"]).tolist()}

    def stat_matrix(self, stat: str) -> tuple[list[str], dict[str, str], np.ndarray, np.ndarray]:
        """``(layers in first-appearance order, role of each, steps, layers x steps values)``
        of the per-layer rows of ``stat``; NaN where a layer has no row at a step, the
        last-written row where it has several."""
        if self.fmt == "parquet":
            from gradlens.report._parquet import scan

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t = scan(self.path, ([stat], None, (None, None), None),
                         columns=("step", "layer", "role", "value"))
            if t is None or t.num_rows == 0:
                return [], {}, np.zeros(0, np.int64), np.zeros((0, 0))
            t = t.unify_dictionaries().combine_chunks()
            layer_dict = t["layer"].chunk(0).dictionary.to_pylist() if t.num_rows else []
            role_dict = t["role"].chunk(0).dictionary.to_pylist()
            lcode = t["layer"].chunk(0).indices.to_numpy()
            rcode = t["role"].chunk(0).indices.to_numpy()
            steps = t["step"].to_numpy()
            values = t["value"].to_numpy()
            names = np.array(layer_dict, dtype=object)
        else:
            df = self._frame()
            df = df[df["stat"] == stat]
            names, lcode = np.unique(df["layer"].to_numpy(dtype=object), return_inverse=True)
            role_dict, rcode = np.unique(df["role"].to_numpy(dtype=object), return_inverse=True)
            role_dict = role_dict.tolist()
            steps = df["step"].to_numpy(np.int64)
            values = df["value"].to_numpy(np.float64)
        keep = names[lcode] != GLOBAL if len(lcode) else np.zeros(0, bool)
        lcode, rcode, steps, values = lcode[keep], rcode[keep], steps[keep], values[keep]
        if not len(lcode):
            return [], {}, np.zeros(0, np.int64), np.zeros((0, 0))
        # layers in order of first appearance (what the table wrote)
        pos = np.arange(len(lcode))
        first_at = np.full(len(names), len(lcode), np.int64)
        np.minimum.at(first_at, lcode, pos)
        order = np.flatnonzero(first_at < len(lcode))
        order = order[np.argsort(first_at[order], kind="stable")]
        first = first_at[order]
        row_of = np.full(len(names), -1, np.int64)
        row_of[order] = np.arange(len(order))
        if np.all(steps[1:] >= steps[:-1]):  # the usual case: steps in write order, O(n)
            new = np.concatenate([[True], steps[1:] != steps[:-1]])
            uniq_steps, col = steps[new], np.cumsum(new) - 1
        else:
            uniq_steps, col = np.unique(steps, return_inverse=True)
        row = row_of[lcode]
        cell = row * len(uniq_steps) + col
        if np.bincount(cell, minlength=len(order) * len(uniq_steps)).max() <= 1:
            idx = pos  # no cell written twice
        else:  # the last-written row of each cell: the first occurrence in reverse order
            _, last_rev = np.unique(cell[::-1], return_index=True)
            idx = len(cell) - 1 - last_rev
        matrix = np.full((len(order), len(uniq_steps)), np.nan)
        matrix[row[idx], col[idx]] = values[idx]
        roles = {str(names[c]): str(role_dict[rcode[i]])
                 for c, i in zip(order, first, strict=True)}
        return [str(names[c]) for c in order], roles, uniq_steps.astype(np.int64), matrix
