"""The report's tables, one DataFrame each (written as CSV, shown in the document): the runs,
the per-layer rankings, the per-role column spread, the spike events and the momentum advice.
"""

from __future__ import annotations

import pandas as pd

from gradlens.report.ranking import layer_ranking
from gradlens.report.settings import run_settings
from gradlens.report.verdicts.base import spike_layers
from gradlens.report.verdicts.column_spread import SPREAD_STATS, role_spread_table
from gradlens.report.verdicts.registry import RunData
from gradlens.schema import GLOBAL, VARIANCE_ESTIMATORS

__all__ = ["momentum_frame", "rankings", "role_spreads", "runs_frame", "spikes_frame"]

RANK_COLUMNS = ["run", "stat", "rank", "layer", "label", "role", "median_rank", "median",
                "ci_low", "ci_high", "n_steps", "p_first"]
SPREAD_COLUMNS = ["run", "stat", "role", "median", "ci_low", "ci_high", "n_layers", "n_values"]
SPIKE_COLUMNS = ["run", "step", "layer", "kind", "value", "score", "layers"]


def _stats_of(df: pd.DataFrame) -> set[str]:
    return set(df.loc[df["layer"] != GLOBAL, "stat"].unique())


def rankings(runs: list[RunData], n_boot: int
             ) -> tuple[pd.DataFrame, dict[tuple[str, str], pd.DataFrame]]:
    """Every run's layer ranking of each variance estimator and of ``grad_norm`` (one table),
    and the same per ``(run, stat)`` for the figures."""
    parts, of = [], {}
    for r in runs:
        present = _stats_of(r.df)
        for stat in (*VARIANCE_ESTIMATORS, "grad_norm"):
            if stat in present:
                rk = layer_ranking(r.df, stat, meta=r.meta, n_boot=n_boot)
                parts.append(rk.assign(run=r.label, stat=stat))
                of[(str(r.label), stat)] = rk
    table = (pd.concat(parts, ignore_index=True)[RANK_COLUMNS] if parts
             else pd.DataFrame(columns=RANK_COLUMNS))
    return table, of


def role_spreads(runs: list[RunData], n_boot: int) -> pd.DataFrame:
    """Per run and column statistic: each role's median with its bootstrap CI."""
    parts = [role_spread_table(r.df, stat, n_boot=n_boot).assign(run=r.label, stat=stat)
             for r in runs for stat in SPREAD_STATS if stat in _stats_of(r.df)]
    return (pd.concat(parts, ignore_index=True)[SPREAD_COLUMNS] if parts
            else pd.DataFrame(columns=SPREAD_COLUMNS))


def runs_frame(runs: list[RunData]) -> pd.DataFrame:
    """One row per run: directory, model, optimizer and its settings, preset, steps, sizes."""
    rows = []
    for r in runs:
        steps = r.df["step"]
        rows.append(dict(
            run=r.label, directory=str(r.path), model=r.meta.get("model"),
            **run_settings(r.meta, r.df), preset=r.meta.get("preset"),
            first_step=int(steps.min()) if len(steps) else None,
            last_step=int(steps.max()) if len(steps) else None,
            layers=int(r.df.loc[r.df["layer"] != GLOBAL, "layer"].nunique()),
            stats=int(r.df["stat"].nunique()),
            spikes=0 if r.spikes is None else len(r.spikes),
        ))
    return pd.DataFrame(rows)


def momentum_frame(runs: list[RunData]) -> pd.DataFrame:
    """The momentum advice of every run with the evidence for it (empty when none has)."""
    from gradlens.report.advice import advise_momentum, momentum_table

    parts = []
    for r in runs:
        try:
            t = momentum_table(advise_momentum(r.df, meta=r.meta))
        except ValueError:
            continue
        if not t.empty and t["noise_to_signal"].notna().any():
            parts.append(t.assign(run=r.label))
    if not parts:
        return pd.DataFrame()
    t = pd.concat(parts, ignore_index=True)
    return t[["run", *[c for c in t.columns if c != "run"]]]


def spikes_frame(runs: list[RunData]) -> pd.DataFrame:
    """Every spike event of every run; ``layers`` joined with ``;``."""
    parts = []
    for r in runs:
        if r.spikes is None or r.spikes.empty:
            continue
        sp = r.spikes.copy()
        sp["layers"] = [";".join(spike_layers(v)) for v in
                        sp.get("layers", pd.Series([None] * len(sp), index=sp.index))]
        parts.append(sp.reindex(columns=SPIKE_COLUMNS))
    return (pd.concat(parts, ignore_index=True) if parts
            else pd.DataFrame(columns=SPIKE_COLUMNS))
