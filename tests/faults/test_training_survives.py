"""End to end: a GradLens whose table sink cannot write keeps training; the rows land later."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from gradlens import GradLens
from gradlens.report.load import load_meta, load_run
from gradlens.sinks.memory import MemorySink
from gradlens.sinks.table import TableSink
from tests.faults._faults import Faults, recorded, write_warnings


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def test_training_goes_on_through_a_disk_full_and_every_row_lands(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    table, memory = TableSink(tmp_path, format="jsonl"), MemorySink()
    faults = Faults(table.files)
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    weights = []
    lens = GradLens(model, opt, sinks=[table, memory], preset="minimal", output="2")
    with recorded() as caught, lens:
        for step in range(1, 13):
            faults.mode = "partial" if 4 <= step <= 8 else None
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            lens.observe_loss(loss)
            opt.step()  # the lens flushes (log_every=1) inside this call
            opt.zero_grad()
            weights.append(model[0].weight.detach().clone())
    assert faults.calls >= 4  # the faults were hit
    assert len(write_warnings(caught)) == 1
    assert all(not torch.equal(a, b) for a, b in itertools.pairwise(weights))
    df = load_run(tmp_path, dedupe=False)
    expected = memory.frame()
    assert len(df) == len(expected) > 0
    assert sorted(set(df["step"])) == list(range(1, 13))
    assert df.sort_values(["step", "layer", "stat"]).reset_index(drop=True)[
        ["step", "layer", "stat"]].equals(
        expected.sort_values(["step", "layer", "stat"]).reset_index(drop=True)[
            ["step", "layer", "stat"]])
    meta = load_meta(tmp_path)
    assert meta["rows_written"] == len(expected) and meta["rows_dropped"] == 0
    assert meta["finished"] is True


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_a_run_interrupted_inside_the_lens_reads_as_interrupted(tmp_path: Path,
                                                                 error: type) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 8)
    with pytest.raises(error), GradLens(model, opt, logdir=tmp_path, preset="minimal",
                                        output="2", tensorboard=False) as lens:
        for step in range(1, 4):
            loss = model(x).square().mean()
            loss.backward()
            lens.observe_loss(loss)
            opt.step()
            opt.zero_grad()
            if step == 3:
                raise error
    meta = load_meta(tmp_path)
    assert meta["ended"] == "interrupted" and meta["finished"] is False
    assert sorted(set(load_run(tmp_path)["step"])) == [1, 2, 3]

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradLens(model, opt, logdir=tmp_path / "ok", preset="minimal", output="2",
                  tensorboard=False) as lens:
        model(x).square().mean().backward()
        opt.step()
    assert load_meta(tmp_path / "ok")["ended"] == "finished"
    assert load_meta(tmp_path / "ok")["finished"] is True
