"""Files replaced whole: written under a temporary name, fsync-ed and renamed, so a reader or
a killed process meets the old file or the new one, never a partial one. Shared by the sinks
(parquet parts, run.json) and the readers' exports."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["fsync_dir", "text_opener", "write_atomic"]


def fsync_dir(path: Path) -> None:
    """Make a file creation or rename durable (POSIX); a no-op where directories cannot be
    opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _open_binary(path: Path) -> IO[Any]:
    return open(path, "wb")


def text_opener(newline: str | None = None) -> Callable[[Path], IO[Any]]:
    """An opener of UTF-8 text files for :func:`write_atomic`."""
    return lambda path: open(path, "w", encoding="utf-8", newline=newline)


def write_atomic(final: Path, write: Callable[[IO[Any]], Any], *,
                 opener: Callable[[Path], IO[Any]] = _open_binary, fsync: bool = True) -> Any:
    """Write ``final`` with ``write(file)`` through ``.<name>.<pid>.tmp`` beside it (fsync-ed
    when asked) and ``os.replace``; the temporary file is removed if anything raises. Returns
    what ``write`` returned."""
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        with opener(tmp) as fh:
            out = write(fh)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync:
        fsync_dir(final.parent)
    return out
