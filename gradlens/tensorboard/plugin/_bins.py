"""Step downsampling of the heatmap: columns of aligned step ranges, and their aggregates.

A statistic logged at ``S`` steps, shown in at most ``max_cols`` columns: when
``S <= max_cols`` each logged step is a column. Otherwise the steps are cut into aligned
ranges of ``w`` steps (column ``step // w``), ``w`` the smallest power of two (>= 2) for which
the statistic's first and last logged steps are at most ``max_cols`` ranges apart; the
columns are the ranges holding a logged step (between ``max_cols / 2`` and ``max_cols`` of
them for a run without gaps). A column's boundaries depend on ``w`` alone, so a live run's
finished columns keep their values as it grows, and a column is a union of whole summary
blocks (:mod:`gradlens.table_summary`) whenever the blocks are no wider than ``w``.

Per layer and column the aggregates are ``n`` (finite values), ``total`` (their sum) and
``peak`` (their max); a cell is ``peak`` (``max``) or ``total / n`` (``mean``), NaN when
``n = 0`` (no row, or only non-finite values).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gradlens.table_summary import Blocks

__all__ = ["Columns", "bin_width", "cells", "combine_blocks", "matrix_columns"]


def bin_width(first: int, last: int, n_steps: int, max_cols: int) -> int | None:
    """Steps per column, or None when each logged step is its own column."""
    if n_steps <= max_cols:
        return None
    w = 2
    while last // w - first // w + 1 > max_cols:
        w *= 2
    return w


@dataclass
class Columns:
    """Per column: ``first``/``last`` logged step and ``count`` of logged steps; per layer x
    column: ``n``, ``total``, ``peak`` (``-inf`` where ``n = 0``)."""

    first: np.ndarray
    last: np.ndarray
    count: np.ndarray
    n: np.ndarray
    total: np.ndarray
    peak: np.ndarray

    def take(self, rows: Sequence[int] | np.ndarray) -> Columns:
        """The same columns for the layers ``rows`` (in that order)."""
        r = np.asarray(rows, np.int64)
        return Columns(self.first, self.last, self.count, self.n[r], self.total[r],
                       self.peak[r])


def matrix_columns(steps: np.ndarray, values: np.ndarray, w: int | None) -> Columns:
    """The columns of a layers x steps matrix (``steps`` sorted, distinct; NaN: no value)."""
    fin = np.isfinite(values)
    if w is None or not len(steps):
        return Columns(steps, steps, np.ones(len(steps), np.int64), fin.astype(np.int64),
                       np.where(fin, values, 0.0), np.where(fin, values, -np.inf))
    key = steps // w
    starts = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
    ends = np.append(starts[1:], len(steps)) - 1
    return Columns(steps[starts], steps[ends], ends - starts + 1,
                   np.add.reduceat(fin, starts, axis=1).astype(np.int64),
                   np.add.reduceat(np.where(fin, values, 0.0), starts, axis=1),
                   np.maximum.reduceat(np.where(fin, values, -np.inf), starts, axis=1))


def combine_blocks(sources: Sequence[Blocks], w: int) -> tuple[list[str], list[str], Columns]:
    """(layers in first-appearance order over ``sources`` (in file order), the role of each
    (from its first source), the columns of width ``w``) of block aggregates whose blocks
    divide ``w``. A block split across two sources adds up (their steps are disjoint)."""
    layers: dict[str, int] = {}
    roles: list[str] = []
    for b in sources:
        for name, role in zip(b.layers, b.roles, strict=True):
            if name not in layers:
                layers[name] = len(layers)
                roles.append(role)
    keys = [b.ids * b.block // w for b in sources]
    cols, inverse = np.unique(np.concatenate(keys) if keys else np.zeros(0, np.int64),
                              return_inverse=True)
    n_l, n_c = len(layers), len(cols)
    first = np.full(n_c, np.iinfo(np.int64).max)
    last = np.full(n_c, np.iinfo(np.int64).min)
    count = np.zeros(n_c, np.int64)
    n = np.zeros((n_l, n_c), np.int64)
    total = np.zeros((n_l, n_c))
    peak = np.full((n_l, n_c), -np.inf)
    at = 0
    for b in sources:
        c = inverse[at:at + len(b.ids)]
        at += len(b.ids)
        np.minimum.at(first, c, b.first)
        np.maximum.at(last, c, b.last)
        np.add.at(count, c, b.count)
        r = np.array([layers[name] for name in b.layers], np.int64)
        if not len(r):
            continue
        ix = (r[:, None], c[None, :])
        np.add.at(n, ix, b.n)
        np.add.at(total, ix, b.total)
        np.maximum.at(peak, ix, b.peak)
    return list(layers), roles, Columns(first, last, count, n, total, peak)


def cells(cols: Columns, agg: str) -> np.ndarray:
    """layers x columns: the max or the mean of each cell's finite values, NaN without any."""
    if agg == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):
            out = cols.total / cols.n
    else:
        out = cols.peak
    return np.where(cols.n > 0, out, np.nan)
