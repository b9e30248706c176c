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

#: graph breaks the ``full`` preset adds to the tiny model's forward: one per module with
#: per-example hooks (each Linear / Embedding; the forward hook runs eagerly, outside dynamo)
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


def _train_step_run(preset: str, compiled: bool, steps: int = 20):
    """``steps`` of a training step (two micro-batches, clipping, AdamW) that is one
    ``torch.compile``d function or the same function eager; returns (rows, graphs compiled
    after the first step, recompile-limit warnings)."""
    import logging

    class Limits(logging.Handler):
        hits = 0

        def emit(self, record: logging.LogRecord) -> None:
            Limits.hits += "recompile_limit" in record.getMessage()

    dynamo.reset()
    counters.clear()
    handler = Limits()
    logging.getLogger("torch._dynamo").addHandler(handler)
    torch.manual_seed(0)
    model = build_llama("tiny", seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lens = GradLens(model, opt, preset=preset, batch_size=2)

    def train_step(ids):
        for micro in ids.chunk(2):
            loss = model(input_ids=micro, labels=micro).loss / 2
            loss.backward()
            lens.observe_loss(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    step_fn = torch.compile(train_step, backend="eager") if compiled else train_step
    g = torch.Generator().manual_seed(1)
    first = 0
    try:
        for step in range(steps):
            step_fn(torch.randint(0, 128, (4, 8), generator=g))
            if step == 0:
                first = counters["stats"]["unique_graphs"]
        lens.close()
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
    return lens.memory.frame(), counters["stats"]["unique_graphs"] - first, Limits.hits


@pytest.mark.parametrize("preset", ["minimal", "standard", "full"])
def test_compiled_train_step_no_recompiles_and_eager_numbers(preset: str) -> None:
    """Forward, backward, clipping and ``optimizer.step()`` in one compiled function: at most
    2 graphs after the first step over 20 steps and no recompile-limit warning (before: the
    lens's hooks were traced, and recompiled at every step until the limit), with the rows of
    the eager run. Step 1 runs the same float32 operations on the same weights: every row
    within rel 1e-6 (a few roundings). The compiled AdamW rounds its update differently (~1 ulp
    of the weights per step), so later steps start from slightly different weights: norms and
    the loss within rel 1e-4, traces and signals (differences of squared norms) within 1e-3 of
    the layer's ``||G||^2``."""
    df, graphs, limits = _train_step_run(preset, compiled=True)
    assert graphs <= 2
    assert limits == 0
    eager, _, _ = _train_step_run(preset, compiled=False)
    both = df.merge(eager, on=["step", "layer", "stat"], suffixes=("_c", "_e"))
    assert len(both) == len(df) == len(eager)
    assert set(both.step) == set(range(1, 21))
    c, e = both.value_c, both.value_e
    same_nan = c.isna() == e.isna()
    assert same_nan.all(), both[~same_nan].head()
    both, c, e = both[e.notna()], c[e.notna()], e[e.notna()]
    first = both.step == 1

    def close(tol: float):  # equal (infinities too) or within rel tol
        return (c == e) | ((c - e).abs() <= tol * e.abs())

    assert close(1e-6)[first].all(), both[first & ~close(1e-6)].head()
    norms = both.stat.isin(["grad_norm", "grad_norm_preclip", "loss"])
    assert close(1e-4)[norms].all()
    y = both.merge(eager[eager.stat == "grad_norm_preclip"], on=["step", "layer"],
                   how="left").value.to_numpy() ** 2
    var = both.stat.str.endswith(("_trace", "_signal")).to_numpy()
    assert var.any() == (preset != "minimal")
    assert ((c - e).abs().to_numpy() <= 1e-3 * y)[var].all()
