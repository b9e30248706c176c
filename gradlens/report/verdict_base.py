"""What every verdict module shares: the :class:`Verdict` record, the long table's helpers
(one run, roles, the step x layer matrix), number formatting, and why an estimator is missing.

Everything takes DataFrames in the schema of :mod:`gradlens.schema`, never a live training
process.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from gradlens.catalog import family_of
from gradlens.kinds import KINDS
from gradlens.report.layer_names import layer_roles
from gradlens.schema import GLOBAL

__all__ = ["ANSWERS", "ROLE_ORDER", "Verdict", "all_nan", "all_nan_reason", "estimator_family",
           "fmt", "fmt_p", "layer_roles", "layer_sums", "missing_reason", "pe_wide",
           "rank_biserial", "select_run", "spike_layers", "wide_table"]

ANSWERS = ("yes", "no", "cannot tell", "not computable")
ROLE_ORDER = {k: i for i, k in enumerate(KINDS)}


@dataclass
class Verdict:
    """The answer to one question about one run.

    Attributes:
        question: the question, in words.
        answer: ``"yes"``, ``"no"``, ``"cannot tell"`` or ``"not computable"``.
        numbers: the numbers behind the answer (JSON-serializable scalars).
        reason: one or two sentences saying why, with the key numbers.
        kind: the name of its registered kind (:mod:`gradlens.report.verdicts.registry`):
            ``"output_highest"``, ``"column_spread"``, ``"instability"``, ``"norm_gns"``,
            ``"critical_batch"`` or a user's.
        stat: the statistic the verdict is about (``None`` for instability).
        run: the run label, when known.
    """

    question: str
    answer: str
    numbers: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    kind: str = ""
    stat: str | None = None
    run: str | None = None

    def __post_init__(self) -> None:
        if self.answer not in ANSWERS:
            raise ValueError(f"answer must be one of {ANSWERS}, got {self.answer!r}")
        self.numbers = {str(k): _plain(v) for k, v in self.numbers.items()}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``numbers`` kept as a dict)."""
        return asdict(self)


def select_run(df: pd.DataFrame, run: str | None = None) -> pd.DataFrame:
    """The rows of one run. Without ``run``, ``df`` must hold a single run (or no ``run`` column)."""
    if df is None:
        raise ValueError("expected a DataFrame, got None")
    if "run" not in df.columns:
        if run is not None:
            raise ValueError(f"run={run!r} given, but the table has no 'run' column")
        return df
    runs = list(pd.unique(df["run"]))
    if run is None:
        if len(runs) > 1:
            raise ValueError(f"the table holds {len(runs)} runs {runs}; pass run=<one of them>")
        return df
    if run not in runs:
        raise ValueError(f"run {run!r} not in the table; it holds {runs}")
    return df[df["run"] == run]


def wide_table(df: pd.DataFrame, stat: str) -> pd.DataFrame:
    """The step x layer matrix of one statistic (non-finite values as NaN, last row wins); layers
    without any finite value are dropped."""
    sub = df[(df["stat"] == stat) & (df["layer"] != GLOBAL)]
    if sub.empty:
        return pd.DataFrame()
    sub = sub.drop_duplicates(["step", "layer"], keep="last")
    wide = sub.pivot(index="step", columns="layer", values="value").astype(float).sort_index()
    wide = wide.where(np.isfinite(wide))
    return wide.loc[:, wide.notna().any()]  # layers that never have a value are not compared


def layer_sums(tr: pd.DataFrame, sg: pd.DataFrame, cols: Sequence[str]
                ) -> tuple[pd.Series, pd.Series]:
    """Per-step sums of trace and signal over ``cols``; NaN at a step where any is missing."""
    t = tr[list(cols)].sum(axis=1, min_count=len(cols))
    s = sg[list(cols)].sum(axis=1, min_count=len(cols))
    return t, s


def pe_wide(one: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The step x layer matrices of ``pe_trace`` and ``pe_signal`` on their common steps and
    layers."""
    tr, sg = wide_table(one, "pe_trace"), wide_table(one, "pe_signal")
    if tr.empty or sg.empty:
        return tr, sg
    cols = [c for c in tr.columns if c in set(sg.columns)]
    idx = tr.index.intersection(sg.index)
    return tr.loc[idx, cols], sg.loc[idx, cols]



def all_nan(one: pd.DataFrame, stat: str) -> bool:
    """``stat`` has rows, and not one finite value."""
    if one.empty:
        return False
    values = one.loc[one["stat"] == stat, "value"].to_numpy(dtype=float)
    return values.size > 0 and not np.isfinite(values).any()


def all_nan_reason(one: pd.DataFrame, stat: str) -> str:
    """Why a statistic recorded only NaN: the lens could not compute it at any step."""
    rows = one[one["stat"] == stat]
    return (f"every {stat} value is NaN ({len(rows)} rows over {rows['step'].nunique()} steps): "
            "the lens recorded the statistic but could not compute it at any step (see the "
            "run's events and warnings for the reason, e.g. unequal micro-batches or "
            "non-finite gradients)")


def rank_biserial(d: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation ``(W+ - W-) / (W+ + W-)``, zeros dropped."""
    from scipy import stats as sps

    d = d[d != 0]
    if d.size == 0:
        return math.nan
    r = sps.rankdata(np.abs(d))
    return float((r[d > 0].sum() - r[d < 0].sum()) / r.sum())



def spike_layers(value: Any) -> list[str]:
    """The ``layers`` field of a spike row as a list (list, tuple, JSON or comma-separated)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(v) for v in value]
    s = str(value).strip()
    if not s:
        return []
    if s.startswith("["):
        try:
            return [str(v) for v in json.loads(s)]
        except ValueError:
            pass
    return [p.strip() for p in re.split(r"[;,]", s) if p.strip()]


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}"


def fmt_p(p: float | None) -> str:
    if p is None or not math.isfinite(p):
        return "n/a"
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


_FAMILY_NEEDS = {
    "twobatch": "no micro-batches, so no two-batch variance: {est} needs >= 2 micro-batches per "
                "step (gradient accumulation) or >= 2 data-parallel ranks, under the standard "
                "or full preset",
    "per_example": "no per-example variance: {est} needs the `full` preset (per-example norms "
                   "from layer inputs and output gradients)",
    "temporal": "no temporal variance: {est} needs the `full` preset's temporal buffers (EMA "
                "of the gradient across steps)",
}


def estimator_family(est: str) -> str:
    """The family that produces a variance estimator (the catalog's owner; a name no family
    declares is read as a two-batch one, as runs of older versions wrote them)."""
    family = family_of(est)
    return family if family in _FAMILY_NEEDS else "twobatch"


def missing_reason(estimator: str, df: pd.DataFrame | None = None,
                   meta: Mapping[str, Any] | None = None) -> str:
    """Why a variance estimator has no rows: the condition that produces its family.

    Two-batch estimators (``twobatch_*``, ``noise_scale``, ``var_per_element``, ``unit_nsr_*``)
    need >= 2 micro-batches or >= 2 data-parallel ranks; ``pe_*`` needs the ``full`` preset;
    ``temporal_*`` needs the ``full`` preset's temporal buffers. What the run's metadata and
    ``microbatches`` rows say is appended.
    """
    family = estimator_family(estimator)
    text = _FAMILY_NEEDS[family].format(est=estimator)
    preset = str(meta.get("preset")) if meta and meta.get("preset") else None
    world = meta.get("world_size") if meta else None
    mb_max: int | None = None
    if df is not None and not df.empty:
        mb = pd.to_numeric(df.loc[(df["stat"] == "microbatches") & (df["layer"] == GLOBAL),
                                  "value"], errors="coerce").dropna()
        mb_max = int(mb.max()) if not mb.empty else None
    ctx = []
    if preset:
        ctx.append(f"preset {preset!r}")
    if family == "twobatch":
        if isinstance(world, (int, float)):
            ctx.append(f"world size {int(world)}")
        if mb_max:  # 0: the preset does not count micro-batches
            ctx.append(f"at most {mb_max} micro-batch(es) per step")
    ctx_text = f" (this run: {', '.join(ctx)})" if ctx else ""
    condition_met = (
        (family == "twobatch" and ((mb_max or 0) >= 2 or (isinstance(world, (int, float))
                                                          and world >= 2)))
        or (family != "twobatch" and preset == "full")
    )
    if condition_met:
        return (f"no {estimator} rows, although the run met the condition for them{ctx_text}: "
                "the statistic was not selected, or the layers it covers were excluded")
    return text + ctx_text
