"""accelerate with gradient accumulation 2 and ``accelerator.clip_grad_norm_``, run through
``examples/accelerate_loop.py``: one lens step per real optimizer step, and each step's raw and
consumed norms and variance estimators against a float64 reference from that step's weights."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from gradlens.data import build_llama
from tests.conformance._harness import compare, value
from tests.conformance._reference import Case, causal_shares, hf_loss, reference

pytest.importorskip("accelerate")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "accelerate_loop.py"
STEPS, ACCUM, CLIP = 3, 2, 1.0


def _example():
    spec = importlib.util.spec_from_file_location("example_accelerate_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("preset", ["minimal", "standard", "full"])
def test_accelerate_accumulation_and_clipping(preset):
    """Every logged step equals the float64 reference: ``grad_norm`` (clipped by accelerate,
    total over the model as ``clip_grad_norm_``), ``grad_norm_preclip`` and the variance
    estimators of the raw gradient (rel 1e-5 as in the rest of the matrix: a float64 run, rows
    written as float32, per-unit ratios of differences). ``minimal`` writes no estimators."""
    shadows: list[tuple[torch.nn.Module, list[dict]]] = []

    def probe(model, window):
        shadow = build_llama("tiny", seed=0).double()
        shadow.load_state_dict(model.state_dict())
        shadows.append((shadow, [dict(b) for b in window]))

    lens = _example().train(steps=STEPS, accum=ACCUM, preset=preset, clip=CLIP,
                            dtype=torch.float64, probe=probe)
    assert lens.step_count == STEPS == len(shadows)  # real optimizer steps, not micro-steps
    df, events = lens.memory.frame(), list(lens.memory.events)
    assert sorted(df.step.unique()) == list(range(1, STEPS + 1))
    assert not [e for e in events if e.kind == "validity"], [e.reason for e in events]
    layers = [(i.name, i.layout) for i in lens.layers]
    stats = {"minimal": ("grad_norm",),
             "standard": ("grad_norm", "grad_norm_preclip", "twobatch_trace",
                          "twobatch_signal", "unit_nsr_median"),
             "full": ("grad_norm", "grad_norm_preclip", "twobatch_trace", "twobatch_signal",
                      "unit_nsr_median", "pe_trace", "pe_signal")}[preset]
    clipped = 0
    for step, (shadow, window) in enumerate(shadows, start=1):
        case = Case(build=lambda: None, batches=window, loss=hf_loss, shares=causal_shares,
                    size=lambda b: int(b["input_ids"].shape[0]))
        ref = reference(case, layers, clip=CLIP, shadow=shadow)
        rows = df[df.step == step]
        compare(rows, events, lens, ref, tol=1e-5, floor=1.0, stats=stats,
                label=f"accelerate {preset} step {step}")
        raw = math.sqrt(sum(r["grad_norm_preclip"] ** 2 for r in ref.values()))
        consumed = raw * min(1.0, CLIP / (raw + 1e-6))
        clipped += raw > CLIP
        assert value(rows, "global", "grad_norm") == pytest.approx(consumed, rel=1e-6)
        if "grad_norm_preclip" in stats:
            assert value(rows, "global", "grad_norm_preclip") == pytest.approx(raw, rel=1e-6)
        with torch.no_grad():
            want_loss = sum(float(hf_loss(shadow, b)) for b in window) / ACCUM
        assert value(rows, "global", "loss") == pytest.approx(want_loss, rel=1e-6)
        if preset != "minimal":
            assert value(rows, "global", "microbatches") == ACCUM
            assert value(rows, "global", "batch_size") == 8
    assert clipped >= 1, "the case must exercise clipping"
