"""The unequal-micro-batch estimators are unbiased: Monte Carlo over independent examples
with a known covariance, for each loss convention (the derivation in families/twobatch.py
and families/per_example.py)."""

from __future__ import annotations

import numpy as np
import pytest

from gradlens.families.base import micro_weights


@pytest.mark.parametrize("reduction", ["mean", "global_mean", "sum"])
def test_two_batch_and_per_example_are_unbiased(reduction):
    rng = np.random.default_rng(0)
    sizes = [5, 2, 1]
    d, draws = 6, 40000
    mu = rng.normal(size=d)
    A = rng.normal(size=(d, d)) * 0.7
    sigma = A @ A.T
    true_tr, true_g = np.trace(sigma), mu @ mu
    v, lam, c = micro_weights(sizes, reduction)
    K, B = len(sizes), sum(sizes)
    L = np.linalg.cholesky(sigma)
    g = mu + rng.normal(size=(draws, B, d)) @ L.T  # per-example gradients
    bounds = np.cumsum([0, *sizes])
    means = [g[:, bounds[k]:bounds[k + 1]].mean(1) for k in range(K)]  # G_k
    h = [lam * v[k] * means[k] for k in range(K)]  # what the hooks see
    grad = sum(h)  # p.grad
    y = (grad / lam) ** 2
    y = y.sum(-1)
    a = sum(sizes[k] * ((h[k] / (lam * v[k])) ** 2).sum(-1) for k in range(K))
    tr2 = (a - B * y) / (K - B * c)
    m = (g ** 2).sum(-1).mean(1)
    tr_pe = (m - y) / (1 - c)
    for est, signal in ((tr2, y - c * tr2), (tr_pe, y - c * tr_pe)):
        se = est.std() / np.sqrt(draws)
        assert abs(est.mean() - true_tr) < 4 * se, (est.mean(), true_tr, se)
        se_g = signal.std() / np.sqrt(draws)
        assert abs(signal.mean() - true_g) < 4 * se_g, (signal.mean(), true_g, se_g)
