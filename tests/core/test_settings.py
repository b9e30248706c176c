"""The run's settings: ``lr/<group>`` at every logged step (floats and tensor rates), the
optimizer's class and hyperparameters, batch size and preset in run.json, and the report's
header showing them."""

from __future__ import annotations

import json

import pytest
import torch

from gradlens import GradLens
from gradlens.core.settings import group_names, optimizer_settings
from gradlens.data import build_llama
from gradlens.optim import SCALE, scale_param_groups
from gradlens.report.load import load_meta, load_run
from gradlens.report.settings import run_settings

STEPS, EVERY = 12, 3
pytestmark = pytest.mark.filterwarnings("ignore:gradlens. no output layer")


def model_and_groups():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    decay = [p for p in model.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if p.ndim == 1]
    return model, [{"params": decay, "name": "decay", "weight_decay": 0.1},
                   {"params": rest, "name": "no_decay", "weight_decay": 0.0}]


def train(tmp_path, lr=3e-3):
    model, groups = model_and_groups()
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / 4 if s < 4 else 0.5 ** (s - 3))
    used = {}
    x, y = torch.randn(STEPS, 4, 6), torch.randn(STEPS, 4, 3)
    with GradLens(model, opt, logdir=tmp_path / "run", log_every=EVERY, batch_size=4,
                  tensorboard=False, background_io=False) as lens:
        for s in range(STEPS):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x[s]), y[s]).backward()
            used[s + 1] = [float(g["lr"]) for g in opt.param_groups]  # the rate this step uses
            opt.step()
            sched.step()
    return lens, used


def test_learning_rate_rows_match_the_scheduler(tmp_path):
    _, used = train(tmp_path)
    df = load_run(tmp_path / "run")
    for k, name in enumerate(("decay", "no_decay")):
        got = df[(df["layer"] == "global") & (df["stat"] == f"lr/{name}")]
        steps = list(range(EVERY, STEPS + 1, EVERY))
        assert sorted(got["step"]) == steps
        for step, value in zip(got["step"], got["value"], strict=True):
            assert value == pytest.approx(used[step][k], rel=1e-6)  # float32 table values
    assert len({round(v[0], 12) for v in used.values()}) > 3  # the schedule did move


def test_tensor_learning_rate_travels_with_the_flush(tmp_path):
    _, used = train(tmp_path, lr=torch.tensor(3e-3))
    df = load_run(tmp_path / "run")
    got = df[(df["layer"] == "global") & (df["stat"] == "lr/decay")].sort_values("step")
    assert list(got["value"]) == pytest.approx([used[s][0] for s in got["step"]], rel=1e-6)


def test_run_json_holds_the_settings(tmp_path):
    train(tmp_path)
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    s = meta["optimizer_settings"]
    assert s["class"] == "AdamW" and s["module"] == "torch.optim.adamw"
    assert [g["name"] for g in s["groups"]] == ["decay", "no_decay"]
    assert [g["n_params"] for g in s["groups"]] == [2, 2]
    assert [g["weight_decay"] for g in s["groups"]] == [0.1, 0.0]
    assert s["groups"][0]["betas"] == [0.9, 0.95] and s["groups"][0]["initial_lr"] == 3e-3
    assert meta["batch_size"] == 4 and meta["preset"] == "standard"
    header = run_settings(load_meta(tmp_path / "run"), load_run(tmp_path / "run"))
    assert header["optimizer"].startswith("AdamW lr=")
    assert "betas=(0.9, 0.95)" in header["optimizer"]
    assert "; decay: weight_decay=0.1; no_decay: weight_decay=0" in header["optimizer"]
    assert header["batch size"] == "4"
    assert header["learning rate"].startswith("decay: ")


def test_group_names_and_unreadable_entries():
    _, groups = model_and_groups()
    groups[1]["name"] = "decay"  # a duplicate name gets its index
    opt = torch.optim.SGD(groups, lr=0.1)
    opt.param_groups[0]["gate"] = torch.ones(3)  # not a scalar: left out, and said so
    assert group_names(opt) == ["decay", "decay#1"]
    s = optimizer_settings(opt)
    assert s["skipped"] == ["gate"] and "gate" not in s["groups"][0]
    assert optimizer_settings(None) is None
    unnamed = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    assert group_names(unnamed) == ["0"]
    scale = SCALE(scale_param_groups(build_llama("tiny", seed=0), lr=1e-3))
    roles = [str(g["role"]) for g in scale.param_groups]
    names = group_names(scale)
    assert len(set(names)) == len(names) and "vector" not in " ".join(names)
    assert names[roles.index("vector")] == "1d" and names[roles.index("output")] == "output"
