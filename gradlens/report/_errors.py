"""The errors and warnings of the run readers; every error is a ``ValueError`` that says
what to do."""

from __future__ import annotations

__all__ = [
    "CorruptLineWarning",
    "CorruptPartWarning",
    "CorruptRunError",
    "EmptyRunError",
    "RunError",
    "RunNotFoundError",
    "TruncatedRunWarning",
]


class RunError(ValueError):
    """A run directory cannot be read."""


class RunNotFoundError(RunError):
    """The path does not exist, or holds no run (no ``run.json`` and no table)."""


class EmptyRunError(RunError):
    """The run has metadata but no rows yet."""


class CorruptRunError(RunError):
    """A file of the run is damaged somewhere other than its last line."""


class TruncatedRunWarning(UserWarning):
    """A partial last line (a run killed while writing) was dropped."""


class CorruptLineWarning(UserWarning):
    """A damaged line in the middle of a table was skipped (file and line named)."""


class CorruptPartWarning(CorruptLineWarning):
    """An unreadable file of a parquet table was skipped (file named); the others were read."""
