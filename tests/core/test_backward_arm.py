"""The once-per-backward route (core.backward_arm): no hook per tensor on unlogged steps once
the route is verified, per-parameter hooks kept or restored wherever it cannot be trusted, and
the same rows as the per-parameter hooks in every case."""

from __future__ import annotations

import math

import pytest
import torch

from gradlens import GradLens
from gradlens.core.backward_arm import output_tensors
from gradlens.data import build_llama

VOCAB = 128


def _hooks(model: torch.nn.Module) -> tuple[int, int, int]:
    """(tensor hooks, post-accumulate hooks, module forward hooks) on the model."""
    params = list(model.parameters())
    modules = list(model.modules())
    return (sum(len(p._backward_hooks or {}) for p in params),
            sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in params),
            sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in modules))


def _run(preset: str, log_every: int, steps: int, static: bool = False, direct_at=()):
    """Two micro-batches per step; ``direct_at``: steps whose second micro-batch calls the
    model's parts, not the model (a backward that does not pass through its output)."""
    torch.manual_seed(0)
    model = build_llama("tiny", seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    lens = GradLens(model, opt, preset=preset, log_every=log_every)
    if static:
        lens.observer.drop_route()
    g = torch.Generator().manual_seed(1)
    hooks, modes = [], []
    for step in range(1, steps + 1):
        ids = torch.randint(0, VOCAB, (4, 8), generator=g)
        hooks.append(_hooks(model))
        modes.append(lens.observer.fast)
        for k, micro in enumerate(ids.chunk(2)):
            if k == 1 and step in direct_at:
                hidden = model.model(input_ids=micro).last_hidden_state
                logits = model.lm_head(hidden)
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, VOCAB), micro[:, 1:].reshape(-1)) / 2
            else:
                loss = model(input_ids=micro, labels=micro).loss / 2
            loss.backward()
            lens.observe_loss(loss)
        opt.step()
        opt.zero_grad()
    lens.close()
    rows = {(s, layer, stat): v for s, layer, _r, stat, v in lens.memory.rows}
    return rows, hooks, modes, model


def _same(a: dict, b: dict) -> None:
    """The same rows; values equal within float32 rounding of identical operations (the two
    runs differ only in which hooks call the same kernels)."""
    assert a.keys() == b.keys()
    for key, x in a.items():
        y = b[key]
        assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-6, abs=0), key


@pytest.mark.parametrize("preset,log_every", [("minimal", 1), ("standard", 3), ("full", 2)])
def test_unlogged_steps_run_no_hook_per_tensor_and_rows_are_unchanged(preset, log_every):
    rows, hooks, modes, model = _run(preset, log_every, steps=6)
    ref, ref_hooks, ref_modes, _ = _run(preset, log_every, steps=6, static=True)
    _same(rows, ref)
    assert modes == [False] + [True] * 5 and not any(ref_modes)
    n = sum(1 for _ in model.parameters())
    assert ref_hooks[0][1] == n  # per-parameter arms while the route is checked
    for step, (tensor, post, _modules) in enumerate(hooks[1:], start=2):
        assert post == 1  # the sentinel alone
        if step % log_every:  # unlogged: no per-tensor or per-module hook of the lens
            assert tensor == 0
            assert _modules == 2  # the model's pre-hook and the route's forward hook
    if preset != "minimal":
        assert rows[(log_every, "global", "microbatches")] == 2.0
        assert rows[(2 * log_every, "global", "microbatches")] == 2.0


def test_a_loop_that_bypasses_the_model_output_keeps_the_per_parameter_hooks():
    steps = 4
    rows, hooks, modes, model = _run("standard", 2, steps, direct_at=range(1, steps + 1))
    ref, *_ = _run("standard", 2, steps, static=True, direct_at=range(1, steps + 1))
    assert not any(modes)
    n = sum(1 for _ in model.parameters())
    assert all(h[1] == n for h in hooks)
    _same(rows, ref)
    assert rows[(2, "global", "microbatches")] == 2.0
    assert math.isfinite(rows[(2, "model.layers.0.mlp.up_proj.weight", "twobatch_trace")])


@pytest.mark.parametrize("at", [3, 4])  # an unlogged step, a logged one
def test_a_bypass_after_verification_is_caught_and_the_hooks_come_back(at):
    """A step's second backward bypasses the route: the sentinel arms the end of backward
    itself (the micro-batch is counted, the raw norms measured after it), and the
    per-parameter hooks are back from the next step on."""
    rows, hooks, modes, model = _run("standard", 2, 6, direct_at=(at,))
    ref, *_ = _run("standard", 2, 6, static=True, direct_at=(at,))
    assert modes == [False] + [True] * (at - 1) + [False] * (6 - at)
    n = sum(1 for _ in model.parameters())
    assert all(h[1] == n for h in hooks[at:])
    _same(rows, ref)
    assert rows[(4, "global", "microbatches")] == 2.0


def test_output_tensors_finds_the_differentiable_outputs_two_levels_deep():
    a = torch.ones(2, requires_grad=True) * 2
    b = torch.ones(2, requires_grad=True) * 3
    c = torch.ones(2)
    assert output_tensors({"loss": a, "hidden": (b, c), "deep": ((a,),)}) == [a, b]
    assert output_tensors([a] * 20, limit=3) == [a, a, a]
    assert output_tensors(c) == []


def test_two_batch_norms_reduced_in_small_batches_give_the_same_rows(monkeypatch):
    """The micro-batch gradients held by reference and reduced whenever 1 KB is held (many
    small batches) give the rows of the default budget (one batch per backward)."""
    rows, *_ = _run("standard", 1, 2)
    monkeypatch.setattr("gradlens.families.twobatch.BUFFER_BYTES", 1024)
    small, *_ = _run("standard", 1, 2)
    _same(rows, small)


def test_a_compiled_training_step_keeps_the_per_parameter_hooks():
    """Forward, backward and step in one compiled function: dynamo traces the model's hooks,
    so the route never fires and is dropped after the first step (the rows of such a step
    against the eager ones: tests/test_compile.py)."""
    torch._dynamo.reset()
    model = build_llama("tiny", seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    lens = GradLens(model, opt, preset="standard", log_every=2, batch_size=2)

    def train_step(ids):
        for micro in ids.chunk(2):
            (model(input_ids=micro, labels=micro).loss / 2).backward()
        opt.step()
        opt.zero_grad()

    step = torch.compile(train_step, backend="eager")
    for _ in range(3):
        step(torch.randint(0, VOCAB, (4, 8)))
    assert lens.observer.route is None and not lens.observer.fast
    n = sum(1 for _ in model.parameters())
    assert _hooks(model)[1] == n
    lens.close()
    torch._dynamo.reset()
