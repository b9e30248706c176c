"""The subsampled per-example estimate (``per_example_sample``): unbiased, with the variance its
module states, both checked in float64 against per-example gradients from autograd."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradlens import GradLens

B, K, M, D_IN, D_OUT = 6, 2, 2, 5, 4  # examples per micro-batch, micro-batches, sample


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, D_OUT)).double()
    x = torch.randn(K * B, D_IN, dtype=torch.float64) * torch.linspace(0.2, 3, K * B)[:, None]
    y = torch.randn(K * B, D_OUT, dtype=torch.float64)
    return model, x, y


def _loss(model, x, y):
    return ((model(x) - y) ** 2).sum(1).mean()


def _per_example_sq(model, x, y) -> dict[str, np.ndarray]:
    """||grad of example b's own loss||^2 per parameter, by autograd one example at a time."""
    out: dict[str, list[float]] = {n: [] for n, _ in model.named_parameters()}
    for b in range(len(x)):
        model.zero_grad()
        _loss(model, x[b:b + 1], y[b:b + 1]).backward()
        for n, p in model.named_parameters():
            out[n].append(float(p.grad.square().sum()))
    model.zero_grad()
    return {n: np.array(v) for n, v in out.items()}


def _traces(sample: int, steps: int) -> dict[str, np.ndarray]:
    model, x, y = _setup()
    lens = GradLens(model, None, preset="minimal", per_example=True, per_example_sample=sample)
    for _ in range(steps):  # the same gradients at every step: only the draws change
        for xs, ys in zip(x.chunk(K), y.chunk(K), strict=True):
            (_loss(model, xs, ys) / K).backward()
        lens.step()
        model.zero_grad()
    lens.close()
    out: dict[str, list[float]] = {}
    for _s, layer, _r, stat, value in lens.memory.rows:
        if stat == "pe_trace":
            out.setdefault(layer, []).append(value)
    return {n: np.array(v) for n, v in out.items()}


def test_sampled_trace_is_unbiased_with_the_stated_variance():
    exact = {n: v[0] for n, v in _traces(0, 1).items()}
    model, x, y = _setup()
    q = _per_example_sq(model, x, y)
    n = K * B
    c = K * (1 / K) ** 2 / B  # sum_k v_k^2 / b_k with v_k = 1/K
    N = 600
    est = _traces(M, N)
    assert set(est) == set(exact) == {"0.weight", "0.bias"}
    for layer, values in est.items():
        assert len(values) == N and np.isfinite(values).all()
        # the stated variance: sum_k b^2 (1 - m/b) s_k^2 / m / (n^2 (1 - c)^2), s_k^2 the
        # within-micro-batch sample variance of ||g_b||^2 (module docstring)
        s2 = [np.var(part, ddof=1) for part in np.split(q[layer], K)]
        var = sum(B**2 * (1 - M / B) * s / M for s in s2) / (n**2 * (1 - c) ** 2)
        assert var > 0
        # unbiased: the mean of N independent draws within 4.5 standard errors (CLT; two
        # layers: a false alarm has probability < 1e-5)
        assert abs(values.mean() - exact[layer]) <= 4.5 * math.sqrt(var / N), layer
        # the variance itself: the sample variance of N = 600 draws has a relative spread of
        # about sqrt((kurtosis - 1) / N) < 0.15 here; 0.6-1.5 is > 3 of those
        assert 0.6 < values.var(ddof=1) / var < 1.5, (layer, values.var(ddof=1), var)


def test_a_sample_of_every_example_is_the_exact_estimate():
    exact = _traces(0, 1)
    full = _traces(B, 1)
    for layer, v in exact.items():
        assert full[layer][0] == pytest.approx(v[0], rel=1e-12)


def test_per_example_sample_must_be_a_non_negative_integer():
    model, _, _ = _setup()
    with pytest.raises((ValueError, TypeError), match="per_example_sample"):
        GradLens(model, None, preset="full", per_example_sample=-1)
