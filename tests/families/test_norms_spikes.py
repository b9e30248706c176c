"""Norms and spike detectors under bad steps: an all-NaN layer has NaN norms (not 0), and a
non-finite step never enters a detector, so a later real spike still scores high."""

from __future__ import annotations

import math

import pytest
import torch

from gradlens import GradLens


def _run(nan_at: int | None, spike_at: int, steps: int = 45):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    lens = GradLens(model, preset="minimal")
    g = torch.Generator().manual_seed(1)
    now = [0]  # a spike of the raw gradient, made in the backward (the detectors read it)
    model[2].weight.register_hook(lambda grad: grad * 100.0 if now[0] == spike_at else None)
    for step in range(1, steps + 1):
        now[0] = step
        x = torch.randn(16, 8, generator=g)
        model(x).pow(2).mean().backward()
        if step == nan_at:
            for p in model.parameters():
                p.grad.fill_(math.nan)  # a NaN loss: every gradient entry NaN
        lens.step()
        model.zero_grad()
    lens.flush()
    df = lens.memory.frame()
    events = list(lens.memory.events)
    lens.close()
    return df, events


def _value(df, step, layer, stat):
    sel = df[(df.step == step) & (df.layer == layer) & (df.stat == stat)]
    return float(sel.value.iloc[0])


def test_all_nan_layer_has_nan_norms_and_counts():
    df, events = _run(nan_at=5, spike_at=1000, steps=6)
    assert math.isnan(_value(df, 5, "2.weight", "grad_norm"))
    assert math.isnan(_value(df, 5, "global", "grad_norm"))
    assert _value(df, 5, "2.weight", "nonfinite_count") == 32
    assert _value(df, 4, "2.weight", "grad_norm") > 0
    assert {(e.step, e.kind) for e in events if e.kind == "nonfinite"} >= {(5, "nonfinite")}


def test_nan_step_in_warmup_leaves_the_detector_sharp():
    clean, clean_events = _run(nan_at=None, spike_at=40)
    dirty, dirty_events = _run(nan_at=5, spike_at=40)
    z_clean = _value(clean, 40, "2.weight", "grad_norm_z")
    z_dirty = _value(dirty, 40, "2.weight", "grad_norm_z")
    assert z_clean > 9 and z_dirty == pytest.approx(z_clean, rel=0.25)
    assert math.isnan(_value(dirty, 5, "2.weight", "grad_norm_z"))  # never scored
    for events in (clean_events, dirty_events):
        assert (40, "2.weight") in {(e.step, e.layer) for e in events if e.kind == "grad_norm"}


def test_a_nan_micro_batch_makes_two_batch_nan_on_that_layer_only():
    """One micro-batch of one layer carries a NaN entry (inserted in its backward, before
    accumulation): that layer's two-batch trace, signal and per-element variance are NaN at
    that step (not a sum over the
    finite entries, which the masked norms of the step gradient would turn into a confident
    number), the other layers' equal those of the same step without the NaN, and the
    noise-scale EMA goes on afterwards."""
    def run(poison: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(),
                                    torch.nn.Linear(8, 4))
        armed = [False]

        def nan_entry(grad):  # registered before the lens: its hooks see what this returns
            if not armed[0]:
                return grad
            grad = grad.clone()
            grad[0, 0] = math.nan
            return grad

        model[2].weight.register_hook(nan_entry)
        lens = GradLens(model, preset="standard")
        g = torch.Generator().manual_seed(1)
        for step in range(1, 5):
            for micro in range(2):
                x = torch.randn(8, 8, generator=g)
                armed[0] = poison and step == 3 and micro == 1
                (model(x).pow(2).mean() / 2).backward()
            armed[0] = False
            lens.step()
            model.zero_grad()
        lens.flush()
        df = lens.memory.frame()
        lens.close()
        return df

    clean, dirty = run(False), run(True)
    for stat in ("twobatch_trace", "twobatch_signal", "var_per_element", "unit_nsr_mean"):
        if stat != "unit_nsr_mean":
            assert math.isnan(_value(dirty, 3, "2.weight", stat)), stat
        assert _value(dirty, 3, "0.weight", stat) == pytest.approx(
            _value(clean, 3, "0.weight", stat), rel=1e-6)
    # per unit, only the unit holding the NaN drops out: the others' mean stays a number
    assert math.isfinite(_value(dirty, 3, "2.weight", "unit_nsr_mean"))
    assert math.isfinite(_value(dirty, 4, "2.weight", "noise_scale"))


def test_temporal_skips_a_nonfinite_layer_step_as_its_kernel_does():
    """The temporal family takes finiteness from the step summary; the kernel, run on the
    same gradients with its own check, must give the same variance (a NaN entry in one
    layer at step 3, an overflowing square in another at step 5)."""
    from gradlens import stats as S

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    lens = GradLens(model, preset="full")
    ref = {name: S.temporal_init(p) for name, p in model.named_parameters() if p.ndim == 2}
    g = torch.Generator().manual_seed(2)
    for step in range(1, 9):
        model(torch.randn(8, 6, generator=g)).pow(2).mean().backward()
        if step == 3:
            model[0].weight.grad[1, 2] = math.nan
        if step == 5:
            model[2].weight.grad[0, 0] = 1e30  # finite, but its square is not
        for name, p in model.named_parameters():
            if name in ref:
                S.temporal_update_(ref[name], p.grad, "linear", lens.config.temporal_beta)
        lens.step()
        model.zero_grad()
    lens.flush()
    df = lens.memory.frame()
    lens.close()
    for name, st in ref.items():
        var, _, var_n = S.temporal_readout(st)
        assert _value(df, 8, name, "temporal_var") == pytest.approx(float(var), rel=1e-6)
        assert _value(df, 8, name, "temporal_var_normalized") == pytest.approx(
            float(var_n) / st["mean"].numel(), rel=1e-6)
        assert float(st["n"]) == 7  # one step skipped in each layer
