"""One writer per run directory, reading a live run, and a constructor that fails."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from gradlens import GradLens
from gradlens.data import build_llama
from gradlens.report.load import load_meta, load_run
from gradlens.sinks._lock import LOCK_FILE, RunLockedError
from gradlens.sinks.table import TableSink

ROOT = Path(__file__).resolve().parents[2]


def _rows(step: int, n: int = 5) -> list[tuple[int, str, str, str, float]]:
    return [(step, f"l{i}", "hidden", "grad_norm", step + i / 10) for i in range(n)]


def _child(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


_WRITER = """
import sys, time
from gradlens.sinks.table import TableSink
sink = TableSink(sys.argv[1])
sink.open({"name": "first"})
print("locked", flush=True)
n = int(sys.argv[2])
for s in range(1, n + 1):
    sink.write_stats([(s, f"l{i}", "hidden", "grad_norm", s + i / 10) for i in range(5)])
    sink.flush()
    time.sleep(float(sys.argv[3]))
sink.close("finished")
"""


def test_a_second_writer_gets_a_clear_error_and_the_first_loses_nothing(tmp_path: Path) -> None:
    model = build_llama("tiny", seed=0)
    first = _child(_WRITER, str(tmp_path), "30", "0.1")
    assert first.stdout is not None and first.stdout.readline().strip() == "locked"
    with pytest.raises(RunLockedError, match=rf"process {first.pid} on host .*new logdir"):
        TableSink(tmp_path)
    with pytest.raises(RunLockedError):  # the lens says the same (its table sink raises)
        GradLens(model, logdir=tmp_path)
    assert first.poll() is None  # it was still writing
    assert first.wait(60) == 0, first.stderr.read() if first.stderr else ""
    df = load_run(tmp_path)
    assert sorted(set(df["step"])) == list(range(1, 31)) and len(df) == 150
    assert df["value"].tolist() == [r[4] for s in range(1, 31) for r in _rows(s)]
    assert load_meta(tmp_path)["name"] == "first" and load_meta(tmp_path)["finished"]
    assert not (tmp_path / LOCK_FILE).exists()  # released at close
    with pytest.warns(UserWarning, match="already holds a run"):  # a resume after it: fine
        TableSink(tmp_path).close()


def test_a_killed_writer_leaves_no_stale_lock(tmp_path: Path) -> None:
    first = _child(_WRITER, str(tmp_path), "1000", "0.01")
    assert first.stdout is not None and first.stdout.readline().strip() == "locked"
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("stats-*.parquet"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    first.kill()
    first.wait(30)
    df = load_run(tmp_path)  # every flushed row, no partial one
    assert len(df) % 5 == 0 and len(df) > 0
    with pytest.warns(UserWarning, match="already holds a run"):
        sink = TableSink(tmp_path)  # the lock died with the process
    sink.close()


def test_two_sinks_in_one_process_and_the_override(tmp_path: Path) -> None:
    a = TableSink(tmp_path)
    with pytest.raises(RunLockedError, match=f"process {os.getpid()}"):
        TableSink(tmp_path)
    b = TableSink(tmp_path, lock=False)  # the documented override
    b.close()
    a.close()


def test_reading_a_live_run_never_fails_and_never_sees_a_partial_row(tmp_path: Path) -> None:
    writer = _child(_WRITER.replace('sink.open({"name": "first"})\nprint("locked", flush=True)',
                                    'print("locked", flush=True)\ntime.sleep(0.5)\n'
                                    'sink.open({"name": "first"})'),
                    str(tmp_path), "150", "0.003")  # 150 flushes: two merges happen meanwhile
    assert writer.stdout is not None and writer.stdout.readline().strip() == "locked"
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a warning
        while writer.poll() is None:
            if (tmp_path / "run.json").exists():
                df = load_run(tmp_path)  # empty before the first flush, never an error
                assert len(df) % 5 == 0
                steps = sorted(set(df["step"]))
                assert steps == list(range(1, len(steps) + 1))  # whole flushes, in order
                seen.append(len(steps))
    assert writer.returncode == 0
    assert seen and seen == sorted(seen) and len(set(seen)) > 3
    assert len(load_run(tmp_path)) == 750


# ---------------------------------------------------------------------- a failed constructor


class _Bad:
    needs: frozenset[str] = frozenset()


BAD_ARGUMENTS = [
    ("scaler", {"scaler": 5}),
    ("meta", {"meta": 5}),
    ("statistics", {"statistics": [5]}),
    ("guard", {"guard": 5}),
    ("preset", {"preset": "nope"}),
    ("table_format", {"table_format": "xml"}),
    ("log_every", {"log_every": 0}),
    ("include", {"include": ["no.such.layer"]}),
    ("option", {"bogus_option": 1}),
]


def _hooks(model: torch.nn.Module) -> int:
    n = 0
    for m in model.modules():
        n += len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks)
    for p in model.parameters():
        n += len(p._backward_hooks or {}) + len(getattr(p, "_post_accumulate_grad_hooks",
                                                        None) or {})
    return n


def _open_files_under(d: Path) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(d)):
            out.append(target)
    return out


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
@pytest.mark.parametrize(("what", "bad"), BAD_ARGUMENTS, ids=[w for w, _ in BAD_ARGUMENTS])
def test_a_failed_constructor_leaves_nothing_behind(tmp_path: Path, what: str, bad: dict) -> None:
    model = build_llama("tiny", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    hooks = _hooks(model)
    threads = {t.name for t in __import__("threading").enumerate()}
    with pytest.raises((ValueError, TypeError, AttributeError)):
        GradLens(model, opt, logdir=tmp_path, **bad)
    assert _hooks(model) == hooks
    assert opt._optimizer_step_pre_hooks == {} or len(opt._optimizer_step_pre_hooks) == 0
    assert _open_files_under(tmp_path) == []
    assert {t.name for t in __import__("threading").enumerate()} <= threads
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no lock, run.json, event file
    # a retry writes every row once
    with GradLens(model, opt, logdir=tmp_path, preset="minimal") as lens:
        ids = torch.randint(0, 128, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    df = load_run(tmp_path, dedupe=False)
    assert not df.duplicated(["step", "layer", "stat"]).any()
    assert set(df["step"]) == {1} and lens.step_count == 1
