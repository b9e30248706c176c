"""The re-attach warning names what works, and what it names does work."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from gradlens import GradLens
from gradlens.report.load import load_meta, load_run
from gradlens.sinks.table import TableSink


def _train(lens_kwargs: dict, steps: int = 2) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradLens(model, opt, preset="minimal", output="2", tensorboard=False,
                  **lens_kwargs) as lens:
        for _ in range(steps):
            loss = model(torch.randn(8, 4)).square().mean()
            loss.backward()
            lens.observe_loss(loss)
            opt.step()
            opt.zero_grad()


def test_reattach_warning_names_a_call_that_works(tmp_path: Path) -> None:
    _train({"logdir": tmp_path})
    with pytest.warns(UserWarning, match="already holds a run") as record:
        _train({"logdir": tmp_path})
    text = next(str(w.message) for w in record if "already holds a run" in str(w.message))
    assert "pass resume=True" not in text  # GradLens takes no resume argument
    hint = re.search(r"GradLens\(model, optimizer, sinks=\[TableSink\(logdir, resume=True\)\]\)",
                     text)
    assert hint is not None, text
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # appends silently, as the warning says
        _train({"sinks": [TableSink(tmp_path, resume=True)]})
    assert load_meta(tmp_path)["resumed"] == 2
    assert sorted(set(load_run(tmp_path)["step"])) == [1, 2]
    with pytest.raises(FileExistsError, match=r"TableSink\(\.\.\., resume=True\)"):
        TableSink(tmp_path, resume=False)
    with pytest.raises(ValueError, match=r"unknown lens option\(s\) \['resume'\]"):
        _train({"logdir": tmp_path, "resume": True})  # what the old warning told users to do
