"""Run one case through the lens and compare every estimator with the reference."""

from __future__ import annotations

import fnmatch
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd
import torch
from torch import nn

from gradlens import GradLens
from tests.conformance._reference import ESTIMATORS, Case, reference, rel_err

REPORT_ENV = "GRADLENS_CONFORMANCE_REPORT"  # a JSON-lines file to append measured errors to


def loop_weight(case: Case, k: int) -> float:
    """What the loop multiplies micro-batch k's mean loss by before ``backward()``."""
    sizes = [case.size(b) for b in case.batches]
    if case.reduction == "mean":
        return 1.0 / len(sizes)
    return sizes[k] / sum(sizes)


def run_lens(case: Case, *, model: nn.Module | None = None, target: nn.Module | None = None,
             edit: Callable[[nn.Module], None] | None = None, preset: str = "full",
             dtype: torch.dtype = torch.float64, autocast: torch.dtype | None = None,
             **lens_kwargs: Any) -> tuple[pd.DataFrame, list, GradLens]:
    """One step of ``case`` with the lens on ``target`` (default: the model); ``edit`` runs
    between the backward passes and the step (clipping)."""
    model = model if model is not None else case.build().to(dtype)
    options = {"noise_ema": 0.0, "loss_reduction": case.reduction, **case.options,
               **lens_kwargs}
    lens = GradLens(target if target is not None else model, preset=preset, **options)
    for k, batch in enumerate(case.batches):
        if autocast is not None:
            with torch.autocast("cpu", dtype=autocast):
                loss = case.loss(model, batch)
        else:
            loss = case.loss(model, batch)
        (loss * loop_weight(case, k)).backward()
    if edit is not None:
        edit(model)
    lens.step()
    lens.flush()
    df = lens.memory.frame()
    events = list(lens.memory.events)
    lens.close()
    return df, events, lens


def value(df: pd.DataFrame, layer: str, stat: str) -> float:
    sel = df[(df.layer == layer) & (df.stat == stat)]
    if len(sel) != 1:
        return math.nan
    return float(sel.value.iloc[0])


def validity(events: list) -> dict[tuple[str, str], str]:
    """``{(family, layer): reason}`` of the validity events."""
    return {(e.family, e.layer): e.reason for e in events if e.kind == "validity"}


FAMILY = {"twobatch_trace": "twobatch", "twobatch_signal": "twobatch",
          "unit_nsr_median": "twobatch", "unit_nsr_mean": "twobatch", "pe_trace": "per_example",
          "pe_signal": "per_example"}


def compare(df: pd.DataFrame, events: list, lens: GradLens, ref: Mapping[str, Mapping[str, float]],
            *, tol: float, expect_nan: Mapping[tuple[str, str], str] = {},
            optional_pe: tuple[str, ...] = ("vector",), floor: float = 0.0,
            label: str = "", stats: tuple[str, ...] = ESTIMATORS) -> dict[str, float]:
    """Assert every estimator of every tracked layer equals the reference within ``tol``
    (relative), or is NaN where ``expect_nan`` says so (``{(layer glob, stat): substring of
    the validity reason}``; an empty substring: NaN without a reason is expected). Per-example
    values of layouts in ``optional_pe`` may be NaN (not covered); where written they must be
    right. Traces and signals are differences of squared norms: with ``floor``, their error
    is relative to ``max(|value|, floor ||G||^2)``. Returns the max relative error per
    estimator."""
    reasons = validity(events)
    # a layer whose gradient is zero in exact arithmetic (a key bias under softmax) carries
    # rounding noise only: it is checked to be that small
    tiny = 1e-9 * max(r["grad_norm_preclip"] for r in ref.values())
    worst = dict.fromkeys(stats, 0.0)
    failures = []
    for info in lens.layers:
        name = info.name
        for stat in stats:
            got = value(df, name, stat)
            want = ref[name][stat]
            exp = next((r for (pat, st), r in expect_nan.items()
                        if st == stat and fnmatch.fnmatchcase(name, pat)), None)
            if exp is not None:
                # one event per (family, reason): it names the first layer it hit
                fam = FAMILY.get(stat, "")
                own = reasons.get((fam, name), reasons.get((fam, "global")))
                found = [own] if own is not None else [r for (f, _), r in reasons.items()
                                                       if f == fam]
                reason = next((r for r in found if exp in r), " | ".join(found))
                if not math.isnan(got) or (exp and exp not in reason):
                    failures.append(f"{name} {stat}: want NaN with reason ~{exp!r}, got {got} "
                                    f"({reason!r})")
                continue
            if math.isnan(got) and stat.startswith("pe_") and info.layout in optional_pe:
                continue
            if ref[name]["grad_norm_preclip"] < tiny:
                if stat.startswith("grad_norm") and not abs(got) < tiny:
                    failures.append(f"{name} {stat}: want ~0 (below {tiny:.1e}), got {got}")
                continue
            y = ref[name]["grad_norm_preclip"] ** 2
            err = rel_err(got, want, floor * y if stat.endswith(("trace", "signal")) else 0.0)
            worst[stat] = max(worst[stat], err)
            if not err <= tol:
                failures.append(f"{name} {stat}: lens {got!r} reference {want!r} (rel {err:.2e})")
    assert not failures, f"{label}: " + "\n".join(failures[:20])
    _report(label, worst)
    return worst


def global_rows(df: pd.DataFrame) -> dict[str, float]:
    g = df[df.layer == "global"]
    return {s: float(v) for s, v in zip(g.stat, g.value, strict=True)}


def check_counts(df: pd.DataFrame, case: Case) -> None:
    rows = global_rows(df)
    sizes = [case.size(b) for b in case.batches]
    assert rows["microbatches"] == len(sizes)
    assert rows["batch_size"] == sum(sizes)


def _report(label: str, worst: Mapping[str, float]) -> None:
    path = os.environ.get(REPORT_ENV)
    if path and label:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"case": label, **worst}) + "\n")


def full_reference(case: Case, lens: GradLens, clip: float | None = None, **kw: Any):
    return reference(case, [(i.name, i.layout) for i in lens.layers], clip=clip, **kw)
