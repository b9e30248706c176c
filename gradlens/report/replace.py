"""A report directory replaced whole: written beside the target, then renamed into place.

A report killed while writing (or failing) leaves the previous report untouched and a hidden
``.<name>.gradlens-<pid>-*`` directory beside it (removed by the next report once its process
is gone). Replacing an existing report swaps the two directories in one ``renameat2``
(``RENAME_EXCHANGE``, Linux); elsewhere it is two renames, with the target missing (never
mixed) for the instant between them. Everything in the target is replaced: files put into a
report directory by hand are not kept, and a non-empty directory that holds no report is
refused rather than replaced.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["REPORT_MARKERS", "replaced_dir"]

REPORT_MARKERS = ("report.html", "report.md", "verdicts.json")
"""A directory holding any of these is a report (and may be replaced)."""

_RENAME_EXCHANGE = 2


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}.gradlens-"


def _check_target(target: Path, shown: str) -> None:
    if target.exists() and not target.is_dir():
        raise ValueError(f"report directory {shown!r} exists and is not a directory; "
                         "pass a directory path")
    if target.is_dir() and any(target.iterdir()) and not any(
            (target / m).exists() for m in REPORT_MARKERS):
        raise ValueError(f"report directory {shown!r} is not empty and holds no report "
                         f"(none of {', '.join(REPORT_MARKERS)}); the report replaces its "
                         "directory whole: pass a new or empty directory, or a report's")


def _remove_stale(target: Path) -> None:
    """Temporary directories of reports whose process is gone."""
    for p in target.parent.glob(_tmp_prefix(target) + "*"):
        pid = p.name[len(_tmp_prefix(target)):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux ``renameat2``); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b),
                     _RENAME_EXCHANGE) == 0


def _swap_in(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    if _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # now the previous report
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=_tmp_prefix(target)
                                + f"{os.getpid()}-old-"))
    old.rmdir()
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def replaced_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh directory beside ``target``; when the block ends without an exception it
    replaces ``target`` whole, else it is removed and ``target`` is left as it was. Raises
    ``ValueError`` for a target that is a file, a non-report directory that is not empty, or
    a place where nothing can be written."""
    shown = str(target)
    target = Path(os.path.abspath(Path(target).expanduser()))
    _check_target(target, shown)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(target)
        tmp = Path(tempfile.mkdtemp(dir=target.parent,
                                    prefix=_tmp_prefix(target) + f"{os.getpid()}-"))
    except OSError as err:
        raise ValueError(f"cannot write the report to {shown!r}: {err.strerror or err} (it "
                         "is written beside it, then renamed into place); pass a directory "
                         "in a writable place") from err
    try:
        yield tmp
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
