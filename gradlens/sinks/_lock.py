"""One writer per run directory: an advisory lock on ``<logdir>/.gradlens.lock``.

The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on a file holding the writer's pid, host and
start time. The kernel releases it when the process ends in any way (kill -9 included), so a
resumed run after a crash never meets a stale lock. A second writer gets
:class:`RunLockedError` naming the holder. Where ``fcntl`` does not exist (Windows) or the file
system refuses locks, the run is written unlocked, with a warning for the latter.

Override (a deliberate second writer, e.g. a file system whose locks outlive a dead host):
``TableSink(logdir, lock=False)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

__all__ = ["LOCK_FILE", "RunLock", "RunLockedError"]

LOCK_FILE = ".gradlens.lock"


class RunLockedError(RuntimeError):
    """Another process is writing this run directory."""


def _holder(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


class RunLock:
    """The held lock of one run directory; :meth:`release` is idempotent."""

    def __init__(self, logdir: Path) -> None:
        self.path = logdir / LOCK_FILE
        self._fd: int | None = None
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform
            return
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._raise_locked()
            except OSError as err:  # e.g. a file system without flock
                os.close(fd)
                warnings.warn(f"gradlens: cannot lock {self.path} ({err}); writing the run "
                              "unlocked: make sure no other process writes this directory",
                              RuntimeWarning, stacklevel=4)
                return
            try:  # the file we locked may have been unlinked by a releasing writer: retry
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except OSError:
                same = False
            if same:
                break
            os.close(fd)
        else:  # pragma: no cover - five releases in a row under us
            raise RunLockedError(f"{self.path}: could not take the lock (it keeps changing)")
        self._fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[:4]}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())

    def _raise_locked(self) -> None:
        h = _holder(self.path)
        who = (f"process {h.get('pid', '?')} on host {h.get('host', '?')} (started "
               f"{h.get('started', '?')}, {' '.join(map(str, h.get('argv', [])))})") if h \
            else "another process"
        raise RunLockedError(
            f"{self.path.parent} is being written by {who}: two runs cannot share a logdir. "
            "Give this run a new logdir; to resume this run, stop the other process first (its "
            "lock goes with it). To write anyway (a file system whose locks outlive a dead "
            "host), pass sinks=[TableSink(logdir, lock=False)]"
        )

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file and drop the lock (the file first: a waiting writer then
        locks a fresh file)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            os.close(fd)
