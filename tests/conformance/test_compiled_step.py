"""A compiled training step (two micro-batches' forward and backward, ``clip_grad_norm_`` and
``optimizer.step()`` inside one ``torch.compile``d function, ``backend="eager"``): every step
against a float64 reference from that step's weights, in every preset, with no recompile."""

from __future__ import annotations

import math

import pytest
import torch

from gradlens import GradLens
from gradlens.data import build_llama
from tests.conformance._harness import compare, value
from tests.conformance._reference import Case, causal_shares, hf_loss, reference

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402

VOCAB, STEPS, CLIP = 128, 4, 1.0
STATS = {"minimal": ("grad_norm",),
         "standard": ("grad_norm", "grad_norm_preclip", "twobatch_trace", "twobatch_signal",
                      "unit_nsr_median"),
         "full": ("grad_norm", "grad_norm_preclip", "twobatch_trace", "twobatch_signal",
                  "unit_nsr_median", "pe_trace", "pe_signal")}


def _micro(step: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(500 + step)
    ids = (torch.randint(0, VOCAB, (8, 1), generator=g) + torch.arange(10)) % VOCAB
    return [{"input_ids": ids[:4], "labels": ids[:4]}, {"input_ids": ids[4:], "labels": ids[4:]}]


@pytest.mark.parametrize("preset", ["minimal", "standard", "full"])
def test_compiled_step_equals_float64_reference(preset):
    """rel 1e-5 with the matrix's floor (a float64 run, rows written as float32). The batch
    size comes from ``batch_size=``: the forward hooks stand aside while dynamo traces them."""
    dynamo.reset()
    counters.clear()
    model = build_llama("tiny", seed=3).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    lens = GradLens(model, opt, preset=preset, noise_ema=0.0, batch_size=4)

    @torch.compile(backend="eager")
    def train_step(batches):
        for batch in batches:
            loss = model(**batch).loss / len(batches)
            loss.backward()
            lens.observe_loss(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()

    shadows = []
    for step in range(STEPS):
        shadow = build_llama("tiny", seed=3).double()
        shadow.load_state_dict(model.state_dict())
        shadows.append(shadow)
        train_step(_micro(step))
        if step == 0:
            first = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] - first <= 2
    lens.close()
    assert lens.step_count == STEPS
    df, events = lens.memory.frame(), list(lens.memory.events)
    assert not [e for e in events if e.kind == "validity"], [e.reason for e in events]
    layers = [(i.name, i.layout) for i in lens.layers]
    clipped = 0
    for step, shadow in enumerate(shadows, start=1):
        case = Case(build=lambda: None, batches=_micro(step - 1), loss=hf_loss,
                    shares=causal_shares, size=lambda b: int(b["input_ids"].shape[0]))
        ref = reference(case, layers, clip=CLIP, shadow=shadow)
        rows = df[df.step == step]
        compare(rows, events, lens, ref, tol=1e-5, floor=1.0, stats=STATS[preset],
                label=f"compiled step {preset} {step}")
        raw = math.sqrt(sum(r["grad_norm_preclip"] ** 2 for r in ref.values()))
        clipped += raw > CLIP
        assert value(rows, "global", "grad_norm") == pytest.approx(
            raw * min(1.0, CLIP / (raw + 1e-6)), rel=1e-6)
        with torch.no_grad():
            want = sum(float(hf_loss(shadow, b)) for b in _micro(step - 1)) / 2
        assert value(rows, "global", "loss") == pytest.approx(want, rel=1e-6)
    assert clipped >= 1, "the case must exercise clipping"
