"""The collector's own rough edges: step numbering, shared scalers, interrupted flushes, odd
parameters and inputs."""

from __future__ import annotations

import json

import pytest
import torch

from gradlens import GradLens
from gradlens.data import build_llama
from gradlens.sinks.memory import MemorySink


def _ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, 8), generator=g) for _ in range(n)]


@pytest.mark.parametrize("preset", ["minimal", "standard"])
def test_scaler_skipped_steps_keep_the_numbering(preset):
    """4 optimizer iterations, the second skipped by the GradScaler: 4 lens steps, the
    second a skipped_step event, whatever the preset and without observe_loss."""
    model = build_llama("tiny", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    lens = GradLens(model, opt, preset=preset, scaler=scaler)
    for it, ids in enumerate(_ids(4), start=1):
        scaler.scale(model(input_ids=ids, labels=ids).loss).backward()
        if it == 2:
            model.lm_head.weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    lens.flush()
    df = lens.memory.frame()
    assert sorted(df.step.unique()) == [1, 2, 3, 4]
    assert lens.step_count == 4
    assert list(df[df.stat == "skipped_step"].step) == [2]
    lens.close()


def test_two_lenses_on_one_scaler():
    model = build_llama("tiny", seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    a = GradLens(model, opt, preset="minimal", scaler=scaler)
    b = GradLens(model, opt, preset="minimal", scaler=scaler)

    def step(inject: bool):
        ids = _ids(1)[0]
        scaler.scale(model(input_ids=ids, labels=ids).loss).backward()
        if inject:
            model.lm_head.weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()

    step(True)  # skipped: both lenses see it
    assert a.step_count == b.step_count == 1
    a.close()  # closing the first keeps the second listening
    step(True)
    assert b.step_count == 2
    b.flush()
    assert list(b.memory.frame().query("stat == 'skipped_step'").step) == [1, 2]
    b.close()
    assert "update" not in vars(scaler)


def test_ctrl_c_during_a_flush_does_not_write_it_twice():
    class Interrupting(MemorySink):
        armed = True

        def write_stats(self, rows):
            super().write_stats(rows)
            if self.armed:
                self.armed = False
                raise KeyboardInterrupt

    sink = Interrupting()
    model = build_llama("tiny", seed=2)
    lens = GradLens(model, preset="minimal", sinks=[sink])
    ids = _ids(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(KeyboardInterrupt):
        lens.step()
    lens.close()
    keys = [(s, layer, stat) for s, layer, _, stat, _ in sink.rows]
    assert len(keys) == len(set(keys)) > 0


def test_zero_element_parameter_is_skipped():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 0), torch.nn.Flatten())
    for preset in ("standard", "full"):
        lens = GradLens(model, preset=preset)
        assert [i.name for i in lens.layers] == ["0.weight", "0.bias"]
        for _ in range(2):
            (model[0](torch.randn(5, 4)).pow(2).mean() + model(torch.randn(5, 4)).sum()).backward()
        lens.step()
        lens.flush()
        assert lens.memory.frame().value.notna().any()
        lens.close()
        model.zero_grad()


def test_observe_loss_accepts_numbers_and_scalars_only():
    model = torch.nn.Linear(3, 2)
    lens = GradLens(model, preset="minimal")
    lens.observe_loss(2.5)
    lens.observe_loss(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="one element"):
        lens.observe_loss(torch.ones(2))
    with pytest.raises(TypeError, match="tensor or a number"):
        lens.observe_loss("1.0")
    model(torch.randn(4, 3)).sum().backward()
    lens.step()
    lens.flush()
    df = lens.memory.frame()
    assert float(df[df.stat == "loss"].value.iloc[0]) == pytest.approx(3.0)
    lens.close()


def test_interrupted_run_says_so(tmp_path):
    model = torch.nn.Linear(3, 2)
    with pytest.raises(RuntimeError), GradLens(model, logdir=tmp_path / "run",
                                               tensorboard=False):
        model(torch.randn(4, 3)).sum().backward()
        raise RuntimeError("boom")
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["ended"] == "interrupted" and meta["finished"] is False
