"""One verdict, one set of words and numbers: the cells the report's summary table shows and
the TensorBoard plugin's Verdicts view shows (the report writes them into ``verdicts.json``;
the plugin displays them as they are, it computes nothing).

:func:`summary_cells` formats :func:`verdict_figures` (each verdict kind of the registry
declares its numbers); :func:`register_report` leaves a
pointer to a report's ``verdicts.json`` in each run directory it covers, so that the plugin
finds the report wherever it was written (``gradlens demo`` writes ``runs/`` and ``report/``
side by side; TensorBoard's logdir is ``runs/``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradlens.report.verdicts.base import Verdict

__all__ = ["REPORTS_FILE", "SUMMARY_COLUMNS", "register_report", "report_pointers",
           "row_summary", "summary_cells", "verdict_figures"]

SUMMARY_COLUMNS = ("question", "answer", "effect size", "p-value", "fraction of steps")
REPORTS_FILE = "reports.json"  # in a run directory: the verdicts.json files that cover it


def verdict_figures(v: Verdict) -> dict[str, Any]:
    """The headline numbers of a verdict: ``effect`` (its name in ``effect_size``), ``p_value``
    and ``fraction_steps``, from its registered kind's ``figures``
    (:mod:`gradlens.report.verdicts.registry`); None where the question has no such number
    (and for a kind that is not registered, or declares no figures)."""
    from gradlens.report.verdicts import verdict_kind

    kind = verdict_kind(v.kind)
    if kind is None or kind.figures is None:
        return {"effect_size": None, "effect": None, "p_value": None, "fraction_steps": None}
    return kind.figures(v).as_dict()


def fmt_p(p: Any) -> str:
    """A p-value cell: two significant digits, ``< 1e-4`` below that, ``nan`` if unknown."""
    if not isinstance(p, (int, float)) or p != p:
        return "nan"
    return f"{p:.2g}" if p >= 1e-4 else "< 1e-4"


def fmt_number(x: Any) -> str:
    """A number cell: four significant digits, empty for NaN or None."""
    if isinstance(x, float):
        return "" if x != x else f"{x:.4g}"
    return "" if x is None else str(x)


def summary_cells(v: Verdict) -> dict[str, str]:
    """The summary row of a verdict, as text: ``question, answer, effect size, p-value,
    fraction of steps`` (empty where the question has no such number)."""
    f = verdict_figures(v)
    return {
        "question": v.question, "answer": v.answer,
        "effect size": ("" if f["effect"] is None
                        else f"{fmt_number(f['effect'])} ({f['effect_size']})"),
        "p-value": "" if f["p_value"] is None else fmt_p(f["p_value"]),
        "fraction of steps": ("" if f["fraction_steps"] is None
                              else f"{100 * f['fraction_steps']:.0f}%"),
    }


def row_summary(row: dict[str, Any]) -> dict[str, str]:
    """The summary cells of a ``verdicts.json`` row: the stored ones, or, for a report written
    before the rows carried them, computed here by the verdict's registered kind."""
    if isinstance(row.get("summary"), dict):
        return row["summary"]
    from gradlens.report.verdicts.base import ANSWERS, Verdict

    if row.get("answer") not in ANSWERS:
        return {}
    v = Verdict(str(row.get("question", "")), row["answer"], dict(row.get("numbers") or {}),
                str(row.get("reason", "")), str(row.get("kind", "")), row.get("stat"),
                row.get("run"))
    return summary_cells(v)


def register_report(verdicts_json: Path, run_dirs: Iterable[Path]) -> None:
    """Add ``verdicts_json`` (absolute) to ``reports.json`` of each run directory (newest
    last, no duplicates). A run directory that cannot be written gets a warning, not an
    error: the report stands without the pointer."""
    target = str(Path(verdicts_json).resolve())
    for d in run_dirs:
        f = Path(d) / REPORTS_FILE
        try:
            known = [p for p in report_pointers(Path(d)) if p != target]
            f.write_text(json.dumps([*known, target], indent=1), encoding="utf-8")
        except OSError as e:
            warnings.warn(f"gradlens report: could not record the report in {f} ({e}); "
                          "the dashboard finds it only beside the runs", RuntimeWarning,
                          stacklevel=2)


def report_pointers(run_dir: Path) -> list[str]:
    """The ``verdicts.json`` paths recorded in ``run_dir`` (empty if none or unreadable)."""
    try:
        rows = json.loads((run_dir / REPORTS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [r for r in rows if isinstance(r, str)] if isinstance(rows, list) else []
