"""Variance estimators against exact population quantities and numpy references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from gradlens import stats as S
from tests.stats._reference import np64, scale_normalize, temporal_reference


def population(n: int, p: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, p)) + rng.normal(size=p)  # a non-zero mean gradient


def t64(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def sample_trace(g: np.ndarray) -> float:
    """Unbiased sample covariance trace: 1/(n-1) sum_b ||g_b - mean||^2."""
    return float(((g - g.mean(0)) ** 2).sum() / (len(g) - 1))


# ----------------------------------------------------------------------------- within batch


def test_within_batch_trace_is_the_sample_covariance_trace():
    g = population(9, 6, seed=0)
    pe = torch.from_numpy((g**2).sum(1))
    big = torch.tensor(float((g.mean(0) ** 2).sum()), dtype=torch.float64)
    ref = sample_trace(g)
    assert float(S.within_batch_trace(pe, big)) == pytest.approx(ref, rel=1e-12)
    assert float(S.within_batch_trace(pe.mean(), big, n=9)) == pytest.approx(ref, rel=1e-12)
    with pytest.raises(ValueError, match="n >= 2"):
        S.within_batch_trace(pe.mean(), big)
    with pytest.raises(ValueError, match="n >= 2"):
        S.within_batch_trace(pe[:1], big)


def test_within_batch_trace_skips_nonfinite_examples_in_the_mean():
    pe = torch.tensor([1.0, math.nan, 3.0], dtype=torch.float64)
    got = S.within_batch_trace(pe, torch.tensor(0.5, dtype=torch.float64))
    assert float(got) == pytest.approx(3 / 2 * (2.0 - 0.5))


def test_mean_reduced_loss_convention_end_to_end():
    """Hooks under a mean-reduced loss see g_b / B: multiply by B^2, as documented."""
    torch.manual_seed(0)
    lin = nn.Linear(5, 3, bias=False).double()
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    target = torch.randn(6, 4, 3, dtype=torch.float64)

    def loss_one(p, xb, tb):
        return (functional_call(lin, p, (xb,)) - tb).square().mean()

    params = {"weight": lin.weight.detach()}
    per = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, target)["weight"]
    ref = sample_trace(np64(per).reshape(6, -1))

    saved = {}
    y = lin(x)
    y.register_hook(lambda d: saved.__setitem__("d", d))
    ((y - target).square().mean(dim=(1, 2))).mean().backward()  # mean over examples
    B = x.shape[0]
    pe = S.per_example_sq_norms_linear(x, saved["d"]) * B**2
    big = S.finite_sq_norm(lin.weight.grad)
    assert float(S.within_batch_trace(pe, big)) == pytest.approx(ref, rel=1e-10)


# ----------------------------------------------------------------------------- two batch


def test_two_batch_exact_expectation_over_partitions():
    """Micro-batches partitioning a finite population: E[trace estimate] is the unbiased
    population trace; the expectation is computed exactly by enumerating every subset."""
    N, b = 8, 2
    g = population(N, 5, seed=1)
    big_sq = float((g.mean(0) ** 2).sum())
    # every micro-batch of a random partition is a uniform b-subset: average over all of them
    subsets = list(itertools.combinations(range(N), b))
    e_small = np.mean([(g[list(s)].mean(0) ** 2).sum() for s in subsets])
    signal, trace = S.two_batch_estimates(t64(e_small), t64(big_sq), b, N)
    assert float(trace) == pytest.approx(sample_trace(g), rel=1e-12)
    # the signal estimate is |G|^2 - tr/N: unbiased for the mean of the law the population
    # was drawn from, not for this population's own mean
    assert float(signal) == pytest.approx(big_sq - sample_trace(g) / N, rel=1e-12)

    # one concrete random partition: the estimator's average over partitions converges
    rng = np.random.default_rng(0)
    est = []
    for _ in range(400):
        perm = rng.permutation(N).reshape(N // b, b)
        small = np.mean([(g[idx].mean(0) ** 2).sum() for idx in perm])
        est.append(float(S.two_batch_estimates(t64(small), t64(big_sq),
                                               b, N)[1]))
    se = np.std(est) / np.sqrt(len(est))
    assert abs(np.mean(est) - sample_trace(g)) < 4 * se


def test_two_batch_unbiased_for_iid_sampling_exact():
    """Sampling with replacement from a finite law: E|G_B|^2 by enumerating all draws."""
    N = 5
    g = population(N, 3, seed=2)
    mu = g.mean(0)
    pop_trace = float(((g - mu) ** 2).sum(1).mean())  # law's covariance trace (1/N)

    def e_sq(B):
        return np.mean([(g[list(t)].mean(0) ** 2).sum()
                        for t in itertools.product(range(N), repeat=B)])

    for bs, bb in ((1, 3), (2, 3), (1, 2)):
        signal, trace = S.two_batch_estimates(t64(e_sq(bs)), t64(e_sq(bb)),
                                              bs, bb)
        assert float(signal) == pytest.approx(float((mu**2).sum()), rel=1e-10)
        assert float(trace) == pytest.approx(pop_trace, rel=1e-10)


def test_two_batch_vectorized_and_validation():
    small = torch.tensor([4.0, 2.0, 1.0])
    big = torch.tensor([1.0, 1.5, 1.0])
    signal, trace = S.two_batch_estimates(small, big, 2, 8)
    np.testing.assert_allclose(np64(signal), (8 * np64(big) - 2 * np64(small)) / 6, rtol=1e-6)
    np.testing.assert_allclose(np64(trace), (np64(small) - np64(big)) / (1 / 2 - 1 / 8),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="b_small < b_big"):
        S.two_batch_estimates(small, big, 8, 8)
    with pytest.raises(ValueError, match="units"):
        S.two_batch_unit_estimates(small, big[:2], 2, 8)


def test_per_unit_two_batch_and_noise_to_signal():
    """Per-unit estimates equal the scalar estimator applied to each unit's slice."""
    N, b, units, fan = 6, 2, 4, 3
    rng = np.random.default_rng(3)
    g = rng.normal(size=(N, units, fan)) + np.array([2.0, 0.0, 1.0, 0.3])[None, :, None]
    big = (g.mean(0) ** 2).sum(1)
    subsets = list(itertools.combinations(range(N), b))
    small = np.mean([(g[list(s)].mean(0) ** 2).sum(1) for s in subsets], axis=0)
    signal, trace = S.two_batch_unit_estimates(torch.from_numpy(small), torch.from_numpy(big),
                                               b, N)
    for i in range(units):
        np.testing.assert_allclose(float(trace[i]), sample_trace(g[:, i]), rtol=1e-12)

    ratios = np64(trace) / np64(signal)
    keep = np64(signal) > 0
    med, mean = S.unit_noise_to_signal(torch.from_numpy(small), torch.from_numpy(big), b, N)
    assert float(med) == pytest.approx(np.median(ratios[keep]))
    assert float(mean) == pytest.approx(np.mean(ratios[keep]))


def test_unit_noise_to_signal_masks_nonpositive_signals():
    # signal = (8*big - 2*small)/6 ; make unit 1 negative and unit 3 NaN
    small = torch.tensor([1.0, 9.0, 2.0, math.nan, 1.5], dtype=torch.float64)
    big = torch.tensor([0.5, 0.1, 1.0, 1.0, 0.5], dtype=torch.float64)
    r = S.unit_noise_to_signal_ratios(small, big, 2, 8)
    assert r.shape == (5,)
    assert np.isnan(np64(r)[[1, 3]]).all()
    sig, tr = S.two_batch_estimates(small, big, 2, 8)
    ref = (np64(tr) / np64(sig))[[0, 2, 4]]
    med, mean = S.unit_noise_to_signal(small, big, 2, 8)
    assert float(med) == pytest.approx(np.median(ref))
    assert float(mean) == pytest.approx(np.mean(ref))
    # every unit excluded: NaN, not an error
    med, mean = S.unit_noise_to_signal(small[1:2], big[1:2], 2, 8)
    assert math.isnan(float(med)) and math.isnan(float(mean))
    # even count: numpy's median averages the middle pair
    med, _ = S.unit_noise_to_signal(small[[0, 2, 4, 1]], big[[0, 2, 4, 1]], 2, 8)
    assert float(med) == pytest.approx(np.median(ref))


# ----------------------------------------------------------------------------- EMAs


def test_ema_update_skips_nonfinite_and_debiases():
    beta = 0.8
    xs = [[1.0, 2.0], [math.nan, 4.0], [3.0, math.inf], [5.0, 1.0]]
    ema = torch.zeros(2, dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    for row in xs:
        ema, count = S.ema_update(torch.tensor(row, dtype=torch.float64), ema, count, beta)
    np.testing.assert_array_equal(np64(count), [3, 3])
    for j in range(2):
        seen = [r[j] for r in xs if math.isfinite(r[j])]
        w = np.array([beta ** (len(seen) - 1 - i) for i in range(len(seen))])
        ref = (w * seen).sum() / w.sum()
        assert float(S.ema_debiased(ema, count, beta)[j]) == pytest.approx(ref)
    assert math.isnan(float(S.ema_debiased(torch.zeros(()), torch.zeros(()), beta)))
    with pytest.raises(ValueError, match="beta"):
        S.ema_update(torch.ones(()), torch.zeros(()), torch.zeros(()), 1.0)


def test_ema_ratio_is_ratio_of_emas_not_ema_of_ratios():
    beta = 0.9
    num = [2.0, 10.0, -1.0, 3.0, math.nan]
    den = [1.0, 0.5, 2.0, 4.0, 1.0]
    en = ed = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    for a, b in zip(num, den, strict=True):
        ratio, en, ed, count = S.ema_ratio_update(
            torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
            en, ed, count, beta)
    w = np.array([beta**3, beta**2, beta, 1.0])
    ref = (w * num[:4]).sum() / (w * den[:4]).sum()
    assert float(ratio) == pytest.approx(ref)
    assert float(count) == 4.0  # the NaN step updated neither EMA
    ema_of_ratios = (w * np.array(num[:4]) / np.array(den[:4])).sum() / w.sum()
    assert abs(ref - ema_of_ratios) > 1.0
    # no positive signal: NaN
    r, *_ = S.ema_ratio_update(torch.tensor([1.0]), torch.tensor([-1.0]), torch.zeros(1),
                               torch.zeros(1), torch.zeros(()), beta)
    assert math.isnan(float(r[0]))


# ----------------------------------------------------------------------------- temporal


@pytest.mark.parametrize("layout", ["linear", "embedding"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_temporal_exact_matches_weighted_reference(layout, unbiased):
    rng = np.random.default_rng(4)
    beta = 0.7
    gs = [rng.normal(size=(5, 4)) * rng.uniform(0.1, 3, size=(5, 1)) + 0.5 for _ in range(6)]
    gs[3] = gs[3].copy()
    gs[3][1, 2] = np.nan  # a non-finite step is skipped whole
    state = S.temporal_init(torch.zeros(5, 4, dtype=torch.float64))
    for g in gs:
        var, msq, var_n = S.temporal_step(state, torch.from_numpy(g), layout, beta,
                                          unbiased=unbiased)
    assert state["count"] == 6 and float(state["n"]) == 5
    ref_var, ref_msq = temporal_reference(gs, beta, unbiased)
    assert float(var) == pytest.approx(ref_var, rel=1e-10)
    assert float(msq) == pytest.approx(ref_msq, rel=1e-10)
    ref_n, _ = temporal_reference([scale_normalize(g, layout) for g in gs], beta, unbiased)
    assert float(var_n) == pytest.approx(ref_n, rel=1e-10)


def test_temporal_unbiased_reference_is_unbiased():
    """The correction used by temporal_readout: for i.i.d. steps E[var] = tr(Sigma) and
    E[mean_sq] = |mu|^2 (vectorized numpy Monte Carlo over replicas, any n >= 2)."""
    rng = np.random.default_rng(5)
    beta, steps, reps, p = 0.8, 4, 40000, 3
    mu = np.array([1.0, -0.5, 0.2])
    sd = np.array([0.5, 1.0, 2.0])
    g = mu + sd * rng.normal(size=(reps, steps, p))
    w = beta ** np.arange(steps - 1, -1, -1) * (1 - beta)
    w = w / w.sum()
    m = np.einsum("s,rsp->rp", w, g)
    var = np.einsum("s,rs->r", w, ((g - m[:, None]) ** 2).sum(-1)) / (1 - (w**2).sum())
    msq = (m**2).sum(-1) - (w**2).sum() * var
    assert var.mean() == pytest.approx((sd**2).sum(), rel=0.02)
    assert msq.mean() == pytest.approx((mu**2).sum(), abs=0.05)


def test_temporal_nan_before_two_steps_and_validation():
    state = S.temporal_init(torch.zeros(3, 2))
    assert all(math.isnan(float(v)) for v in S.temporal_readout(state))
    S.temporal_update_(state, torch.ones(3, 2), "linear", 0.9)
    assert all(math.isnan(float(v)) for v in S.temporal_readout(state))
    var, msq, _ = S.temporal_readout(state, unbiased=False)
    assert float(var) == pytest.approx(0.0, abs=1e-5) and float(msq) == pytest.approx(6.0)
    with pytest.raises(ValueError, match="beta"):
        S.temporal_update_(state, torch.ones(3, 2), "linear", 0.5)
    with pytest.raises(ValueError, match="layout"):
        S.temporal_update_(S.temporal_init(torch.zeros(3, 2)), torch.ones(3, 2))
    vec = S.temporal_init(torch.zeros(4))  # 1-D: no normalized buffers
    S.temporal_update_(vec, torch.ones(4))
    S.temporal_update_(vec, 2 * torch.ones(4))
    assert math.isnan(float(S.temporal_readout(vec)[2]))


def test_sketch_is_linear_seeded_and_unbiased():
    x = torch.randn(300, dtype=torch.float64)
    y = torch.randn(300, dtype=torch.float64)
    k = 16
    np.testing.assert_allclose(np64(S.sketch_apply(x + y, k, 3)),
                               np64(S.sketch_apply(x, k, 3) + S.sketch_apply(y, k, 3)),
                               rtol=1e-12, atol=1e-12)
    assert torch.equal(S.sketch_apply(x, k, 3), S.sketch_apply(x, k, 3, chunk=7))
    assert not torch.equal(S.sketch_apply(x, k, 3), S.sketch_apply(x, k, 4))
    sq = np.array([float(S.sketch_apply(x, k, s).square().sum()) for s in range(300)])
    exact = float(x.square().sum())
    bound = math.sqrt(2 / k) * exact  # std bound of the docstring
    assert sq.std() <= 1.3 * bound
    assert abs(sq.mean() - exact) < 4 * bound / math.sqrt(len(sq))


def test_sketched_temporal_close_to_exact():
    torch.manual_seed(6)
    mu = torch.randn(40, 30)
    exact = S.temporal_init(mu)
    sk = S.temporal_init(mu, sketch_dim=4096, seed=1)
    assert sk["mean"].shape == (4096,) and sk["mean_n"].shape == (4096,)
    for _ in range(8):
        g = mu + 0.3 * torch.randn(40, 30)
        S.temporal_update_(exact, g, "linear", 0.9)
        S.temporal_update_(sk, g, "linear", 0.9)
    e, s = S.temporal_readout(exact), S.temporal_readout(sk)
    # ||E g||^2 carries the sketch error (rel. std <= sqrt(2/k) = 2.2%); var inherits it
    assert float(s[1]) == pytest.approx(float(e[1]), rel=0.1)
    assert abs(float(s[0]) - float(e[0])) < 0.1 * float(e[1])
    assert abs(float(s[2]) - float(e[2])) < 0.1 * 1200


def test_noise_to_signal_summary_of_rows_is_each_row_against_numpy():
    """A (G, N) pair is G independent summaries: numpy's median and mean of trace / signal over
    the units whose signal is positive and finite, row by row (one row with none: NaN)."""
    rng = np.random.default_rng(5)
    trace = rng.standard_normal((4, 9))
    signal = rng.standard_normal((4, 9))
    signal[2] = -1.0  # no usable unit
    signal[1, 3] = np.nan
    med, mean = S.noise_to_signal_summary(torch.from_numpy(trace), torch.from_numpy(signal))
    for g in range(4):
        ok = np.isfinite(signal[g]) & (signal[g] > 0)
        if not ok.any():
            assert np.isnan(med[g].item()) and np.isnan(mean[g].item())
            continue
        r = trace[g][ok] / signal[g][ok]
        assert med[g].item() == pytest.approx(np.median(r), rel=1e-12)
        assert mean[g].item() == pytest.approx(r.mean(), rel=1e-12)
