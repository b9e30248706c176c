"""The spike guard in real training runs: a 100x gradient spike in the output layer.

The tiny LLaMA trains for ``STEPS`` steps on a fixed Markov-chain token stream. At step
``INJECT`` the output layer's gradient is multiplied by 100 between backward and step. The
reference is the same run without the spike; losses are compared as a moving average over
``WINDOW`` steps (the data stream is identical, so the difference is the parameters'). Without
the guard the loss jumps and stays off for many steps; with the guard (skip, or damp to the
detector's forecast norm) it stays within ``TOL`` of the clean run. A clean run of 300 steps
with the guard on never fires.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from gradlens import GradLens, SpikeGuard
from gradlens.data import build_llama
from gradlens.optim import SCALE, GatedOptimizer, StableSPAM, scale_param_groups
from tests.stats.test_spikes import markov_batches

STEPS, INJECT, WINDOW, LAYER = 200, 100, 10, "lm_head.weight"
TOL = {"skip": 0.03, "damp": 0.01}  # largest moving-average loss gap to the clean run after
# the spike, with a guard (a skip also drops one batch's update: a gap of its own)
JUMP = 0.03  # the spike without a guard moves the loss by more than this


def make_optimizer(name: str, model: torch.nn.Module):
    if name == "adamw":
        return GatedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95)))
    if name == "scale":
        return SCALE(scale_param_groups(model, lr=3e-3, lr_1d=3e-3))
    return StableSPAM(model.parameters(), lr=3e-3)


@contextlib.contextmanager
def spiked(param: torch.Tensor, on: bool):
    """A 100x spike of ``param``'s raw gradient, made in the backward (the detectors and the
    guard read the gradient before any edit between backward and step)."""
    handle = param.register_hook(lambda g: g * 100.0) if on else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def train(name: str, guard: SpikeGuard | None, spike: bool, steps: int = STEPS):
    """Per-step training losses and the lens's events."""
    torch.manual_seed(0)
    model = build_llama("tiny", seed=0)
    opt = make_optimizer(name, model)
    data = markov_batches(model.config.vocab_size, steps, seed=1)
    target = dict(model.named_parameters())[LAYER]
    losses = []
    with GradLens(model, opt, preset="minimal", guard=guard, tensorboard=False) as lens:
        for s in range(steps):
            loss = model(input_ids=data[s], labels=data[s]).loss
            opt.zero_grad(set_to_none=True)
            with spiked(target, spike and s == INJECT):
                loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return torch.tensor(losses, dtype=torch.float64), lens.memory.events


def smooth(x: torch.Tensor) -> torch.Tensor:
    """Trailing moving average over WINDOW steps."""
    c = torch.cat([x.new_zeros(1), x.cumsum(0)])
    return (c[WINDOW:] - c[:-WINDOW]) / WINDOW  # entry i: mean of x[i .. i+WINDOW-1]


def gap_after_spike(run: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """|moving average of run - of clean| for windows that start after the spike."""
    return (smooth(run) - smooth(clean)).abs()[INJECT + 1:]


def recovery_steps(gap: torch.Tensor, tol: float) -> int | None:
    """Steps after the spike until the gap stays below tol for the rest of the run."""
    bad = (gap >= tol).nonzero()
    if len(bad) == 0:
        return 0
    last = int(bad[-1]) + 1
    return None if last >= len(gap) else last


@pytest.fixture(scope="module", params=["adamw", "scale", "stable_spam"])
def runs(request):
    name = request.param
    clean, _ = train(name, None, spike=False)
    spiked, _ = train(name, None, spike=True)
    skip = train(name, SpikeGuard("skip"), spike=True)
    damp = train(name, SpikeGuard("damp"), spike=True)
    return name, clean, spiked, skip, damp


def test_spike_hurts_without_guard(runs):
    name, clean, spiked, _, _ = runs
    gap = gap_after_spike(spiked, clean)
    n = recovery_steps(gap, TOL['damp'])
    print(f"\n{name}: no guard: largest gap {float(gap.max()):.4f}, recovery to {TOL['damp']}: "
          f"{f'not within {len(gap)} steps' if n is None else n}")
    assert float(gap.max()) > JUMP
    assert n is None or n > 20


@pytest.mark.parametrize("action", ["skip", "damp"])
def test_guard_keeps_the_run_on_the_clean_curve(runs, action):
    name, clean, _, skip, damp = runs
    losses, events = skip if action == "skip" else damp
    gap = gap_after_spike(losses, clean)
    print(f"\n{name}: {action}: largest gap {float(gap.max()):.5f}")
    assert float(gap.max()) < TOL[action]
    guarded = [e for e in events if e.kind == "guarded_step"]
    assert {e.step for e in guarded} == {INJECT + 1}  # lens steps count from 1
    if action == "skip":
        assert guarded[0].layer == "global" and guarded[0].value == 0.0
    else:
        assert {e.layer for e in guarded} >= {LAYER}
        e = next(e for e in guarded if e.layer == LAYER)
        assert 0.005 < e.value < 0.05  # ~1/100: damped back to the forecast level
        assert e.score > 9


def test_clean_run_never_fires():
    losses, events = train("adamw", SpikeGuard({"*": "skip"}, global_action="damp"),
                           spike=False, steps=300)
    ref, _ = train("adamw", None, spike=False, steps=300)
    assert not [e for e in events if e.kind == "guarded_step"]
    assert torch.equal(losses, ref)  # a guard that does not fire changes nothing, bit for bit
    assert math.isfinite(float(losses[-1]))


@pytest.mark.parametrize("name", ["scale", "adamw"])
def test_guard_takes_no_host_sync(name):
    """Backward, the lens's step (detectors, gate, damping) and, for SCALE, the gated step
    itself run with every tensor -> Python conversion raising, through a spike that the guard
    skips or damps; only flushes (every 40th step) may convert."""
    from tests.core.test_lens import _NoSync

    model = build_llama("tiny", seed=0)
    opt = make_optimizer(name, model)
    guard = SpikeGuard({"output": "damp", "hidden": "skip"}, global_action="none")
    data = markov_batches(model.config.vocab_size, 40, seed=1)
    target = dict(model.named_parameters())
    lens = GradLens(model, opt, preset="minimal", log_every=40, guard=guard,
                    tensorboard=False, step_hook=name == "scale")
    for s in range(40):
        flush = (s + 1) % 40 == 0
        with contextlib.nullcontext() if flush else _NoSync():
            loss = model(input_ids=data[s], labels=data[s]).loss
            opt.zero_grad(set_to_none=True)
            with spiked(target[LAYER], s == 30), \
                    spiked(target["model.layers.0.mlp.up_proj.weight"], s == 33):
                loss.backward()  # damped at 31, skipped at 34
            if name == "scale":
                opt.step()
            else:
                lens.step()  # torch's AdamW reads its CPU step counter (not the lens's sync)
        if name != "scale":
            opt.step()
    lens.close()
    guarded = {(e.step, e.reason) for e in lens.memory.events if e.kind == "guarded_step"}
    assert guarded == {(31, "damp"), (34, "skip")}


def test_clear_errors():
    model = build_llama("tiny", seed=0)
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="GatedOptimizer"):
        GradLens(model, plain, preset="minimal", tensorboard=False, guard=SpikeGuard("skip"))
    with pytest.raises(ValueError, match="matches no tracked layer"):
        GradLens(model, plain, preset="minimal", tensorboard=False,
                 guard=SpikeGuard({"*.nothing.*": "damp"}, nonfinite="none"))
    with pytest.raises(ValueError, match="policy"):
        SpikeGuard("clip")
    lens = GradLens(model, plain, preset="minimal", tensorboard=False,
                    guard=SpikeGuard("damp", nonfinite="none"))  # damping needs no gate
    lens.close()


def test_guarded_steps_reach_the_report_and_tensorboard(tmp_path):
    """A guarded run's directory: spikes.jsonl has the guarded_step event with its action, the
    instability verdict counts it, the TensorBoard text names the action."""
    from gradlens.report import load_run, load_spikes
    from gradlens.report.verdicts import instability_verdict
    from gradlens.schema import SpikeEvent
    from gradlens.tensorboard.sink import spike_markdown

    model = build_llama("tiny", seed=0)
    opt = make_optimizer("scale", model)
    data = markov_batches(model.config.vocab_size, 40, seed=1)
    with GradLens(model, opt, logdir=tmp_path / "run", preset="minimal",
                  guard=SpikeGuard("skip")):
        for s in range(40):
            loss = model(input_ids=data[s], labels=data[s]).loss
            opt.zero_grad(set_to_none=True)
            with spiked(dict(model.named_parameters())[LAYER], s == 35):
                loss.backward()
            opt.step()
    sp = load_spikes(tmp_path / "run")
    g = sp[sp["kind"] == "guarded_step"]
    assert list(g["step"]) == [36] and list(g["reason"]) == ["skip"]
    v = instability_verdict(sp, load_run(tmp_path / "run"))
    assert v.answer == "yes" and v.numbers["guard_skipped_steps"] == 1
    assert v.numbers["guard_damped_steps"] == 0 and "guard skipped 1 step" in v.reason
    line = spike_markdown(SpikeEvent(36, "global", "guarded_step", 0.0, 20.0, reason="skip"))
    assert "guard action **skip**" in line


@pytest.mark.parametrize("name", ["scale", "adamw"])
def test_close_takes_the_gate_out(name):
    """A run whose last step was skipped: after close() the optimizer steps again."""
    model = build_llama("tiny", seed=0)
    opt = make_optimizer(name, model)
    data = markov_batches(model.config.vocab_size, 31, seed=1)
    lens = GradLens(model, opt, preset="minimal", tensorboard=False, guard=SpikeGuard("skip"))
    for s in range(31):
        loss = model(input_ids=data[s], labels=data[s]).loss
        opt.zero_grad(set_to_none=True)
        with spiked(dict(model.named_parameters())[LAYER], s == 30):
            loss.backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    lens.close()
    assert [e.step for e in lens.memory.events if e.kind == "guarded_step"] == [31]
    gates = [opt.gate] if name == "adamw" else [g["step_gate"] for g in opt.param_groups]
    assert gates and all(g is None for g in gates)
    opt.step()  # the same (spiked) gradient, now taken
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_refused_under_torch_distributed(monkeypatch):
    from gradlens.core import distributed as D

    monkeypatch.setattr(D, "world_size", lambda: 2)
    model = build_llama("tiny", seed=0)
    with pytest.raises(ValueError, match="single process"):
        GradLens(model, make_optimizer("scale", model), preset="minimal", tensorboard=False,
                 guard=SpikeGuard("skip"))


def test_guard_acts_on_the_raw_gradient_under_clipping():
    """``clip_grad_norm_(1.0)`` at every step caps the consumed norm; the guard reads the raw
    one: the spike's step is skipped (no parameter moves), the steps around it are taken."""
    model = build_llama("tiny", seed=0)
    opt = make_optimizer("adamw", model)
    data = markov_batches(model.config.vocab_size, 32, seed=1)
    lens = GradLens(model, opt, preset="minimal", tensorboard=False, guard=SpikeGuard("skip"))
    moved = []
    for s in range(32):
        loss = model(input_ids=data[s], labels=data[s]).loss
        opt.zero_grad(set_to_none=True)
        with spiked(dict(model.named_parameters())[LAYER], s == 30):
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        moved.append(not all(torch.equal(a, p) for a, p in
                             zip(before, model.parameters(), strict=True)))
    lens.close()
    assert [e.step for e in lens.memory.events if e.kind == "guarded_step"] == [31]
    assert moved == [True] * 30 + [False, True]
    clipped = [v for s, layer, _, stat, v in lens.memory.rows
               if s == 31 and layer == "global" and stat == "grad_norm"]
    assert clipped[0] <= 1.0 + 1e-5  # what the optimizer would have taken: clipped
