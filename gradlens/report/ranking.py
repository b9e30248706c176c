"""Layer rankings that one step cannot decide: per-step ranks, their median, a block bootstrap.

At each step every layer with a finite value gets its rank among the layers, ``1 + the number
of other layers whose value is >= its own`` (ties count against it). A layer's place in the
ranking is ordered by

    (median over steps of its rank,  mean over steps of its rank,  median value, largest first)

so a single step (a loss spike that multiplies one layer's value by 1e6) moves a layer's
median rank by at most one position of the sorted per-step ranks, and its mean rank by at most
``(L - 1) / n``: it cannot carry a layer to the top. The output-highest verdict
(:func:`gradlens.report.verdicts.output_highest_verdict`) uses :func:`rank_order`, the same
computation, so the ranking and the verdict never disagree about which layer is first.

Uncertainty: the steps are resampled as blocks of consecutive steps (circular block
bootstrap, the same resample for every layer so the comparison stays paired); ``ci_low`` /
``ci_high`` bound the layer's median value, ``p_first`` is the fraction of replicates in which
the layer comes first by the key above.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from gradlens.report.layer_names import layer_order, short_labels
from gradlens.report.verdicts.base import layer_roles, select_run, wide_table
from gradlens.stats.noise_scale import circular_block_indices

__all__ = ["bootstrap_indices", "layer_ranking", "rank_order", "step_ranks"]

_MAX_CHUNK = 4_000_000  # elements per bootstrap chunk (bounds memory on long runs)


def bootstrap_indices(n: int, n_boot: int, seed: int = 0, block: int | str | None = "auto"
                      ) -> np.ndarray:
    """``(n_boot, n)`` step indices for a circular block bootstrap.

    Each replicate strings together blocks of ``block`` consecutive steps (wrapping around) that
    start at uniform random positions, so short-range autocorrelation survives resampling.
    ``block="auto"`` uses ``ceil(n ** (1/3))``, the usual rate for block length; ``1`` or ``None``
    is the plain i.i.d. bootstrap. Seeded: the same arguments give the same indices.
    """
    if block in (None, "auto"):
        b = 1 if block is None else max(1, math.ceil(max(n, 1) ** (1 / 3)))
    else:
        b = int(block)
        if b < 1:
            raise ValueError(f"block must be >= 1 or 'auto', got {block!r}")
    return circular_block_indices(n, n_boot, b, np.random.default_rng(seed))


def step_counts(idx: np.ndarray, n: int) -> np.ndarray:
    """How often each step appears in each replicate: ``(n_boot, n)``."""
    c = np.zeros((idx.shape[0], n))
    np.add.at(c, (np.repeat(np.arange(idx.shape[0]), idx.shape[1]), idx.ravel()), 1.0)
    return c


def weighted_median(vals: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Lower weighted median of the finite ``vals`` (one per step) per replicate (row of
    ``counts``): one sort and a cumulative sum. NaN where a replicate has no finite value."""
    ok = np.isfinite(vals)
    steps = np.nonzero(ok)[0]
    if steps.size == 0:
        return np.full(counts.shape[0], np.nan)
    order = steps[np.argsort(vals[steps], kind="stable")]
    out = np.empty(counts.shape[0])
    chunk = max(1, _MAX_CHUNK // order.size)
    for lo in range(0, counts.shape[0], chunk):
        w = counts[lo:lo + chunk][:, order]
        cw = np.cumsum(w, axis=1)
        pos = np.argmax(cw >= cw[:, -1:] / 2.0, axis=1)
        res = vals[order][pos]
        out[lo:lo + chunk] = np.where(cw[:, -1] > 0, res, np.nan)
    return out


def step_ranks(x: np.ndarray) -> np.ndarray:
    """Per-step ranks of the layers (``x``: steps x layers): ``1 + #{other finite values >=
    own}``; NaN where the value is not finite."""
    r = sps.rankdata(-np.where(np.isfinite(x), x, np.nan), method="max", axis=1,
                     nan_policy="omit")
    return np.where(np.isfinite(x), r, np.nan)


def _keys(ranks: np.ndarray, values: np.ndarray) -> pd.DataFrame:
    with np.errstate(all="ignore"):
        return pd.DataFrame({
            "median_rank": np.nanmedian(ranks, axis=0),
            "mean_rank": np.nanmean(ranks, axis=0),
            "median": np.nanmedian(values, axis=0),
        })


def rank_order(wide: pd.DataFrame) -> pd.DataFrame:
    """The layers of ``wide`` (steps x layers) in ranking order with their keys: columns
    ``layer, median_rank, mean_rank, median, n_steps, rank`` (see the module docstring)."""
    x = wide.to_numpy(dtype=float)
    keys = _keys(step_ranks(x), x)
    keys.insert(0, "layer", list(wide.columns))
    keys["n_steps"] = np.isfinite(x).sum(axis=0)
    keys = keys[keys["n_steps"] > 0]
    keys = keys.assign(_neg=-keys["median"]).sort_values(
        ["median_rank", "mean_rank", "_neg"], kind="stable").drop(columns="_neg")
    keys["rank"] = np.arange(1, len(keys) + 1)
    return keys.reset_index(drop=True)


def layer_ranking(
    df: pd.DataFrame,
    stat: str,
    *,
    run: str | None = None,
    meta: Mapping[str, Any] | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    block: int | str | None = "auto",
) -> pd.DataFrame:
    """Layers ranked by their median per-step rank of ``stat`` (see the module docstring).

    Returns columns ``layer, label, role, median, ci_low, ci_high, n_steps, rank, p_first,
    median_rank, mean_rank`` in ranking order; empty when the statistic is absent.
    """
    cols = ["layer", "label", "role", "median", "ci_low", "ci_high", "n_steps", "rank",
            "p_first", "median_rank", "mean_rank"]
    one = select_run(df, run)
    wide = wide_table(one, stat)
    if wide.empty or wide.notna().sum().sum() == 0:
        return pd.DataFrame(columns=cols)
    wide = wide.loc[:, wide.notna().any()]
    wide = wide[layer_order(one, meta, wide.columns)]
    x = wide.to_numpy(dtype=float)
    ranks = step_ranks(x)
    n, L = x.shape
    counts = step_counts(bootstrap_indices(n, n_boot, seed, block), n)
    med = np.column_stack([weighted_median(x[:, j], counts) for j in range(L)])
    med_rank = np.column_stack([weighted_median(ranks[:, j], counts) for j in range(L)])
    ok = np.isfinite(ranks)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_rank = (counts @ np.where(ok, ranks, 0.0)) / (counts @ ok.astype(float))
        key = med_rank * (L + 1) + mean_rank  # lexicographic: mean rank <= L breaks ties
    first = np.argmin(np.where(np.isfinite(key), key, np.inf), axis=1)
    p_first = np.bincount(first, minlength=L) / n_boot
    alpha = (1.0 - ci) / 2.0
    with np.errstate(all="ignore"):
        lo_q = np.nanquantile(med, alpha, axis=0)
        hi_q = np.nanquantile(med, 1.0 - alpha, axis=0)
    order = rank_order(wide)
    pos = {c: j for j, c in enumerate(wide.columns)}
    j = [pos[c] for c in order["layer"]]
    roles = layer_roles(one)
    labels = short_labels(wide.columns)
    out = order.assign(
        label=[labels[c] for c in order["layer"]],
        role=[roles.get(c, "") for c in order["layer"]],
        ci_low=lo_q[j], ci_high=hi_q[j], p_first=p_first[j])
    return out[cols]
