"""A flagged spike step stays out of the variance EMAs (two-batch, per-example, temporal).

The tiny LLaMA with a frozen optimizer (``lr=0``: every step sees the same parameters, so
two runs differ only where their data differs), 2 micro-batches per step, statistics at
every step. In the spiked run both micro-batch losses of step ``INJECT`` are multiplied by
50: the detector flags the global norm there. The reference run makes no backward pass at
that step (the lens sees no gradient: nothing enters any state). Every smoothed statistic
after the spike must equal the reference's: the spike step entered no EMA. Both runs do the
same float32 operations on the same values in the same order, so the tolerance is a few
float32 ulps (1e-6 relative).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradlens import GradLens
from gradlens.data import build_llama
from tests.stats.test_spikes import markov_batches

STEPS, INJECT = 40, 32
SMOOTHED = ("noise_scale", "temporal_var", "temporal_noise_scale", "critical_batch_size")


def run(mode: str):
    """``mode``: ``clean``, ``spike`` (x50 loss at INJECT) or ``skip`` (no backward there)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build_llama("tiny", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    data = markov_batches(model.config.vocab_size, STEPS, seed=1)
    with GradLens(model, opt, preset="full", histograms=False, spam=False,
                  tensorboard=False) as lens:
        for s in range(STEPS):
            opt.zero_grad(set_to_none=True)
            if not (mode == "skip" and s == INJECT - 1):
                for half in data[s].chunk(2):
                    loss = model(input_ids=half, labels=half).loss / 2
                    if mode == "spike" and s == INJECT - 1:
                        loss = loss * 50.0
                    lens.observe_loss(loss)
                    loss.backward()
            opt.step()
    frame = lens.memory.frame()
    return frame, lens.memory.events_frame()


@pytest.fixture(scope="module")
def runs():
    return {m: run(m) for m in ("spike", "skip")}


def table(frame, stat):
    return frame[frame.stat == stat].pivot(index="step", columns="layer", values="value")


def test_spike_is_flagged(runs):
    events = runs["spike"][1]
    hit = events[(events.kind == "grad_norm_global") & (events.step == INJECT)]
    assert len(hit) == 1


@pytest.mark.parametrize("stat", SMOOTHED)
def test_smoothed_statistics_unchanged_after_spike(runs, stat):
    spiked, ref = table(runs["spike"][0], stat), table(runs["skip"][0], stat)
    after_s = spiked.loc[spiked.index > INJECT]
    after_r = ref.loc[ref.index > INJECT, after_s.columns]
    assert len(after_s) == STEPS - INJECT
    a, b = after_s.to_numpy(np.float64), after_r.to_numpy(np.float64)
    assert np.isfinite(b).any(), f"{stat}: the reference has no value to compare"
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))  # no NaN run after the spike
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)


def test_noise_scale_from_written_rows(runs):
    """Independent check: the EMA ratio recomputed in float64 from the written per-step
    ``twobatch_trace``/``twobatch_signal`` with the flagged step left out."""
    frame = runs["spike"][0]
    tr, sig = table(frame, "twobatch_trace"), table(frame, "twobatch_signal")
    ns = table(frame, "noise_scale")
    beta = 0.9
    for layer in ns.columns:
        if layer == "global":
            continue
        num = den = num_abs = den_abs = 0.0
        for step in ns.index:
            t, s = tr.at[step, layer], sig.at[step, layer]
            if step != INJECT and math.isfinite(t) and math.isfinite(s):
                num, den = beta * num + (1 - beta) * t, beta * den + (1 - beta) * s
                num_abs = beta * num_abs + (1 - beta) * abs(t)
                den_abs = beta * den_abs + (1 - beta) * abs(s)
            want = num / den if den > 0 else math.nan
            got = ns.at[step, layer]
            if math.isnan(want):
                assert math.isnan(got), (layer, step)
            else:
                # the lens's float32 EMAs: each update rounds by eps relative to the magnitudes
                # it adds, and the errors decay by beta, so each EMA is off by at most about
                # 3 eps / (1 - beta) times its EMA of magnitudes; the ratio adds both
                # relative errors (terms of both signs make them large where num or den is small)
                eps = 2.0**-24
                rel = 3 * eps / (1 - beta) * (num_abs / abs(num) + den_abs / abs(den))
                assert got == pytest.approx(want, rel=max(rel, 1e-6)), (layer, step)
