"""Serve a run directory with TensorBoard on the loopback interface."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_tensorboard(logdir: str | Path, port: int | None = None,
                      timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Start TensorBoard on ``logdir`` at 127.0.0.1 and wait until it answers.

    Returns the process and the address of the custom-scalars dashboard.
    """
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise FileNotFoundError(f"{logdir} is not a directory; pass a run directory the lens wrote")
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host",
         "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"TensorBoard exited with code {proc.returncode}: {err[-2000:]}")
        try:
            with urllib.request.urlopen(f"{base}/data/runs", timeout=2):
                return proc, f"{base}/#custom_scalars"
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    proc.terminate()
    raise TimeoutError(f"TensorBoard did not answer on {base} within {timeout:.0f} s")
