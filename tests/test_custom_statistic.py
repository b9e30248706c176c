"""examples/custom_statistic.py: a user statistic reaches the table, TensorBoard and the
report like a built-in, with the value computed here from the same gradients."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gradlens
from gradlens.report import load_run
from gradlens.schema import tb_group_tag

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_statistic.py"


def _example():
    spec = importlib.util.spec_from_file_location("example_custom_statistic", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_custom_statistic_in_table_and_tensorboard(tmp_path):
    ex = _example()
    out = ex.main(["--out", str(tmp_path / "run"), "--steps", "3"])
    df = load_run(out)
    rows = df[df.stat == "sign_opposition"]
    assert sorted(rows.step.unique()) == [1, 2, 3]
    assert rows.value.between(0, 1).all() and rows.value.std() > 0
    acc = EventAccumulator(out, size_guidance={"scalars": 0})
    acc.Reload()
    assert tb_group_tag("sign_opposition", "output", "mean") in acc.Tags()["scalars"]


def test_custom_statistic_value_and_clash():
    import torch

    ex = _example()
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    lens = gradlens.GradLens(model, preset="minimal", statistics=[ex.SignOpposition])
    model(torch.randn(5, 4)).pow(2).sum().backward()
    want = {n: float((p.grad * p < 0).float().mean()) for n, p in model.named_parameters()}
    lens.step()
    lens.flush()
    got = lens.memory.frame()
    lens.close()
    for name, value in want.items():
        sel = got[(got.layer == name) & (got.stat == "sign_opposition")]
        assert float(sel.value.iloc[0]) == pytest.approx(value)

    class Clash(gradlens.LayerStatistic):
        name = "clash"
        emits = ("grad_norm",)

    with pytest.raises(ValueError, match="already exists"):
        gradlens.GradLens(model, statistics=[Clash])
