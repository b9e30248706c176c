"""gradlens.report: read the files a run wrote, and turn them into tables, figures and verdicts."""

from gradlens.report.load import (
    CorruptLineWarning,
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
    "CorruptRunError",
    "EmptyRunError",
    "RunError",
    "RunNotFoundError",
    "TruncatedRunWarning",
    "load_meta",
    "load_run",
    "load_spikes",
]
