"""Serve a run directory with TensorBoard on the loopback interface.

:func:`start_tensorboard` starts the TensorBoard process and waits until it answers;
:func:`serve` is ``gradlens dashboard``: it starts TensorBoard, forwards SIGTERM and SIGINT to
it and waits for it, so stopping the command (Ctrl-C, ``kill``, a job scheduler) never leaves
TensorBoard holding the port. TensorBoard's output goes to ``tensorboard.log`` in the run
directory (or to the terminal when the directory is read-only): never to a pipe that nobody
reads, which would block a long-running server once full.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["LOG_FILE", "PortInUseError", "free_port", "serve", "start_tensorboard"]

LOG_FILE = "tensorboard.log"
"""TensorBoard's stdout and stderr, in the served directory."""


class PortInUseError(ValueError):
    """The port asked for is taken on 127.0.0.1."""

    def __init__(self, port: int) -> None:
        self.port = port
        super().__init__(
            f"port {port} on 127.0.0.1 is already in use (another TensorBoard or gradlens "
            "dashboard?); stop that server, pass --port with a free port, or leave --port out "
            "to pick a free one"
        )


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _check_port_free(port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as err:
            if err.errno in (errno.EADDRINUSE, errno.EACCES):
                raise PortInUseError(port) from None
            raise


def _open_log(logdir: Path) -> IO[bytes] | None:
    try:
        return open(logdir / LOG_FILE, "ab")
    except OSError:
        return None  # a read-only run directory: the child inherits the terminal


def _log_tail(logdir: Path, limit: int = 2000) -> str:
    try:
        return (logdir / LOG_FILE).read_bytes()[-limit:].decode(errors="replace")
    except OSError:
        return ""


def start_tensorboard(logdir: str | Path, port: int | None = None,
                      timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Start TensorBoard on ``logdir`` at 127.0.0.1 and wait until it answers.

    Returns the process and the address of the custom-scalars dashboard. Raises
    :class:`PortInUseError` (a ``ValueError``) when ``port`` is taken, ``FileNotFoundError`` for
    a missing directory, ``RuntimeError`` when TensorBoard exits early (with the end of its log)
    and ``TimeoutError`` when it does not answer within ``timeout`` seconds.
    """
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise FileNotFoundError(f"{logdir} is not a directory; pass a run directory the lens wrote")
    if port is not None:
        _check_port_free(port)
    port = port or free_port()
    log = _open_log(logdir)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host",
             "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
            stdout=log or None, stderr=subprocess.STDOUT if log else None,
        )
    finally:
        if log is not None:
            log.close()  # the child holds its own descriptor
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = _log_tail(logdir)
            if "already in use" in tail or "Address in use" in tail:
                raise PortInUseError(port)
            raise RuntimeError(f"TensorBoard exited with code {proc.returncode}: {tail}")
        try:
            with urllib.request.urlopen(f"{base}/data/runs", timeout=2):
                return proc, f"{base}/#gradlens"  # the live heatmaps tab
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    _stop(proc)
    raise TimeoutError(f"TensorBoard did not answer on {base} within {timeout:.0f} s")


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def serve(logdir: str | Path, port: int | None = None,
          on_ready: Callable[[subprocess.Popen, str], Any] | None = None) -> int:
    """Run TensorBoard on ``logdir`` until it exits or this process gets SIGTERM / SIGINT.

    The signal is forwarded to TensorBoard (as SIGTERM) and TensorBoard is waited for (killed
    after 10 s), so the port is free when this returns. Returns 0 when stopped by a signal,
    else TensorBoard's exit code. ``on_ready(proc, url)`` is called once it answers.
    """
    proc, url = start_tensorboard(logdir, port=port)
    stopping: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        stopping.append(signum)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError):  # not the main thread: no handlers
            previous[sig] = signal.signal(sig, forward)
    try:
        if on_ready is not None:
            on_ready(proc, url)
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:  # a SIGINT that arrived before the handler was set
                forward(signal.SIGINT, None)
    finally:
        _stop(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if stopping else int(code)
