"""``gradlens dashboard``: SIGTERM / SIGINT stop TensorBoard too, a taken port is a clear
error, TensorBoard's output goes to a log file (no pipe nobody reads)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradlens.cli import main
from gradlens.sinks.table import TableSink
from gradlens.tensorboard.launcher import LOG_FILE, free_port, start_tensorboard

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")


def _run_dir(tmp_path: Path) -> Path:
    with TableSink(tmp_path / "run") as sink:
        sink.write_stats([(1, "l", "hidden", "grad_norm", 1.0)])
    return tmp_path / "run"


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] == "Z"
    except OSError:
        return True


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_tensorboard_and_frees_the_port(tmp_path: Path, sig: int) -> None:
    run, port = _run_dir(tmp_path), free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cli = subprocess.Popen(
        [sys.executable, "-m", "gradlens.cli", "dashboard", str(run), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = cli.stdout.readline() if cli.stdout else ""  # blocks until ready (or exit)
        m = re.search(r"TensorBoard \(pid (\d+)\) is serving .* at http://127\.0\.0\.1:(\d+)/",
                      line)
        assert m, line + (cli.stderr.read() if cli.stderr else "")
        child = int(m.group(1))
        assert int(m.group(2)) == port and not _port_free(port)
        cli.send_signal(sig)
        assert cli.wait(timeout=30) == 0
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(timeout=30)
    deadline = time.monotonic() + 15
    while not (_gone(child) and _port_free(port)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _gone(child), "TensorBoard outlived the dashboard command"
    assert _port_free(port)
    assert (run / LOG_FILE).is_file()  # its output went to the log, not to a pipe


def test_port_in_use_is_a_clear_error(tmp_path: Path, capsys) -> None:
    run = _run_dir(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["dashboard", str(run), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gradlens dashboard: error: port {port} on 127.0.0.1 is already in "
                          "use")
    assert "pass --port with a free port, or leave --port out" in err
    assert "Traceback" not in err


def test_tensorboard_output_is_not_a_pipe(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    proc, _ = start_tensorboard(run, timeout=60)
    try:
        assert proc.stdout is None and proc.stderr is None
        assert (run / LOG_FILE).is_file()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
