"""The report's verdicts: the questions it answers about a run, with their numbers.

Each question is one :class:`~gradlens.report.verdicts.registry.VerdictKind` in one module,
registered in :mod:`gradlens.report.verdicts.registry`, which the report (its summary, its
first section in plain words, one section per kind) and the TensorBoard plugin (the summary
cells in ``verdicts.json``) iterate. Importing this package imports, and so registers, the
built-ins; in report order:

1. :mod:`.output_highest`: is the output layer's gradient variance the highest of all
   layers (one verdict per variance estimator)?
2. :mod:`.column_spread`: how spread are the per-unit gradient RMS values per role?
3. :mod:`.instability`: spikes, non-finite gradient entries, skipped steps.
4. :mod:`.norm_gns`: does the normalization layers' GNS predict the total (Gray et al. 2024)?
5. :mod:`.critical_batch`: is the batch size below the critical batch size (McCandlish et
   al. 2018)?

Everything takes DataFrames in the schema of :mod:`gradlens.schema` (columns ``step, layer,
role, stat, value``, optionally ``run``; spike events ``step, layer, kind, value, score,
layers``), never a live training process. Nothing is random beyond a seeded bootstrap, so the
same input always gives the same verdicts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from gradlens.report.layer_names import layer_order, short_labels, short_layer_name
from gradlens.report.ranking import bootstrap_indices, layer_ranking
from gradlens.report.verdicts.base import (
    ANSWERS,
    Verdict,
    estimator_family,
    layer_roles,
    missing_reason,
    select_run,
    spike_layers,
    wide_table,
)
from gradlens.report.verdicts.column_spread import (
    SPREAD_STATS,
    column_spread_verdict,
    role_spread_table,
)
from gradlens.report.verdicts.critical_batch import critical_batch_size_verdict
from gradlens.report.verdicts.instability import instability_verdict
from gradlens.report.verdicts.norm_gns import norm_gain_layers, norm_gns_verdict
from gradlens.report.verdicts.output_highest import output_highest_verdict
from gradlens.report.verdicts.registry import (
    Answer,
    FigureSpec,
    ReportContext,
    RunData,
    SummaryFigures,
    VerdictKind,
    kinds,
    register_verdict,
    unregister_verdict,
    verdict_kind,
)
from gradlens.schema import VARIANCE_ESTIMATORS

__all__ = [
    "ANSWERS",
    "SPREAD_STATS",
    "Answer",
    "FigureSpec",
    "ReportContext",
    "RunData",
    "SummaryFigures",
    "Verdict",
    "VerdictKind",
    "bootstrap_indices",
    "column_spread_verdict",
    "compute_verdicts",
    "critical_batch_size_verdict",
    "instability_verdict",
    "kinds",
    "layer_order",
    "layer_ranking",
    "layer_roles",
    "missing_reason",
    "norm_gain_layers",
    "norm_gns_verdict",
    "not_computable_line",
    "output_highest_verdict",
    "register_verdict",
    "role_spread_table",
    "run_data",
    "select_run",
    "short_labels",
    "short_layer_name",
    "spike_layers",
    "unregister_verdict",
    "verdict_kind",
    "verdicts_table",
    "wide_table",
]

def run_data(df: pd.DataFrame, spikes: pd.DataFrame | None = None,
             meta: Mapping[str, Any] | None = None, *, run: str | None = None,
             **options: Any) -> RunData:
    """One run of ``df`` (and ``spikes``) as the verdict kinds take it; ``options``:
    ``alpha``, ``n_boot``, ``seed``, ``min_steps``."""
    one = select_run(df, run)
    label = run
    if label is None and "run" in one.columns and not one.empty:
        label = str(one["run"].iloc[0])
    sp = select_run(spikes, run) if spikes is not None else None
    steps = np.sort(one["step"].unique()) if not one.empty else np.array([], dtype=int)
    return RunData(one, sp, dict(meta or {}), label, steps, options)


def compute_verdicts(
    df: pd.DataFrame,
    spikes: pd.DataFrame | None = None,
    meta: Mapping[str, Any] | None = None,
    *,
    run: str | None = None,
    only: Sequence[str] | None = None,
    alpha: float = 0.05,
    n_boot: int = 1000,
    seed: int = 0,
    min_steps: int = 5,
) -> list[Verdict]:
    """Every verdict for one run, in report order: the verdicts of each registered kind
    (:func:`kinds`, or those named in ``only``). The built-ins give one output-highest verdict
    per variance estimator of the schema (absent ones answer ``not computable`` with the
    reason), one column-spread verdict per column statistic present (a single ``not
    computable`` when none is), and one each of instability, norm GNS and critical batch size.
    """
    data = run_data(df, spikes, meta, run=run, alpha=alpha, n_boot=n_boot, seed=seed,
                    min_steps=min_steps)
    chosen = kinds() if only is None else [_kind(k) for k in only]
    return [v for k in chosen for v in k.run(data)]


def _kind(name: str) -> VerdictKind:
    k = verdict_kind(name)
    if k is None:
        raise ValueError(f"unknown verdict kind {name!r}; registered: "
                         f"{[x.name for x in kinds()]}")
    return k


def not_computable_line(verdicts: Iterable[Verdict]) -> str:
    """One sentence for every verdict that could not be computed, grouped by why:
    ``pe_trace, pe_noise_scale: needs the full preset``; empty when there is none."""
    groups: dict[str, list[str]] = {}
    for v in verdicts:
        if v.answer != "not computable":
            continue
        if v.kind == "output_highest" and v.stat and v.reason.startswith("no ") and (
                v.stat in VARIANCE_ESTIMATORS):
            why = {"twobatch": "two-batch estimators: need >= 2 micro-batches per step or >= 2 "
                               "data-parallel ranks",
                   "per_example": "per-example estimators: need preset full",
                   "temporal": "temporal estimators: need preset full"}[
                estimator_family(v.stat)]
            if "met the condition" in v.reason:
                why = "not selected, or their layers excluded, although the run met the condition"
        else:
            why = v.reason.split(";")[0].rstrip(".")
        label = str(v.stat or v.kind)
        names = groups.setdefault(why, [])
        if label not in names:
            names.append(label)
    return "; ".join(f"{', '.join(names)} ({why})" for why, names in groups.items())


def verdicts_table(verdicts: Iterable[Verdict]) -> pd.DataFrame:
    """One row per verdict: ``run, kind, stat, question, answer, reason, numbers`` (JSON)."""
    rows = [dict(run=v.run, kind=v.kind, stat=v.stat, question=v.question, answer=v.answer,
                 reason=v.reason, numbers=json.dumps(v.numbers, sort_keys=False))
            for v in verdicts]
    return pd.DataFrame(rows, columns=["run", "kind", "stat", "question", "answer", "reason",
                                       "numbers"])
