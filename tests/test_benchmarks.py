"""The user-facing benchmark and the GPU suite run (tiny models, on the CPU)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_bench_lens_user_quick() -> None:
    out = _run("benchmarks/bench_lens_user.py", "--quick", "--optimizers", "adamw", "scale")
    lines = [line.split() for line in out.splitlines() if line.split()[:1] in (["adamw"],
                                                                              ["scale"])]
    rows = {(w[0], w[1], w[2]): w for w in lines}
    for opt in ("adamw", "scale"):
        for preset in ("minimal", "standard", "full"):
            for every in ("1", "2"):
                ratio = float(rows[(opt, preset, every)][3])
                assert math.isfinite(ratio) and ratio > 0
                assert math.isfinite(float(rows[(opt, preset, every)][-2]))  # us/tensor
        assert float(rows[(opt, "standard", "1")][-1].rstrip("%")) < 5  # O(units) memory
        assert 150 < float(rows[(opt, "full", "1")][-1].rstrip("%")) < 250  # 2x the matrices


def test_bench_sinks_quick() -> None:
    out = _run("benchmarks/bench_sinks.py", "--quick")
    ratios = [float(line.split("template/reference")[1].split()[0])
              for line in out.splitlines() if "template/reference" in line]
    assert len(ratios) == 2 and all(math.isfinite(r) and r > 0 for r in ratios)


def test_bench_flush_quick_times_each_sink_and_the_records() -> None:
    out = _run("benchmarks/bench_flush.py", "--quick")
    for preset in ("minimal", "standard"):
        block = out.split(f"{preset}: ")[1].split("\n  flush")[1]
        for part in ("records", "TableSink", "TensorBoardSink"):
            cpu = float(block.split(f"  {part}")[1].split("cpu")[1].split()[0])
            assert math.isfinite(cpu) and cpu >= 0


def test_profile_lens_inline_io_profiles_the_sinks() -> None:
    out = _run("benchmarks/profile_lens.py", "--quick", "--top", "3", "--io", "inline")
    writes = float(out.split("the sinks' writes ")[1].split("%")[0])
    assert 0 < writes < float(out.split("the lens ")[1].split("%")[0]) < 100


def test_profile_lens_quick() -> None:
    out = _run("benchmarks/profile_lens.py", "--quick", "--top", "3")
    share = float(out.split("the lens ")[1].split("%")[0])
    assert 0 < share < 100
    assert "optimizers.py" in out and "(_pre_hook)" in out  # the step hook: an entry point


def test_gpu_suite_on_cpu() -> None:
    out = _run("benchmarks/gpu_suite.py", "--device", "cpu", "--tiny")
    assert "FAILED" not in out
    for preset in ("minimal", "standard", "full"):
        assert f"adamw {preset}" in out and f"scale {preset}" in out
        assert f"{preset}: 5 steps without a sync" in out
    assert "scale vs adamw tiny" in out
    rows = [line for line in out.splitlines() if line.startswith("us/tensor/step tiny (21")]
    assert len(rows) == 10  # the noise floor and 3 presets at log_every 1, 2 and never
    for preset in ("minimal", "standard", "full"):
        assert sum(f"{preset} log_every=" in line for line in rows) == 3
        assert sum(f"{preset} log_every=never" in line for line in rows) == 1
    assert all(" us, " in line and "x; no sync" in line for line in rows)


def test_bench_slow_disk_quick() -> None:
    out = _run("benchmarks/bench_slow_disk.py", "--quick", "--stall", "1")
    ratios = [float(line.split("/fast")[1].split()[0]) for line in out.splitlines()
              if "/fast " in line]
    assert len(ratios) == 3 and all(math.isfinite(r) and r > 0 for r in ratios)
    written = [line.split("rows_written")[1].split()[0] for line in out.splitlines()
               if "rows_written" in line]
    assert len(written) == 4 and len(set(written[:3])) == 1  # slow disk: no row lost
    assert "rows_dropped 0" in out.splitlines()[-1]
    assert "longest hand-over to the writer" in out


def test_bench_summaries_quick() -> None:
    out = _run("benchmarks/bench_summaries.py", "--rounds", "2", "--rows", "8")
    figures = [float(line[30:].split()[0]) for line in out.splitlines()
               if line.startswith(("unlogged,", "logged with axes,"))]
    assert len(figures) == 5 and all(math.isfinite(f) and f > 0 for f in figures)


def test_bench_pe_check_quick() -> None:
    out = _run("benchmarks/bench_pe_check.py", "--quick")
    amortized = next(line for line in out.splitlines() if "all steps (amortized)" in line)
    share = float(amortized.split("mean")[1].strip().rstrip("%"))
    assert math.isfinite(share) and 0 <= share < 100
    assert "check on / off" in out and "noise floor off2 / off" in out


def test_bench_lens_calls_quick_unlogged_standard_steps_add_no_call_per_tensor() -> None:
    """Counts, not timings: on a step that is not logged, ``standard`` (two-batch and column
    hooks when logged) makes fewer extra Python calls than ``minimal`` than there are tracked
    tensors (the per-tensor hooks exist on logged steps only); before, 8 more per tensor."""
    out = _run("benchmarks/bench_lens_calls.py", "--quick", "--presets", "minimal", "standard")
    rows = {w[0]: w for w in (line.split() for line in out.splitlines())
            if w[:1] in (["minimal"], ["standard"])}
    tensors = int(rows["minimal"][1])
    unlogged = {p: float(rows[p][2]) for p in rows}
    assert unlogged["minimal"] > 0 and abs(unlogged["standard"] - unlogged["minimal"]) < tensors
    assert float(rows["standard"][3]) > unlogged["standard"]  # logged steps do the work


def test_bench_lens_calls_counts_the_sinks_writing_apart() -> None:
    """With the file sinks written inline, their calls are counted in a column of their own:
    a few hundred per logged step (columns, not rows), never zero."""
    out = _run("benchmarks/bench_lens_calls.py", "--quick", "--presets", "standard",
               "--sinks", "files")
    row = next(w for w in (line.split() for line in out.splitlines()) if w[:1] == ["standard"])
    writing = float(row[4])
    assert 0 < writing < 2000
