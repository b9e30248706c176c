"""Failures injected through the sinks' file seam (``AppendFiles.open_file`` / ``write_bytes``)."""

from __future__ import annotations

import errno
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from gradlens.sinks._files import AppendFiles


class Faults:
    """Make an :class:`AppendFiles` fail while ``mode`` is set.

    Modes: ``"open"`` (opening the file fails: a read-only or immutable file; setting it closes
    the open files, as when a file is replaced and must be reopened), ``"write"``
    (the write fails before a byte is written: disk full), ``"partial"`` (half the bytes are
    written, then the disk is full). ``calls`` counts failed attempts.
    """

    def __init__(self, files: AppendFiles) -> None:
        self.files = files
        self._mode: str | None = None
        self.calls = 0
        self._open = files.open_file
        self._write = files.write_bytes
        files.open_file = self.open_file  # type: ignore[method-assign]
        files.write_bytes = self.write_bytes  # type: ignore[method-assign]

    @property
    def mode(self) -> str | None:
        return self._mode

    @mode.setter
    def mode(self, mode: str | None) -> None:
        if mode == "open":
            self.files.close()
        self._mode = mode

    def open_file(self, path: Any) -> Any:
        if self.mode == "open":
            self.calls += 1
            raise PermissionError(errno.EPERM, "Operation not permitted", str(path))
        return self._open(path)

    def write_bytes(self, fh: Any, data: bytes) -> None:
        if self.mode in ("write", "partial"):
            self.calls += 1
            if self.mode == "partial":
                self._write(fh, data[: len(data) // 2 + 1])
            raise OSError(errno.ENOSPC, "No space left on device")
        self._write(fh, data)


@contextmanager
def recorded() -> Iterator[list[warnings.WarningMessage]]:
    """Every warning raised inside, none filtered away."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def write_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """The texts of the sinks' cannot-write RuntimeWarnings."""
    return [str(w.message) for w in caught
            if issubclass(w.category, RuntimeWarning) and "cannot write" in str(w.message)]
