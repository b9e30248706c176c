"""The logged-step hooks (core.observer): once the route is verified they exist on logged
steps only, as plain functions (no compiler wrapper, no check of the step) that hand each
layer's two micro-batch gradients to the two-batch family in one call; wherever the route is
not trusted the checked versions are back. The rows are the per-parameter hooks' in every
case (tests/core/test_backward_arm.py), here also with checkpointing and a batch-size
disagreement."""

from __future__ import annotations

import gc
import math

import pytest
import torch
from torch import nn

from gradlens import GradLens
from gradlens.data import build_llama
from gradlens.families.twobatch import TwoBatch

VOCAB = 128


def _wrapped(fn) -> bool:
    return hasattr(fn, "_torchdynamo_disable")  # made by torch.compiler.disable


def _param_hooks(model: nn.Module) -> list:
    return [fn for p in model.parameters() for fn in (p._backward_hooks or {}).values()]


def _size_hooks(model: nn.Module) -> list:
    """The lens's batch-size pre-hooks (the model's own pre-hook excluded)."""
    return [fn for m in model.modules() if m is not model
            for fn in m._forward_pre_hooks.values()]


def _ids(step: int, batch: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, VOCAB, (batch, 8), generator=g)


@pytest.fixture
def on_grad_calls(monkeypatch) -> list[tuple[int, bool]]:
    """Every call of the two-batch subscriber: (layer, whether it carried the first)."""
    calls: list[tuple[int, bool]] = []
    original = TwoBatch._on_grad

    def counted(self, k, g, first):
        calls.append((k, first is not None))
        return original(self, k, g, first)

    monkeypatch.setattr(TwoBatch, "_on_grad", counted)
    return calls


def test_verified_logged_steps_use_plain_hooks_and_one_subscriber_call_per_layer(on_grad_calls):
    torch.manual_seed(0)
    model = build_llama("tiny", seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    lens = GradLens(model, opt, preset="standard", log_every=2)
    L = len(lens.layers)
    n_modules = len({id(lens.module_of(k)) for k in range(L)})
    seen = []  # per step: (fast, param hooks, wrapped, size hooks, wrapped, calls, firsts)
    for step in range(1, 7):
        hooks, sizes = _param_hooks(model), _size_hooks(model)
        fast = lens.observer.fast
        del on_grad_calls[:]
        for micro in _ids(step).chunk(2):
            (model(input_ids=micro, labels=micro).loss / 2).backward()
        if step % 2 == 0:
            assert all(v == [2, 2] for v in lens.observer.module_sizes.values())
            assert len(lens.observer.module_sizes) == n_modules
        seen.append((fast, len(hooks), sum(map(_wrapped, hooks)), len(sizes),
                     sum(map(_wrapped, sizes)), len(on_grad_calls),
                     sum(f for _, f in on_grad_calls)))
        opt.step()
        opt.zero_grad()
    rows = {(s, layer, stat): v for s, layer, _r, stat, v in lens.memory.rows}
    lens.close()
    # step 1: the route is checked, the checked hooks stay (unlogged: no subscriber call)
    assert seen[0] == (False, L, L, n_modules, 0, 0, 0)
    for step in (2, 4, 6):  # logged: plain hooks, one call per layer carrying both gradients
        assert seen[step - 1] == (True, L, 0, n_modules, 0, L, L)
    for step in (3, 5):  # unlogged: no hook per tensor or module
        assert seen[step - 1] == (True, 0, 0, 0, 0, 0, 0)
    for step in (2, 4, 6):
        assert rows[(step, "global", "microbatches")] == 2.0
        assert math.isfinite(rows[(step, "model.layers.0.mlp.up_proj.weight", "twobatch_trace")])


def test_a_bypass_at_a_logged_step_brings_the_checked_hooks_back(on_grad_calls):
    """The route missed a backward at logged step 4 (run with plain hooks): from step 5 the
    checked hooks are installed on every step and make no subscriber call on unlogged ones."""
    torch.manual_seed(0)
    model = build_llama("tiny", seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    lens = GradLens(model, opt, preset="standard", log_every=2)
    L = len(lens.layers)
    seen = []
    for step in range(1, 7):
        hooks = _param_hooks(model)
        del on_grad_calls[:]
        for j, micro in enumerate(_ids(step).chunk(2)):
            if step == 4 and j == 1:  # the model's parts, not the model: no route
                logits = model.lm_head(model.model(input_ids=micro).last_hidden_state)
                loss = nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, VOCAB), micro[:, 1:].reshape(-1)) / 2
            else:
                loss = model(input_ids=micro, labels=micro).loss / 2
            loss.backward()
        seen.append((len(hooks), sum(map(_wrapped, hooks)), len(on_grad_calls)))
        opt.step()
        opt.zero_grad()
    lens.close()
    assert seen[3] == (L, 0, L)  # plain hooks at the step the bypass happened
    assert seen[4] == (L, L, 0) and seen[5] == (L, L, L)  # checked ones after it


def test_a_step_count_set_after_verification_moves_the_logged_hooks():
    """Assigning ``step_count`` (a resumed run) re-decides whether the hooks exist: the plain
    hooks never run on an unlogged step, and a logged step has them."""
    torch.manual_seed(0)
    model = build_llama("tiny", seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    lens = GradLens(model, opt, preset="standard", log_every=3)
    L = len(lens.layers)

    def step(i: int) -> None:
        for micro in _ids(i).chunk(2):
            (model(input_ids=micro, labels=micro).loss / 2).backward()
        opt.step()
        opt.zero_grad()

    step(1)
    step(2)  # next: step 3, logged, the route verified
    assert lens.observer.fast and len(_param_hooks(model)) == L
    lens.step_count = 3  # next: step 4, unlogged
    assert len(_param_hooks(model)) == 0 and len(_size_hooks(model)) == 0
    step(4)
    lens.step_count = 5  # next: step 6, logged
    assert len(_param_hooks(model)) == L
    step(6)
    rows = {(s, layer, stat): v for s, layer, _r, stat, v in lens.memory.rows}
    lens.close()
    assert not any(s == 4 and stat == "microbatches" for s, _l, stat in rows)
    assert rows[(6, "global", "microbatches")] == 2.0
    assert math.isfinite(rows[(6, "model.layers.0.mlp.up_proj.weight", "twobatch_trace")])


def _rows_by_step(checkpoint: bool, preset: str) -> tuple[dict, list[bool], list, list]:
    model = build_llama("tiny", seed=3).double()
    if checkpoint:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    lens = GradLens(model, opt, preset=preset, noise_ema=0.0)
    modes, sizes = [], []
    for step in range(1, 4):
        modes.append(lens.observer.fast)
        for micro in _ids(step, 5).split([3, 2]):
            (model(input_ids=micro, labels=micro).loss / 2).backward()
        sizes.append(sorted(lens.observer.module_sizes.values()))
        opt.step()
        opt.zero_grad()
    rows = {(s, layer, stat): v for s, layer, _r, stat, v in lens.memory.rows}
    events = [e for e in lens.memory.events if e.kind == "validity"]
    n_modules = len({id(lens.module_of(k)) for k in range(len(lens.layers))})
    lens.close()
    assert sizes == [[[3, 2]] * n_modules] * 3  # each module counted once per micro-batch
    return rows, modes, events


@pytest.mark.parametrize("preset", ["standard", "full"])
def test_checkpointing_on_verified_logged_steps_counts_each_module_once(preset):
    """Non-reentrant checkpointing re-runs block forwards inside backward: the plain size hooks
    skip them (micro-batches of 3 and 2 examples), the rows equal the plain run's at every
    step, the verified ones included."""
    plain, modes, events = _rows_by_step(False, preset)
    ckpt, ckpt_modes, ckpt_events = _rows_by_step(True, preset)
    assert modes == ckpt_modes == [False, True, True]
    assert not events and not ckpt_events
    assert plain.keys() == ckpt.keys()
    for key, x in plain.items():
        y = ckpt[key]
        assert (math.isnan(x) and math.isnan(y)) or y == pytest.approx(x, rel=1e-9), key
    stats = ("twobatch_trace",) + (("pe_trace",) if preset == "full" else ())
    for stat in stats:
        assert math.isfinite(ckpt[(3, "model.layers.0.mlp.up_proj.weight", stat)])


class _Regroup(nn.Module):
    """``mid`` sees the batch's rows two by two: another batch size than ``a`` and ``b``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.mid, self.b = nn.Linear(4, 4), nn.Linear(8, 8), nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = self.mid(h.reshape(-1, 8)).reshape(-1, 4)
        return self.b(h)


def test_a_module_with_another_batch_size_is_noted_on_verified_steps():
    """The plain size hooks still read every module: the disagreement note comes on the
    verified steps too (it is written once, at the first)."""
    model = _Regroup()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    lens = GradLens(model, opt, preset="standard")
    g = torch.Generator().manual_seed(0)
    modes, seen = [], []
    for _ in range(3):
        modes.append(lens.observer.fast)
        for x in torch.randn(8, 4, generator=g).split([4, 4]):
            (model(x).square().mean() / 2).backward()
        sizes = {lens.module_of(k): lens.observer.module_sizes[id(lens.module_of(k))]
                 for k in range(len(lens.layers))}
        seen.append((sizes, lens.observer.sizes(2)))
        opt.step()
        opt.zero_grad()
    notes = [e.step for e in lens.memory.events
             if e.kind == "validity" and "different batch sizes" in e.reason]
    lens.close()
    assert modes == [False, True, True]
    for sizes, (best, note) in seen:
        assert sizes == {model.a: [4, 4], model.mid: [2, 2], model.b: [4, 4]}
        assert best == [4, 4] and "([4, 4] in most, [2, 2] in some)" in note
    assert notes == [1]


def _compiled_after_eager(static: bool) -> tuple[int, int, dict]:
    """Three eager steps (the route verified unless ``static``), then three steps of one
    compiled training step: (graphs dynamo made, recompile-limit warnings, rows)."""
    import logging

    from torch._dynamo.utils import counters

    hits = []

    class Limits(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            hits.append("recompile_limit" in record.getMessage())

    torch._dynamo.reset()
    counters.clear()
    handler = Limits()
    logging.getLogger("torch._dynamo").addHandler(handler)
    try:
        model = build_llama("tiny", seed=3)
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        lens = GradLens(model, opt, preset="standard", batch_size=2)
        if static:
            lens.observer.drop_route()

        def train_step(ids):
            for micro in ids.chunk(2):
                (model(input_ids=micro, labels=micro).loss / 2).backward()
            opt.step()
            opt.zero_grad()

        compiled = torch.compile(train_step, backend="eager")
        for step in range(1, 7):
            assert lens.observer.fast == (not static and 1 < step <= 4)
            (train_step if step <= 3 else compiled)(_ids(step))
        lens.close()
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
        graphs = counters["stats"]["unique_graphs"]
        torch._dynamo.reset()
        gc.collect()  # dynamo's cyclic state goes now, not in a later test's garbage check
    return graphs, sum(hits), {(s, la, st): v for s, la, _r, st, v in lens.memory.rows}


def test_plain_hooks_run_eagerly_in_a_step_compiled_after_verified_eager_steps():
    """The plain hooks are installed for step 4, which runs compiled: dynamo does not trace
    them (nor the two-batch family they call), so it makes the graphs of a run whose hooks
    were the checked ones all along and one more (the forward again at step 5, when the
    checked hooks replace the plain ones), with no recompile-limit warning, and the same
    rows."""
    graphs, limits, rows = _compiled_after_eager(static=False)
    ref_graphs, ref_limits, ref = _compiled_after_eager(static=True)
    assert limits == ref_limits == 0
    assert graphs == ref_graphs + 1
    assert rows.keys() == ref.keys()
    for key, x in rows.items():
        y = ref[key]
        assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-6), key
    assert math.isfinite(rows[(4, "model.layers.0.mlp.up_proj.weight", "twobatch_trace")])


def _accumulated_rows(static: bool, micro: int) -> tuple[dict, list[bool]]:
    torch.manual_seed(0)
    model = build_llama("tiny", seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    lens = GradLens(model, opt, preset="standard", noise_ema=0.0)
    if static:
        lens.observer.drop_route()
    modes = []
    for step in range(1, 5):
        modes.append(lens.observer.fast)
        for ids in _ids(step, 2 * micro).chunk(micro):
            (model(input_ids=ids, labels=ids).loss / micro).backward()
        opt.step()
        opt.zero_grad()
    rows = {(s, layer, stat): v for s, layer, _r, stat, v in lens.memory.rows}
    lens.close()
    return rows, modes


@pytest.mark.parametrize("micro", [1, 3])
def test_one_or_three_micro_batches_on_verified_steps_give_the_checked_hooks_rows(micro):
    """One micro-batch (the hook only counts) and three (the third handed alone): the rows of
    a run whose route was dropped from the start (checked hooks, same kernels)."""
    rows, modes = _accumulated_rows(False, micro)
    ref, ref_modes = _accumulated_rows(True, micro)
    assert modes == [False, True, True, True] and not any(ref_modes)
    assert rows.keys() == ref.keys()
    for key, x in rows.items():
        y = ref[key]
        assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-6), key
    assert rows[(4, "global", "microbatches")] == micro
    trace = rows.get((4, "model.layers.0.mlp.up_proj.weight", "twobatch_trace"))
    assert (trace is None) if micro == 1 else math.isfinite(trace)
