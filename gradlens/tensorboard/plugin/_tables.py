"""What the plugin reads of a run's table: a summary from the files' footers, and one
statistic at a time.

For the parquet table (the default), :meth:`Table.summary` reads no row (the footers' step
and statistic lists, cached per file) and :meth:`Table.stat_matrix` reads only the row groups
of one statistic and four columns (:mod:`gradlens.report._parquet`); :meth:`Table.stat_columns`
reads a statistic's binned columns from the range files' summaries
(:mod:`gradlens.table_summary`) and the rows of the parts after them. A run in CSV or JSON
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
from gradlens.table_parts import list_parts
from gradlens.table_summary import Blocks, read_summary
from gradlens.tensorboard.plugin._bins import Columns, bin_width, combine_blocks, matrix_columns

__all__ = ["Table", "slice_columns"]


class Table:
    """One run directory's table; :meth:`refresh` with the format and files found now."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fmt: str | None = None
        self._footers: dict[Path, Any] = {}
        self._summaries: dict[Path, Any] = {}
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
            return _arrow_matrix(self._scan(stat, None))
        df = self._frame()
        df = df[df["stat"] == stat]
        names, lcode = np.unique(df["layer"].to_numpy(dtype=object), return_inverse=True)
        role_dict, rcode = np.unique(df["role"].to_numpy(dtype=object), return_inverse=True)
        return _matrix(names, lcode, role_dict.tolist(), rcode, df["step"].to_numpy(np.int64),
                       df["value"].to_numpy(np.float64))

    def _scan(self, stat: str, only: list[Path] | None, lo: int | None = None,
              hi: int | None = None, steps: set[int] | None = None) -> Any:
        """The rows of ``stat`` in steps ``lo..hi`` (None: open; ``steps``: only these), of
        the files ``only`` (None: all); pyarrow skips the row groups outside the range."""
        from gradlens.report._parquet import scan

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return scan(self.path, ([stat], None, (lo, hi), steps),
                        columns=("step", "layer", "role", "value"), only=only)

    def _disjoint_footers(self) -> list[tuple[int, int, Path]] | None:
        """The parts, when every part's footer is known and no logged step is in two of them
        (else None: a resumed run, read from the rows)."""
        parts = list_parts(self.path)
        seen: set[int] = set()
        total = 0
        for _, _, f in parts:
            hit = self._footers.get(f)
            if hit is None:
                return None
            seen.update(hit[1]["steps"])
            total += len(hit[1]["steps"])
        return parts if len(seen) == total else None

    def range_columns(self, stat: str, lo: int | None, hi: int | None, max_cols: int
                      ) -> tuple[list[str], dict[str, str], int, int | None, Columns]:
        """``(layers, role of each, logged steps in lo..hi, width (None: one column per logged
        step), columns)`` of ``stat`` over the steps ``lo..hi`` (inclusive, None: open),
        binned by :func:`~gradlens.tensorboard.plugin._bins.bin_width` over the steps in the
        range. Reads the range files' summary blocks that lie inside the range where the
        width is at least their block width, and the rows of the range's other steps (all of
        the range's rows where the summaries cannot serve: not parquet, few steps, narrow
        columns, a resumed run)."""
        found = self._range_from_summaries(stat, lo, hi, max_cols)
        if found is not None:
            return found
        if self.fmt == "parquet":
            layers, roles, steps, values = _arrow_matrix(self._scan(stat, None, lo, hi))
        else:
            layers, roles, steps, values = self.stat_matrix(stat)
        return slice_columns(layers, roles, steps, values, lo, hi, max_cols)

    def _range_from_summaries(self, stat: str, lo: int | None, hi: int | None, max_cols: int
                              ) -> tuple[list[str], dict[str, str], int, int | None, Columns] | None:
        if self.fmt != "parquet" or (parts := self._disjoint_footers()) is None:
            return None
        a, b = -np.inf if lo is None else lo, np.inf if hi is None else hi
        logged = {s for _, _, f in parts for s in self._footers[f][1]["steps"] if a <= s <= b}
        if len(logged) <= max_cols:  # one column per step at most: the rows are few
            return None
        sources: list[Blocks] = []
        files: list[Path] = []
        need: set[int] = set()
        for first, last, f in parts:
            here = np.array([s for s in self._footers[f][1]["steps"] if a <= s <= b], np.int64)
            if not len(here):
                continue
            blk = read_summary(f, stat, self._summaries) if first < last else None
            inside = np.zeros(0, bool) if blk is None else (blk.first >= a) & (blk.last <= b)
            if blk is not None and inside.any():
                sources.append(_sub_blocks(blk, inside))
                # the steps inside those blocks' spans (the blocks are in step order)
                lo_s, hi_s = blk.first[inside], blk.last[inside]
                k = np.searchsorted(lo_s, here, side="right") - 1
                here = here[(k < 0) | (here > hi_s[np.maximum(k, 0)])]
            if len(here):
                files.append(f)
                need.update(here.tolist())
        if not sources:
            return None
        raw = (_arrow_matrix(self._scan(stat, files, min(need), max(need), need))
               if need else None)
        return _combined(sources, raw, max_cols)

    def stat_columns(self, stat: str, max_cols: int
                     ) -> tuple[list[str], dict[str, str], int, Columns] | None:
        """``(layers, role of each, logged steps, columns)`` of ``stat`` from the range files'
        summaries (and the rows of the files after the last summarized one), or None where
        they cannot give the heatmap exactly: not parquet, no summary, a logged step in two
        files (a resumed run), a column narrower than a summary's blocks, or a summary missing
        before the last summarized file. Equal to the columns of :meth:`stat_matrix`'s
        matrix (:func:`~gradlens.tensorboard.plugin._bins.matrix_columns`), sums up to rounding."""
        if self.fmt != "parquet" or (parts := self._disjoint_footers()) is None:
            return None

        sources: list[Blocks] = []
        rest: list[Path] = []
        for first, last, f in parts:
            b = read_summary(f, stat, self._summaries) if first < last and not rest else None
            if b is None:
                rest.append(f)
            else:
                sources.append(b)
        if not sources:
            return None
        # before reading any row: bounds from the summaries and the other files' footers
        # (the statistic may miss some of their steps: fewer steps, a narrower span)
        spans = [(int(b.first[0]), int(b.last[-1])) for b in sources if len(b.ids)]
        rest_steps = [s for f in rest for s in self._footers[f][1]["steps"]]
        if rest_steps:
            spans.append((min(rest_steps), max(rest_steps)))
        upper = sum(int(b.count.sum()) for b in sources) + len(rest_steps)
        w = bin_width(min(a for a, _ in spans), max(b for _, b in spans), upper, max_cols) \
            if spans else None
        if w is None or any(b.block > w for b in sources):
            return None
        raw = _arrow_matrix(self._scan(stat, rest)) if rest else None
        found = _combined(sources, raw, max_cols)
        return None if found is None else (*found[:3], found[4])


def slice_columns(layers: list[str], roles: dict[str, str], steps: np.ndarray,
                  values: np.ndarray, lo: int | None, hi: int | None, max_cols: int
                  ) -> tuple[list[str], dict[str, str], int, int | None, Columns]:
    """:meth:`Table.range_columns` of a statistic's matrix (its steps in ``lo..hi``)."""
    keep = np.ones(len(steps), bool)
    if lo is not None:
        keep &= steps >= lo
    if hi is not None:
        keep &= steps <= hi
    steps, values = steps[keep], values[:, keep]
    w = bin_width(int(steps[0]), int(steps[-1]), len(steps), max_cols) if len(steps) else None
    return layers, roles, len(steps), w, matrix_columns(steps, values, w)


def _sub_blocks(b: Blocks, m: np.ndarray) -> Blocks:
    """The blocks ``m`` (a mask) of ``b``."""
    return Blocks(b.layers, b.roles, b.block, b.ids[m], b.first[m], b.last[m], b.count[m],
                  b.n[:, m], b.total[:, m], b.peak[:, m])


def _combined(sources: list[Blocks], raw: Any, max_cols: int
              ) -> tuple[list[str], dict[str, str], int, int, Columns] | None:
    """``(layers, roles, logged steps, width, columns)`` of summary blocks and the rows
    ``raw`` (a :meth:`Table.stat_matrix` of the other steps, or None), or None where the
    width is narrower than a block (or every step is its own column)."""
    firsts = [int(b.first[0]) for b in sources if len(b.ids)]
    lasts = [int(b.last[-1]) for b in sources if len(b.ids)]
    n_steps = sum(int(b.count.sum()) for b in sources)
    if raw is not None and len(raw[2]):
        firsts.append(int(raw[2][0]))
        lasts.append(int(raw[2][-1]))
        n_steps += len(raw[2])
    if not n_steps:
        return None
    w = bin_width(min(firsts), max(lasts), n_steps, max_cols)
    if w is None or any(b.block > w for b in sources):
        return None
    if raw is not None and len(raw[2]):
        c = matrix_columns(raw[2], raw[3], w)
        sources = [*sources, Blocks(raw[0], [raw[1][n] for n in raw[0]], w, c.first // w,
                                    c.first, c.last, c.count, c.n, c.total, c.peak)]
    layers, roles, cols = combine_blocks(sources, w)
    return layers, dict(zip(layers, roles, strict=True)), n_steps, w, cols


def _arrow_matrix(t: Any) -> tuple[list[str], dict[str, str], np.ndarray, np.ndarray]:
    """:meth:`Table.stat_matrix` of a scanned table (step, layer, role, value)."""
    if t is None or t.num_rows == 0:
        return [], {}, np.zeros(0, np.int64), np.zeros((0, 0))
    t = t.unify_dictionaries().combine_chunks()
    names = np.array(t["layer"].chunk(0).dictionary.to_pylist(), dtype=object)
    return _matrix(names, t["layer"].chunk(0).indices.to_numpy(),
                   t["role"].chunk(0).dictionary.to_pylist(),
                   t["role"].chunk(0).indices.to_numpy(), t["step"].to_numpy(),
                   t["value"].to_numpy())


def _matrix(names: np.ndarray, lcode: np.ndarray, role_dict: list[Any], rcode: np.ndarray,
            steps: np.ndarray, values: np.ndarray
            ) -> tuple[list[str], dict[str, str], np.ndarray, np.ndarray]:
    """Rows (layer code, role code, step, value), written in this order, as
    :meth:`Table.stat_matrix` returns them."""
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
