"""The lens under torch.compile: graph breaks, recompiles and layer names, from dynamo's own
counters. A tiny LLaMA on the CPU with ``backend="eager"`` (dynamo's graph capture and guards
without inductor's slow code generation: breaks and recompiles are decided by dynamo alone)."""

from __future__ import annotations

import pytest
import torch

from gradlens import GradLens
from gradlens.data import build_llama

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402

#: graph breaks the ``full`` preset adds to the tiny model's forward: its per-example hooks
#: register a hook on each tracked Linear / Embedding output, which dynamo cannot trace
FULL_BREAKS_TINY = 16


def _breaks(preset: str | None) -> int:
    dynamo.reset()
    model = build_llama("tiny")
    lens = GradLens(model, None, preset=preset) if preset else None
    ids = torch.randint(0, 128, (2, 8))
    explained = dynamo.explain(model)(input_ids=ids, labels=ids)
    if lens is not None:
        lens.close()
    return explained.graph_break_count


def _graphs_after_first_step(preset: str | None, log_every: int, steps: int = 20) -> int:
    """Graphs dynamo compiled after the first step of a compiled model with 2 micro-batches
    per step (every one a recompile)."""
    dynamo.reset()
    torch.manual_seed(0)
    model = build_llama("tiny")
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lens = GradLens(compiled, opt, preset=preset, log_every=log_every) if preset else None
    ids = torch.randint(0, 128, (4, 8))
    first = 0
    for step in range(steps):
        for micro in ids.chunk(2):
            loss = compiled(input_ids=micro, labels=micro).loss / 2
            loss.backward()
            if lens is not None:
                lens.observe_loss(loss)
        opt.step()
        opt.zero_grad()
        if step == 0:
            first = counters["stats"]["unique_graphs"]
    if lens is not None:
        assert lens.memory.rows, "the lens wrote nothing"
        lens.close()
    return counters["stats"]["unique_graphs"] - first


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    counters.clear()
    yield
    dynamo.reset()


def test_standard_adds_no_graph_break() -> None:
    bare = _breaks(None)
    assert _breaks("minimal") == bare
    assert _breaks("standard") == bare


def test_full_graph_breaks_as_documented() -> None:
    assert _breaks("full") - _breaks(None) == FULL_BREAKS_TINY


@pytest.mark.parametrize("preset,log_every", [("standard", 1), ("standard", 3),
                                              ("minimal", 2), ("full", 1)])
def test_no_recompiles_over_20_steps(preset: str, log_every: int) -> None:
    assert _graphs_after_first_step(None, 1) == 0
    assert _graphs_after_first_step(preset, log_every) <= 2
    if preset != "full":
        assert _graphs_after_first_step(preset, log_every) == 0


def test_layer_names_and_sizes_of_the_uncompiled_model() -> None:
    model = build_llama("tiny")
    compiled = torch.compile(model, backend="eager")
    plain = [i.name for i in GradLens(model, None).layers]
    lens = GradLens(compiled, None, preset="standard")
    assert [i.name for i in lens.layers] == plain
    assert not any("_orig_mod" in n for n in plain)
    ids = torch.randint(0, 128, (6, 8))
    for micro in (ids[:4], ids[4:]):  # uneven micro-batches: sizes from the wrapper's hook
        (compiled(input_ids=micro, labels=micro).loss / 2).backward()
    lens.step()
    lens.close()
    rows = {(layer, stat): value for _s, layer, _r, stat, value in lens.memory.rows}
    assert rows[("global", "batch_size")] == 6
    assert rows[("global", "microbatches")] == 2
