"""muon_adamw: torch.optim.Muon + AdamW as one optimizer (ChainedOptimizer)."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from gradlens.data import build_llama
from gradlens.optim import ChainedOptimizer, muon_adamw, optimizer_state_numel
from tests.optim._helpers import backward_random_batch

pytestmark = pytest.mark.skipif(not hasattr(torch.optim, "Muon"),
                                reason="this torch has no torch.optim.Muon")

LR, ADAMW_LR, WD = 2e-2, 3e-3, 0.1


def separate_optimizers(model: nn.Module) -> list[torch.optim.Optimizer]:
    """Muon on the 2-D matrices inside the decoder layers, AdamW on the rest, by name."""
    hidden = [p for n, p in model.named_parameters() if p.ndim == 2 and ".layers." in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim == 2 and ".layers." in n)]
    return [
        torch.optim.Muon(hidden, lr=LR, weight_decay=WD, momentum=0.95, nesterov=True,
                         ns_steps=5, adjust_lr_fn="match_rms_adamw"),
        torch.optim.AdamW(rest, lr=ADAMW_LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=WD,
                          foreach=True),
    ]


def test_steps_equal_muon_and_adamw_run_separately() -> None:
    chained_model, plain_model = build_llama("tiny", seed=0), build_llama("tiny", seed=0)
    chained = muon_adamw(chained_model, lr=LR, adamw_lr=ADAMW_LR, weight_decay=WD)
    assert isinstance(chained, torch.optim.Optimizer)
    assert [type(o).__name__ for o in chained.optimizers] == ["Muon", "AdamW"]
    plain = separate_optimizers(plain_model)
    for step in range(2):
        backward_random_batch(chained_model, step)
        backward_random_batch(plain_model, step)
        chained.step()
        for o in plain:
            o.step()
        for (name, a), b in zip(chained_model.named_parameters(), plain_model.parameters(),
                                strict=True):
            assert torch.equal(a, b), f"step {step}: {name}"
    assert optimizer_state_numel(chained) == sum(optimizer_state_numel(o) for o in plain)


def test_groups_are_the_union_with_roles() -> None:
    model = build_llama("tiny", seed=0)
    opt = muon_adamw(model, lr=LR, adamw_lr=ADAMW_LR)
    assert [g["role"] for g in opt.param_groups] == ["hidden", "embedding", "vector", "output"]
    assert [g["lr"] for g in opt.param_groups] == [LR] + [ADAMW_LR] * 3
    children = [g for o in opt.optimizers for g in o.param_groups]
    assert all(a is b for a, b in zip(opt.param_groups, children, strict=True))
    n = sum(len(g["params"]) for g in opt.param_groups)
    assert n == len(list(model.parameters()))


def test_lambda_lr_and_step_hooks_drive_every_child() -> None:
    model = build_llama("tiny", seed=0)
    opt = muon_adamw(model, lr=LR, adamw_lr=ADAMW_LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    pre, post = [], []
    opt.register_step_pre_hook(lambda o, args, kwargs: pre.append(o))
    opt.register_step_post_hook(lambda o, args, kwargs: post.append(o))
    for step in range(3):
        backward_random_batch(model, step)
        opt.step()
        sched.step()
    assert len(pre) == len(post) == 3 and pre[0] is opt
    muon, adamw = opt.optimizers
    assert muon.param_groups[0]["lr"] == pytest.approx(LR / 4)
    assert [g["lr"] for g in adamw.param_groups] == pytest.approx([ADAMW_LR / 4] * 3)
    assert sched.get_last_lr() == pytest.approx([LR / 4] + [ADAMW_LR / 4] * 3)


def test_state_dict_round_trip_is_bit_identical() -> None:
    def make(model: nn.Module) -> tuple[ChainedOptimizer, torch.optim.lr_scheduler.LambdaLR]:
        opt = muon_adamw(model, lr=LR, adamw_lr=ADAMW_LR, weight_decay=WD)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.8**s)

    model = build_llama("tiny", seed=0)
    opt, sched = make(model)
    for step in range(2):
        backward_random_batch(model, step)
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict()}, buf)
    for step in range(2, 4):
        backward_random_batch(model, step)
        opt.step()
        sched.step()
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = build_llama("tiny", seed=1)
    resumed.load_state_dict(saved["model"])
    opt2, sched2 = make(resumed)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    # loading replaced the children's group dicts: the union must follow them
    children = [g for o in opt2.optimizers for g in o.param_groups]
    assert all(a is b for a, b in zip(opt2.param_groups, children, strict=True))
    for step in range(2, 4):
        backward_random_batch(resumed, step)
        opt2.step()
        sched2.step()
    for (name, a), b in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_zero_grad_closure_and_state_view() -> None:
    model = build_llama("tiny", seed=0)
    opt = muon_adamw(model)
    ids = torch.randint(0, 128, (1, 8))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert q in opt.state and set(opt.state[q]) == {"momentum_buffer"}
    assert len(opt.state) == len(list(model.parameters()))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_chained_optimizer_errors() -> None:
    a, b = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="at least one"):
        ChainedOptimizer([])
    with pytest.raises(ValueError, match="more than one"):
        ChainedOptimizer([torch.optim.SGD([a, b]), torch.optim.SGD([a])])
    opt = ChainedOptimizer([torch.optim.SGD([a]), torch.optim.AdamW([b])])
    with pytest.raises(RuntimeError, match="add_param_group"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})
    with pytest.raises(ValueError, match="2 entries"):
        opt.load_state_dict({"optimizers": [opt.optimizers[0].state_dict()]})
    c = nn.Parameter(torch.zeros(3))
    opt.optimizers[1].add_param_group({"params": [c]})
    opt.refresh_param_groups()
    assert len(opt.param_groups) == 3 and opt.param_groups[2]["params"][0] is c


def test_model_without_hidden_matrices_is_refused() -> None:
    with pytest.raises(ValueError, match="no 2-D hidden matrix"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # discover_layers: no output layer
        muon_adamw(nn.Embedding(10, 4))
