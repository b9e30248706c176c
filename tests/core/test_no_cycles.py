"""The lens makes no reference cycles that hold tensors: what a step leaves behind is freed by
reference counting at once, not at the garbage collector's next full pass. A cycle that holds
a model's output keeps the logits alive (hundreds of MB per step at a 32k vocabulary, and on a
GPU, memory the caching allocator cannot reuse) until Python's collector happens to run."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from gradlens import GradLens
from gradlens.data import build_llama


@pytest.fixture
def saved_garbage():
    """gc's DEBUG_SAVEALL for the test: what a collection finds unreachable lands in
    ``gc.garbage`` instead of being freed. Collected to a fixed point first: a collection's
    finalizers and weakref callbacks can free more cycles (an earlier test's tracing state),
    which only the next collection finds."""
    for _ in range(10):
        if not gc.collect():
            break
    flags = gc.get_debug()
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.garbage.clear()
    try:
        yield gc.garbage
    finally:
        gc.set_debug(flags)
        gc.garbage.clear()
        gc.collect()


def _model_and_step():
    torch.manual_seed(0)
    model = build_llama("small", hidden_size=32, vocab_size=256, num_hidden_layers=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (4, 8))
    logits: list[weakref.ref] = []

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for half in x.chunk(2):  # two micro-batches: the micro-batch hooks run too
            out = model(input_ids=half, labels=half)
            logits.append(weakref.ref(out.logits))
            (out.loss / 2).backward()
        opt.step()

    return model, opt, step, logits


@pytest.mark.parametrize("preset", ["minimal", "standard", "full"])
@pytest.mark.parametrize("log_every", [1, 3])
def test_steps_leave_no_cyclic_garbage(preset, log_every, saved_garbage, tmp_path) -> None:
    model, opt, step, logits = _model_and_step()
    lens = GradLens(model, opt, preset=preset, log_every=log_every, logdir=tmp_path)
    for _ in range(2):  # first steps: plans, constants and warnings made once
        step()
    gc.collect()
    saved_garbage.clear()
    logits.clear()
    for _ in range(4):  # logged and (log_every=3) unlogged steps
        step()
    # reference counting alone freed every step's logits: no collection has run for them
    assert [r for r in logits if r() is not None] == []
    gc.collect()
    tensors = [tuple(o.shape) for o in saved_garbage if isinstance(o, torch.Tensor)]
    kinds = sorted({type(o).__name__ for o in saved_garbage})
    assert tensors == [], f"tensors in reference cycles: {tensors[:8]} among {kinds}"
    lens.close()
