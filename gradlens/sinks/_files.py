"""Append-only files that survive write errors: the file seam of the sinks.

:class:`AppendFiles` appends whole records (lines, TensorBoard records) to files it keeps open.
Before each append a file is brought back to the end of its last good record (cutting what a
failed write left behind); a failed append is truncated back at once. A reader therefore
never meets half a record from a retry. A file that was deleted or replaced under the sink
(its run directory removed) is reopened by path, so rows are never written into a deleted
file. Tests replace :meth:`AppendFiles.open_file` and :meth:`AppendFiles.write_bytes` to
inject failures.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, BinaryIO

from gradlens.atomic_files import fsync_dir, text_opener, write_atomic

__all__ = ["AppendFiles", "cut_partial_last_line", "fsync_dir", "write_json_atomic"]


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as JSON to ``path``, replaced whole (:func:`gradlens.atomic_files.
    write_atomic`): a reader sees the old file or the new one. Non-JSON values are written as
    ``str``."""

    def write(f: Any) -> None:
        json.dump(obj, f, indent=1, default=str)
        f.write("\n")

    write_atomic(Path(path), write, opener=text_opener())


def cut_partial_last_line(path: Path) -> bool:
    """Truncate ``path`` after its last newline; True when a partial line was cut off."""
    size = path.stat().st_size
    if size == 0:
        return False
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return False
        keep = 0
        pos = size
        while pos > 0:
            start = max(0, pos - 65536)
            f.seek(start)
            chunk = f.read(pos - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return True


class AppendFiles:
    """Open files appended to in whole records.

    Args:
        fsync: ``fsync`` after each append.
        lines: the records are lines: a file found shorter than expected (changed by someone
            else) is cut after its last newline before appending.
    """

    def __init__(self, *, fsync: bool = True, lines: bool = True) -> None:
        self.fsync = fsync
        self.lines = lines
        self._handles: dict[Path, BinaryIO] = {}
        self._good: dict[Path, int] = {}  # size after the last good append
        self._inode: dict[Path, int] = {}

    def open_file(self, path: Path) -> BinaryIO:
        """Seam: open ``path`` for appending, unbuffered (a failed write leaves no buffered
        bytes behind to be written later)."""
        return open(path, "ab", buffering=0)

    def write_bytes(self, fh: BinaryIO, data: bytes) -> None:
        """Seam: write all of ``data`` (an unbuffered write may be short)."""
        view = memoryview(data)
        while view:
            n = fh.write(view)
            if not n:
                raise OSError(f"wrote nothing of {len(view)} bytes")
            view = view[n:]

    def size(self, path: Path) -> int:
        """Bytes of ``path`` that hold complete records written or found (0 before any)."""
        return self._good.get(path, 0)

    def append(self, path: Path, data: bytes, header: bytes = b"") -> None:
        """Append ``data`` (whole records) to ``path``, after ``header`` when the file is
        empty. Raises the write error after truncating the file back."""
        fh = self._handle(path)
        fd = fh.fileno()
        good = self._good[path]
        size = os.fstat(fd).st_size
        if size > good:  # a failed append that could not be cut back at the time
            os.ftruncate(fd, good)
        elif size < good:  # shortened by someone else: keep its complete records
            if self.lines:
                cut_partial_last_line(path)
            good = self._good[path] = os.fstat(fd).st_size
        if good == 0 and header:
            data = header + data
        try:
            self.write_bytes(fh, data)
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):  # else cut at the next append (size > good)
                os.ftruncate(fd, good)
            raise
        self._good[path] = good + len(data)

    def _handle(self, path: Path) -> BinaryIO:
        fh = self._handles.get(path)
        try:
            on_disk = os.stat(path).st_ino
        except FileNotFoundError:
            on_disk = None
        if fh is not None and on_disk != self._inode.get(path):
            self._close(path)  # deleted or replaced: a handle on it would write into nothing
            fh = None
        if fh is None:
            fh = self.open_file(path)
            ino = os.fstat(fh.fileno()).st_ino
            if self._inode.get(path) != ino:  # a file we have not written: take it as it is
                if self.lines:
                    cut_partial_last_line(path)
                self._good[path] = os.fstat(fh.fileno()).st_size
                self._inode[path] = ino
            if on_disk is None:
                fsync_dir(path.parent)
            self._handles[path] = fh
        return fh

    def _close(self, path: Path) -> None:
        fh = self._handles.pop(path, None)
        if fh is not None:
            with contextlib.suppress(OSError):
                fh.close()

    def close(self) -> None:
        """Close every file (the sizes are kept: reopening continues after them)."""
        for path in list(self._handles):
            self._close(path)
