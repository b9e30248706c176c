"""A report is replaced whole: killed or failing mid-write, the previous report stays as it was
(never the new tables beside the old report.html); finished, only the new one is there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from gradlens.report import build as B
from gradlens.report.build import build_report
from tests.report._synth import make_table, write_run

ROOT = Path(__file__).resolve().parents[2]

_KILLED = """
import os, signal, sys
import gradlens.report.build as B
def killed(*args, **kwargs):  # tables and figures are written by now; the documents are next
    os.kill(os.getpid(), signal.SIGKILL)
B.outline = killed
B.build_report(sys.argv[1:-1], sys.argv[-1], title="new", progress=False)
"""


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _runs(tmp_path: Path) -> tuple[Path, Path]:
    a = write_run(tmp_path / "a", make_table(12, seed=0, estimators=("noise_scale",)), None,
                  name="old_run")
    b = write_run(tmp_path / "b", make_table(12, seed=1, estimators=("noise_scale",)), None,
                  name="new_run")
    return a, b


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _is_report_of(out: Path, label: str, title: str) -> None:
    runs = pd.read_csv(out / "runs.csv")
    verdicts = json.loads((out / "verdicts.json").read_text())
    assert list(runs["run"]) == [label]
    assert {v["run"] for v in verdicts} <= {label}
    assert f"<title>{title}" in (out / "report.html").read_text()
    assert all(label in p.name for p in (out / "figures").glob("spikes_*.png"))


def test_a_killed_report_leaves_the_previous_one_whole(tmp_path: Path) -> None:
    a, b = _runs(tmp_path)
    out = tmp_path / "report"
    build_report([a], out, title="old", progress=False)
    before = _snapshot(out)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _KILLED, str(b), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert _snapshot(out) == before  # the old report, byte for byte: no new table beside it
    _is_report_of(out, "old_run", "old")
    assert len(_siblings(out)) == 1  # the killed report's work, hidden beside it
    paths = build_report([b], out, title="new", progress=False)
    _is_report_of(out, "new_run", "new")
    assert not (out / "figures" / "spikes_old_run.png").exists()  # nothing of the old one
    assert _siblings(out) == []  # the dead report's directory was removed too
    assert paths.out_dir == out and paths.html == out / "report.html" and paths.html.is_file()
    assert all(p.is_file() and out in p.parents for p in paths.figures.values())


def test_a_failing_report_leaves_the_previous_one_and_no_litter(tmp_path: Path,
                                                                 monkeypatch) -> None:
    a, b = _runs(tmp_path)
    out = tmp_path / "report"
    build_report([a], out, title="old", progress=False)
    before = _snapshot(out)

    def failing(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(B, "outline", failing)
    with pytest.raises(RuntimeError, match="injected"):
        build_report([b], out, title="new", progress=False)
    assert _snapshot(out) == before and _siblings(out) == []


def test_a_directory_that_holds_no_report_is_refused_not_replaced(tmp_path: Path) -> None:
    a, _ = _runs(tmp_path)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no report"):
        build_report([a], other, progress=False)
    assert _snapshot(other) == {"keep.txt": b"mine"} and _siblings(other) == []
