"""gradlens compare states its run count and an estimated time before it starts, and shows a
progress bar over the runs with the time left."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gradlens.compare import (
    PRIOR_PARAMS,
    PRIOR_S_PER_STEP,
    PRIOR_TOKENS,
    format_seconds,
    run_compare,
    seconds_per_step,
)
from gradlens.experiment import RunConfig


def test_format_seconds() -> None:
    assert [format_seconds(s) for s in (42, 420, 9000)] == ["42 s", "7 min", "2.5 h"]


def test_prior_scales_with_parameters_and_tokens(tmp_path: Path) -> None:
    from gradlens.experiment import build_model

    cfg = RunConfig(size="tiny", batch_size=4, seq_len=32, grad_accum=2)
    params = sum(p.numel() for p in build_model("tiny").parameters())
    s, basis = seconds_per_step(tmp_path, cfg)  # nothing finished in tmp_path
    assert s == pytest.approx(PRIOR_S_PER_STEP * params / PRIOR_PARAMS * (4 * 32 * 2) / PRIOR_TOKENS)
    assert basis.startswith("rough")


def test_finished_runs_give_the_estimate(tmp_path: Path) -> None:
    for k, wall in enumerate((10.0, 40.0, 20.0)):  # 10 steps each: 1, 4, 2 s per step
        run = tmp_path / "runs" / f"r{k}"
        run.mkdir(parents=True)
        (run / "result.json").write_text(json.dumps({"info": {"wall_s": wall},
                                                     "step_times": [0.1] * 10}))
    s, basis = seconds_per_step(tmp_path, RunConfig(size="tiny"))
    assert s == pytest.approx(2.0)
    assert basis == "the median of the 3 finished runs"


def test_compare_states_count_and_time_first(tmp_path, corpus_file, capsys) -> None:
    out = tmp_path / "cmp"
    kw = dict(optimizers=("adamw", "scale"), lr_factors=(1.0,), steps=2, size="tiny",
              corpus=str(corpus_file), preset="minimal", progress=True, seq_len=16,
              batch_size=2, grad_accum=1, eval_batches=1, vocab_size=300,
              model_overrides={"vocab_size": 300})
    run_compare(out, **kw)
    captured = capsys.readouterr()
    first = captured.out.splitlines()[0]
    assert re.fullmatch(r"gradlens compare: 2 runs \(2 optimizers x 1 lrs x 1 seed\(s\)\), "
                        r"0 done already, 2 to run; estimated \d+ s \(rough: .*\)", first), first
    assert "runs: 100%" in captured.err and "left" in captured.err  # the bar and its ETA
    walls = [json.loads(p.read_text())["info"]["wall_s"]
             for p in (out / "runs").glob("*/result.json")]
    assert len(walls) == 2 and all(w > 0 for w in walls)
    run_compare(out, **kw)  # resumes: the estimate now rests on the finished runs
    first = capsys.readouterr().out.splitlines()[0]
    assert "2 done already, 0 to run" in first
    assert first.endswith("(the median of the 2 finished runs)")
