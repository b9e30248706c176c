"""gradlens.report: read the files a run wrote, and turn them into tables, figures and verdicts.

:func:`build_report`, :func:`compute_verdicts` and :func:`register_verdict` (and
:class:`ReportPaths`, :class:`Verdict`, :class:`VerdictKind`) are imported on first use: they
load matplotlib, seaborn and scipy.
"""

from __future__ import annotations

from typing import Any

from gradlens.report.load import (
    CorruptLineWarning,
    CorruptPartWarning,
    CorruptRunError,
    EmptyRunError,
    RunError,
    RunNotFoundError,
    TruncatedRunWarning,
    load_meta,
    load_run,
    load_spikes,
)

__all__ = [
    "CorruptLineWarning",
    "CorruptPartWarning",
    "CorruptRunError",
    "EmptyRunError",
    "ReportPaths",
    "RunError",
    "RunNotFoundError",
    "TruncatedRunWarning",
    "Verdict",
    "VerdictKind",
    "build_report",
    "compute_verdicts",
    "load_meta",
    "load_run",
    "load_spikes",
    "register_verdict",
]

_LAZY = {
    "build_report": "gradlens.report.build",
    "ReportPaths": "gradlens.report.build",
    "compute_verdicts": "gradlens.report.verdicts",
    "Verdict": "gradlens.report.verdicts",
    "VerdictKind": "gradlens.report.verdicts",
    "register_verdict": "gradlens.report.verdicts",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gradlens.report' has no attribute {name!r}")
