"""SCALE against an independent float64 numpy reference, and its torch.optim contract."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from gradlens.data import build_llama
from gradlens.optim import (
    SCALE,
    adamw_update,
    clamped_unit_rms,
    scale_param_groups,
    scale_update,
)
from tests.optim._helpers import backward_random_batch
from tests.optim._reference import RefParam, reference_step

LR, LR_1D, WD = 1e-2, 2e-2, 0.1
WARMUP, TOTAL = 2, 5


def cosine_with_warmup(step: int) -> float:
    """Linear warm-up over WARMUP steps, then cosine decay to 0.1 x peak at TOTAL."""
    if step < WARMUP:
        return (step + 1) / WARMUP
    progress = (step - WARMUP) / (TOTAL - WARMUP)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def llama64() -> nn.Module:
    return build_llama("tiny", seed=0).double()


def reference_params(model: nn.Module) -> dict[str, RefParam]:
    """The published recipe, written out by parameter name (not via gradlens.roles)."""
    ref = {}
    for name, p in model.named_parameters():
        w = p.detach().numpy().copy()
        if p.ndim == 1:
            ref[name] = RefParam(w, "adamw")
        elif "embed_tokens" in name:
            ref[name] = RefParam(w, "scale", axis=0)  # one scale per feature
        elif name.startswith("lm_head"):
            ref[name] = RefParam(w, "scale", axis=1, beta=0.9)
        else:
            ref[name] = RefParam(w, "scale", axis=1)
    return ref


@pytest.mark.parametrize("foreach", [False, True])
def test_matches_numpy_reference_on_llama(foreach: bool) -> None:
    model = llama64()
    groups = scale_param_groups(model, lr=LR, lr_1d=LR_1D, weight_decay=WD)
    assert sorted(g["role"] for g in groups) == ["embedding", "hidden", "output", "vector"]
    opt = SCALE(groups, foreach=foreach)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup)
    ref = reference_params(model)
    for step in range(TOTAL):
        backward_random_batch(model, seed=step)
        grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
        opt.step()
        sched.step()
        lam = cosine_with_warmup(step)
        reference_step(ref, grads, lr_t=LR * lam, lr_1d_t=LR_1D * lam, wd=WD)
        for name, p in model.named_parameters():
            np.testing.assert_allclose(
                p.detach().numpy(), ref[name].w, rtol=1e-12, atol=1e-14, err_msg=name
            )
    out_state = opt.state[model.lm_head.weight]
    np.testing.assert_allclose(out_state["momentum_buffer"].numpy(), ref["lm_head.weight"].m,
                               rtol=1e-12, atol=1e-16)
    assert not opt.state[model.model.embed_tokens.weight]  # stateless
    assert not opt.state[model.model.layers[0].mlp.up_proj.weight]


def _kernel_inputs(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (6, 5), (3, 7), (4, 2, 3), (5, 1)]
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


@pytest.mark.parametrize("norm_dim", [0, 1, None])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_scale_update_paths_agree_float64(norm_dim: int | None, momentum: float) -> None:
    results = []
    for foreach in (False, True):
        params = _kernel_inputs(0)
        bufs = [torch.zeros_like(p) for p in params] if momentum else None
        for step in range(3):
            grads = _kernel_inputs(10 + step)
            scale_update(params, grads, bufs, lr=0.1, weight_decay=0.05, momentum=momentum,
                         norm_dim=norm_dim, foreach=foreach)
        results.append(params + (bufs or []))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=1e-15)


def test_adamw_update_paths_agree_float64() -> None:
    results = []
    for foreach in (False, True):
        params = _kernel_inputs(1)
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        steps = [torch.tensor(0.0) for _ in params]
        for step in range(3):
            adamw_update(params, _kernel_inputs(20 + step), m, v, steps, lr=0.01,
                         weight_decay=0.1, beta1=0.9, beta2=0.999, eps=1e-8, foreach=foreach)
        results.append(params + m + v + steps)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=1e-15)


def test_clamped_unit_rms_is_rms_not_l2() -> None:
    g = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(clamped_unit_rms(g, 1), torch.tensor(
        [[math.sqrt(12.5)], [1e-8]], dtype=torch.float64))
    torch.testing.assert_close(clamped_unit_rms(g, 0), torch.tensor(
        [[math.sqrt(4.5), math.sqrt(8.0)]], dtype=torch.float64))


def test_state_dict_round_trip_is_bit_identical() -> None:
    def make(model: nn.Module) -> tuple[SCALE, torch.optim.lr_scheduler.LambdaLR]:
        opt = SCALE(scale_param_groups(model, lr=LR, lr_1d=LR_1D, weight_decay=WD))
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup)

    model = build_llama("tiny", seed=0)
    opt, sched = make(model)
    for step in range(3):
        backward_random_batch(model, step)
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict()}, buf)
    for step in range(3, 5):
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
    assert [SCALE.peak_lr(g) for g in opt2.param_groups] == [LR] * 4
    for step in range(3, 5):
        backward_random_batch(resumed, step)
        opt2.step()
        sched2.step()
    for (name, a), b in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        (dict(lr=-1e-3), "lr=-0.001"),
        (dict(lr_1d=-1.0), "lr_1d=-1.0"),
        (dict(momentum=1.0), "momentum=1.0"),
        (dict(momentum=-0.1), "momentum=-0.1"),
        (dict(betas=(1.0, 0.999)), "betas=(1.0, 0.999)"),
        (dict(betas=(0.9, -0.5)), "betas=(0.9, -0.5)"),
        (dict(eps=0.0), "eps=0.0"),
        (dict(weight_decay=-0.1), "weight_decay=-0.1"),
        (dict(algorithm="lion"), "algorithm='lion'"),
        (dict(norm_dim=2), "norm_dim=2"),
        (dict(foreach="yes"), "foreach='yes'"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs: dict, bad: str) -> None:
    w = nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=bad.replace("(", r"\(").replace(")", r"\)")):
        SCALE([w], **kwargs)
    opt = SCALE([w])
    n_groups = len(opt.param_groups)
    with pytest.raises(ValueError, match=bad.replace("(", r"\(").replace(")", r"\)")):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, 2))], **kwargs})
    assert len(opt.param_groups) == n_groups


def test_scale_algorithm_rejects_vectors() -> None:
    with pytest.raises(ValueError, match="needs matrices"):
        SCALE([nn.Parameter(torch.zeros(4))], algorithm="scale")


def test_grad_none_is_skipped_and_state_untouched() -> None:
    a, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4, 3))
    c, d = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    opt = SCALE([{"params": [a, b], "momentum": 0.9}, {"params": [c, d]}], lr=0.1)
    for p in (a, c):
        p.grad = torch.randn_like(p)
    before_b, before_d = b.detach().clone(), d.detach().clone()
    opt.step()
    assert torch.equal(b, before_b) and torch.equal(d, before_d)
    assert not opt.state[b] and not opt.state[d]
    assert opt.state[c]["step"].item() == 1.0
    for p in (b, d):
        p.grad = torch.randn_like(p)
    a.grad = c.grad = None
    buf_a, step_c = opt.state[a]["momentum_buffer"].clone(), opt.state[c]["step"].clone()
    opt.step()
    assert torch.equal(opt.state[a]["momentum_buffer"], buf_a)
    assert torch.equal(opt.state[c]["step"], step_c)
    assert opt.state[d]["step"].item() == 1.0


def test_sparse_gradients_are_rejected() -> None:
    emb = nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        SCALE(emb.parameters()).step()


def test_gpt2_conv1d_update_has_unit_rms_per_output_column() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="tied"):
        model = transformers.GPT2LMHeadModel(cfg).double()
        groups = scale_param_groups(model, lr=1.0)
    conv = model.transformer.h[0].mlp.c_fc  # Conv1D, weight (in=16, out=64)
    group = next(g for g in groups if any(p is conv.weight for p in g["params"]))
    assert group["norm_dim"] == 0
    opt = SCALE(groups)
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    before = conv.weight.detach().clone()
    opt.step()
    delta = before - conv.weight.detach()
    col_rms = delta.pow(2).mean(dim=0).sqrt()
    assert col_rms.shape == (64,)
    torch.testing.assert_close(col_rms, torch.ones(64, dtype=torch.float64))


def test_plain_parameter_list_default_rule() -> None:
    torch.manual_seed(0)
    lin, conv = nn.Linear(5, 4), nn.Conv2d(2, 3, kernel_size=2)
    params = [*lin.parameters(), *conv.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    opt = SCALE(params, lr=1.0)
    opt.step()
    d_lin = before[0] - lin.weight.detach()
    torch.testing.assert_close(d_lin.pow(2).mean(dim=1).sqrt(), torch.ones(4))
    d_conv = (before[2] - conv.weight.detach()).reshape(3, -1)
    torch.testing.assert_close(d_conv.pow(2).mean(dim=1).sqrt(), torch.ones(3))
    assert not opt.state[lin.weight] and not opt.state[conv.weight]  # no momentum
    assert set(opt.state[lin.bias]) == {"step", "exp_avg", "exp_avg_sq"}  # AdamW


def test_weight_decay_uses_the_scheduled_lr_of_each_rule() -> None:
    w = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    b = nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = SCALE([w, b], lr=0.1, lr_1d=0.4, weight_decay=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    w0, b0 = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)  # pure decay: the updates vanish
    opt.step()
    sched.step()
    torch.testing.assert_close(w.detach(), w0 * (1 - 0.05 * 0.5))
    torch.testing.assert_close(b.detach(), b0 * (1 - 0.2 * 0.5))


def test_non_proportional_schedule_keeps_1d_lr_shape() -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    b = nn.Parameter(torch.randn(3, dtype=torch.float64))
    lr, lr_1d = 0.1, 0.03
    opt = SCALE([w, b], lr=lr, lr_1d=lr_1d, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=0.3 * lr)
    ref = {"w": RefParam(w.detach().numpy().copy(), "scale", axis=1),
           "b": RefParam(b.detach().numpy().copy(), "adamw")}
    for _ in range(5):
        w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
        lr_t = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        reference_step(ref, {"w": w.grad.numpy(), "b": b.grad.numpy()},
                       lr_t=lr_t, lr_1d_t=lr_1d * lr_t / lr, wd=0.01)
        np.testing.assert_allclose(w.detach().numpy(), ref["w"].w, rtol=1e-12)
        np.testing.assert_allclose(b.detach().numpy(), ref["b"].w, rtol=1e-12)
    assert opt.param_groups[0]["lr"] != pytest.approx(lr)  # the schedule did move


def test_zero_peak_lr_applies_lr_1d_unscheduled() -> None:
    w, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2))
    opt = SCALE([w, b], lr=0.0, lr_1d=0.1)
    w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
    opt.step()
    assert torch.equal(w.detach(), torch.ones(2, 2))
    torch.testing.assert_close(b.detach(), torch.full((2,), 0.9))


def test_ablation_groups_run_plain_sgd_with_output_momentum() -> None:
    model = build_llama("tiny", seed=0).double()
    opt = SCALE(scale_param_groups(model, lr=0.1, normalize=False))
    w = model.model.layers[0].self_attn.q_proj.weight
    before = w.detach().clone()
    backward_random_batch(model, 0)
    g = w.grad.clone()
    opt.step()
    torch.testing.assert_close(w.detach(), before - 0.1 * g)
    assert "momentum_buffer" in opt.state[model.lm_head.weight]


def test_closure_is_called_and_loss_returned() -> None:
    w = nn.Parameter(torch.randn(2, 2))

    def closure() -> torch.Tensor:
        w.grad = None
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = SCALE([w]).step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0


def test_state_is_created_lazily() -> None:
    model = build_llama("tiny", seed=0)
    opt = SCALE(scale_param_groups(model))
    assert len(opt.state) == 0
    saved = copy.deepcopy(opt.state_dict())
    assert saved["state"] == {}


# ------------------------------------------------------------ schedulers and the 1-D lr


def _one_cycle(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    # cycle_momentum would also cycle SCALE's 1-D AdamW beta1 (group "betas"): off here
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=12, pct_start=0.25,
                                               cycle_momentum=False)


def _warmup_cosine(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=9, eta_min=0.01)
    return torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[3])


def _lambda_warmup(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / 4 if s < 4 else 0.5 + 0.5 * math.cos(math.pi * (s - 4) / 8))


@pytest.mark.parametrize(("make_sched", "peak"),
                         [(_one_cycle, 0.1), (_warmup_cosine, 0.05), (_lambda_warmup, 0.05)])
def test_1d_lr_has_the_main_lr_shape_under_schedulers(make_sched, peak: float) -> None:
    """lr_1d_t = lr_1d * lr_t / lr_max at every step (SCALE's code, arXiv 2506.16659), checked on the
    update itself against the float64 reference; it peaks at lr_1d and never exceeds it."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    b = nn.Parameter(torch.randn(3, dtype=torch.float64))
    lr_1d = 0.03
    opt = SCALE([w, b], lr=0.05, lr_1d=lr_1d)  # OneCycleLR's max_lr is 2x this lr
    sched = make_sched(opt)
    ref = {"w": RefParam(w.detach().numpy().copy(), "scale", axis=1),
           "b": RefParam(b.detach().numpy().copy(), "adamw")}
    lrs = []
    for _ in range(12):
        lr_t = opt.param_groups[0]["lr"]
        lrs.append(lr_t)
        w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
        opt.step()
        sched.step()
        reference_step(ref, {"w": w.grad.numpy(), "b": b.grad.numpy()},
                       lr_t=lr_t, lr_1d_t=lr_1d * lr_t / peak, wd=0.0)
        np.testing.assert_allclose(b.detach().numpy(), ref["b"].w, rtol=1e-12)
    lr_max = max(lrs)
    assert lr_max == pytest.approx(peak)  # every schedule here reaches its peak in 12 steps
    assert lrs[0] < peak / 2  # and starts well below it (warm-up)
    lr_1d_ts = [lr_1d * lr_t / SCALE.peak_lr(opt.param_groups[0]) for lr_t in lrs]
    assert max(lr_1d_ts) == pytest.approx(lr_1d) and max(lr_1d_ts) <= lr_1d * (1 + 1e-12)


def test_one_cycle_alone_would_have_tripled_the_1d_lr() -> None:
    """The bug this guards against: taking the lr at construction as the peak."""
    w = nn.Parameter(torch.randn(3, 4))
    opt = SCALE([w], lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.3, total_steps=10)
    group = opt.param_groups[0]
    assert group["lr_base"] == 0.1 and group["lr"] == pytest.approx(0.3 / 25)
    assert SCALE.peak_lr(group) == 0.3  # max_lr wins over lr_base and initial_lr
    del sched


def test_explicit_lr_peak_wins_over_the_scheduler() -> None:
    w = nn.Parameter(torch.randn(3, 4))
    opt = SCALE([{"params": [w], "lr_peak": 0.2}], lr=0.1)
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.3, total_steps=10)
    assert SCALE.peak_lr(opt.param_groups[0]) == 0.2
    plain = SCALE([w], lr=0.1)
    assert SCALE.peak_lr(plain.param_groups[0]) == 0.1  # no scheduler: the lr when added
