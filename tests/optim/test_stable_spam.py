"""Stable-SPAM against an independent float64 numpy reference, and its torch.optim contract."""

from __future__ import annotations

import io
import itertools
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn

from gradlens.data import build_llama
from gradlens.optim import StableSPAM, stable_spam_update
from gradlens.optim.stable_spam_functional import decay_factor, warmup_factor
from tests.optim._helpers import backward_random_batch

LR, WD, EPS = 1e-2, 0.1, 1e-8
B1, B2, G1, G2, G3 = 0.9, 0.999, 0.7, 0.9, 0.999
INTERVAL, WARMUP = 4, 3


# ---------------------------------------------------------------- numpy reference

@dataclass
class RefTensor:
    """One tensor of the reference, written from the formulas of arXiv 2502.17055."""

    w: np.ndarray
    m: np.ndarray = field(init=False)
    v: np.ndarray = field(init=False)
    big_m: float = 0.0
    a: float = 0.0
    b: float = 0.0
    t: int = 0
    clipped: int = 0  # entries AdaClip touched so far (the test checks it fired)

    def __post_init__(self) -> None:
        self.m = np.zeros_like(self.w)
        self.v = np.zeros_like(self.w)


def ref_warmup(t: int, interval: int, warmup: int) -> float:
    """Cosine warm-up from 0.01 over ``warmup`` steps after each reset (none before the first)."""
    k = t % interval
    if t < interval or k >= warmup:
        return 1.0
    return 0.01 + 0.99 * (1.0 - math.cos(math.pi * k / warmup)) / 2.0


def ref_step(p: RefTensor, g: np.ndarray, lr: float, wd: float,
             interval: int = INTERVAL, warmup: int = WARMUP, decay: float = 1.0) -> None:
    """One step; ``decay`` multiplies gamma1 and beta1 (the authors' cosine factor at t)."""
    p.t += 1
    t = p.t
    g1, b1 = G1 * decay, B1 * decay
    # AdaClip
    gmax = np.abs(g).max()
    p.big_m = G3 * p.big_m + (1 - G3) * gmax
    m_hat = p.big_m / (1 - G3**t)
    mask = np.abs(g) > m_hat
    p.clipped += int(mask.sum())
    g = np.where(mask, g * m_hat / gmax, g)
    # AdaGN
    norm = np.sqrt((g**2).sum())
    p.a = g1 * p.a + (1 - g1) * norm
    p.b = G2 * p.b + (1 - G2) * norm**2
    a_hat, b_hat = p.a / (1 - g1**t), p.b / (1 - G2**t)
    if norm > 0:
        g = g / norm * a_hat / (np.sqrt(b_hat) + EPS)
    # momentum reset every `interval` steps, then AdamW with a warm-up factor
    if t % interval == 0:
        p.m[...] = 0.0
        p.v[...] = 0.0
    p.m = b1 * p.m + (1 - b1) * g
    p.v = B2 * p.v + (1 - B2) * g * g
    m_hat_adam = p.m / (1 - b1**t)
    v_hat = p.v / (1 - B2**t)
    p.w = p.w * (1 - lr * wd) - lr * ref_warmup(t, interval, warmup) * m_hat_adam / (
        np.sqrt(v_hat) + EPS
    )


# ---------------------------------------------------------------- tests

def _tensors(seed: int, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


SHAPES = [(6, 5), (6, 5), (3, 7), (4,), (2, 3, 2)]


def _grads(step: int) -> list[torch.Tensor]:
    grads = _tensors(100 + step, SHAPES)
    if step in (2, 6):  # spikes: one huge entry per tensor
        for g in grads:
            g.view(-1)[0] = 50.0 * (1 + step)
    if step == 5:
        grads[1].mul_(1e3)  # a whole-tensor norm spike, for AdaGN
    return grads


@pytest.mark.parametrize("foreach", [False, True])
def test_matches_numpy_reference_through_resets(foreach: bool) -> None:
    params = [nn.Parameter(t) for t in _tensors(0, SHAPES)]
    ref = [RefTensor(p.detach().numpy().copy()) for p in params]
    opt = StableSPAM(params, lr=LR, weight_decay=WD, update_interval=INTERVAL,
                     warmup_steps=WARMUP, foreach=foreach)
    for step in range(10):  # resets at t = 4 and 8, warm-up at t = 4..6 and 8..10
        grads = _grads(step)
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        for p, r, g in zip(params, ref, grads, strict=True):
            assert torch.equal(p.grad, g)  # the gradient is read, never written
            ref_step(r, g.numpy(), LR, WD)
            np.testing.assert_allclose(p.detach().numpy(), r.w, rtol=1e-12, atol=1e-14)
    for p, r in zip(params, ref, strict=True):
        state = opt.state[p]
        assert state["step"].item() == 10
        np.testing.assert_allclose(state["exp_avg"].numpy(), r.m, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(state["exp_avg_sq"].numpy(), r.v, rtol=1e-12, atol=1e-18)
        for key, value in (("max_ema", r.big_m), ("norm_ema", r.a), ("norm_sq_ema", r.b)):
            np.testing.assert_allclose(state[key].item(), value, rtol=1e-12)
    assert all(r.clipped > 0 for r in ref)  # AdaClip did fire on every tensor


def test_kernel_paths_agree_float64() -> None:
    results = []
    for foreach in (False, True):
        params = _tensors(1, SHAPES)
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        scalars = [[torch.zeros((), dtype=torch.float64) for _ in params] for _ in range(3)]
        steps = [torch.tensor(0.0) for _ in params]
        for step in range(6):
            stable_spam_update(
                params, _grads(step), m, v, *scalars, steps, lr=LR, beta1=B1, beta2=B2,
                eps=EPS, weight_decay=WD, gamma1=G1, gamma2=G2, gamma3=G3, update_interval=3,
                warmup_steps=2, foreach=foreach,
            )
        results.append(params + m + v + [s for lst in scalars for s in lst] + steps)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_warmup_factor_rule() -> None:
    assert [warmup_factor(t, 10, 4) for t in range(1, 10)] == [1.0] * 9  # none before a reset
    assert warmup_factor(10, 10, 4) == pytest.approx(0.01)  # the reset step
    ws = [warmup_factor(t, 10, 4) for t in range(10, 15)]
    assert ws[1:4] == pytest.approx([0.01 + 0.99 * (1 - math.cos(math.pi * k / 4)) / 2
                                     for k in (1, 2, 3)])
    assert ws[4] == 1.0 and all(a < b for a, b in itertools.pairwise(ws))
    assert warmup_factor(20, 10, 4) == pytest.approx(0.01)
    assert warmup_factor(10, 0, 4) == 1.0 and warmup_factor(10, 10, 0) == 1.0


def test_zero_gradient_stays_finite() -> None:
    w = nn.Parameter(torch.ones(3, 4))
    opt = StableSPAM([w], lr=0.1)
    w.grad = torch.zeros_like(w)
    opt.step()
    assert torch.equal(w.detach(), torch.ones(3, 4))
    assert all(torch.isfinite(x).all() for x in opt.state[w].values())


def test_state_dict_round_trip_is_bit_identical() -> None:
    def make(model: nn.Module) -> StableSPAM:
        return StableSPAM(model.parameters(), lr=LR, weight_decay=WD, update_interval=3,
                          warmup_steps=2)

    model = build_llama("tiny", seed=0)
    opt = make(model)
    for step in range(2):
        backward_random_batch(model, step)
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for step in range(2, 5):  # crosses the reset at t = 3
        backward_random_batch(model, step)
        opt.step()
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = build_llama("tiny", seed=1)
    resumed.load_state_dict(saved["model"])
    opt2 = make(resumed)
    opt2.load_state_dict(saved["opt"])
    for step in range(2, 5):
        backward_random_batch(resumed, step)
        opt2.step()
    for (name, a), b in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        for key, value in opt.state[a].items():
            assert torch.equal(value, opt2.state[b][key]), key


def test_bf16_scalar_statistics_stay_fp32_across_load() -> None:
    w = nn.Parameter(torch.randn(4, 5, dtype=torch.bfloat16))
    w.grad = torch.randn_like(w)
    opt = StableSPAM([w])
    opt.step()
    saved = opt.state_dict()
    opt2 = StableSPAM([w])
    opt2.load_state_dict(saved)
    for key in ("max_ema", "norm_ema", "norm_sq_ema"):
        assert opt2.state[w][key].dtype == torch.float32
        assert torch.equal(opt2.state[w][key], opt.state[w][key])
    assert opt2.state[w]["exp_avg"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        (dict(lr=-1.0), "lr=-1.0"),
        (dict(betas=(0.9, 1.0)), "betas=(0.9, 1.0)"),
        (dict(eps=0.0), "eps=0.0"),
        (dict(weight_decay=-0.1), "weight_decay=-0.1"),
        (dict(gamma1=1.0), "gamma1=1.0"),
        (dict(gamma2=-0.1), "gamma2=-0.1"),
        (dict(gamma3=1.5), "gamma3=1.5"),
        (dict(update_interval=-1), "update_interval=-1"),
        (dict(update_interval=10.0), "update_interval=10.0"),
        (dict(warmup_steps=-5), "warmup_steps=-5"),
        (dict(update_interval=100, warmup_steps=150), "warmup_steps=150"),
        (dict(foreach="yes"), "foreach='yes'"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs: dict, bad: str) -> None:
    w = nn.Parameter(torch.zeros(3, 3))
    pattern = bad.replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=pattern):
        StableSPAM([w], **kwargs)
    opt = StableSPAM([w])
    with pytest.raises(ValueError, match=pattern):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], **kwargs})
    assert len(opt.param_groups) == 1


def test_state_is_lazy_and_grad_none_skipped() -> None:
    a, b = nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(2))
    opt = StableSPAM([a, b])
    assert len(opt.state) == 0
    a.grad = torch.randn_like(a)
    before = b.detach().clone()
    opt.step()
    assert torch.equal(b, before) and not opt.state[b]
    assert set(opt.state[a]) == {"step", "exp_avg", "exp_avg_sq", "max_ema", "norm_ema",
                                 "norm_sq_ema"}


# ---------------------------------------------------------------- the authors' cosine decay


def authors_decay_factors(total_t: int, eta_min: float, steps: int) -> list[float]:
    """The factor of gamma1 and beta1 at t = 1..steps, obtained the way the authors' code
    obtains it: a ``CosineAnnealingLR(T_max=total_T + 1, eta_min)`` over a base lr of 1,
    stepped with the epoch (its closed form)."""
    sgd = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, total_t + 1, eta_min)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the epoch argument is deprecated
        for t in range(1, steps + 1):
            sched.step(t)
            out.append(sgd.param_groups[0]["lr"])
    return out


def test_decay_factor_matches_the_authors_schedule() -> None:
    factors = authors_decay_factors(6, 0.3, 20)
    assert [decay_factor(t, 6, 0.3) for t in range(1, 21)] == pytest.approx(factors, abs=1e-15)
    assert factors[6] == pytest.approx(0.3)  # eta_min at t = total_T + 1
    assert factors[13] == pytest.approx(1.0)  # then back up: the cosine is periodic
    assert decay_factor(5, None, 0.3) == 1.0


@pytest.mark.parametrize("foreach", [False, True])
def test_cosine_decay_of_gamma1_and_beta1_matches_reference(foreach: bool) -> None:
    total_t, eta_min, steps = 5, 0.4, 14  # past total_T + 1, where the factor rises again
    factors = authors_decay_factors(total_t, eta_min, steps)
    params = [nn.Parameter(t) for t in _tensors(0, SHAPES)]
    ref = [RefTensor(p.detach().numpy().copy()) for p in params]
    opt = StableSPAM(params, lr=LR, weight_decay=WD, update_interval=INTERVAL,
                     warmup_steps=WARMUP, total_T=total_t, eta_min=eta_min, foreach=foreach)
    plain = StableSPAM([nn.Parameter(t) for t in _tensors(0, SHAPES)], lr=LR, weight_decay=WD,
                       update_interval=INTERVAL, warmup_steps=WARMUP, foreach=foreach)
    for step in range(steps):
        grads = _grads(step % 10)
        for p, q, g in zip(params, plain.param_groups[0]["params"], grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        plain.step()
        for p, r, g in zip(params, ref, grads, strict=True):
            ref_step(r, g.numpy(), LR, WD, decay=factors[step])
            np.testing.assert_allclose(p.detach().numpy(), r.w, rtol=1e-11, atol=1e-13)
    for p, r in zip(params, ref, strict=True):
        np.testing.assert_allclose(opt.state[p]["exp_avg"].numpy(), r.m, rtol=1e-11, atol=1e-14)
        np.testing.assert_allclose(opt.state[p]["norm_ema"].item(), r.a, rtol=1e-11)
    moved = [not torch.equal(p, q) for p, q in zip(params, plain.param_groups[0]["params"],
                                                   strict=True)]
    assert all(moved)  # the decay does change the trajectory


def test_decay_hyperparameters_are_validated() -> None:
    w = nn.Parameter(torch.zeros(2))
    for kwargs, bad in ((dict(total_T=0), "total_T=0"), (dict(total_T=10.0), "total_T=10.0"),
                        (dict(eta_min=1.5), "eta_min=1.5"), (dict(eta_min=-0.1), "eta_min=-0.1")):
        with pytest.raises(ValueError, match=bad):
            StableSPAM([w], **kwargs)
