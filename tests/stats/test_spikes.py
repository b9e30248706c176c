"""Spike detectors: a scalar python reference, edge cases, and a small LLaMA run."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from gradlens import stats as S
from gradlens.data import build_llama
from tests.stats._reference import forecast_zscore, np64


def run_detector(xs: torch.Tensor, cfg: S.SpikeConfig | None = None):
    mean, var, count = S.zscore_init(xs[0])
    zs, flags = [], []
    for x in xs:
        z, f, mean, var, count = S.zscore_update(x, mean, var, count, cfg)
        zs.append(z)
        flags.append(f)
    return torch.stack(zs), torch.stack(flags), (mean, var, count)


@pytest.mark.parametrize("cfg", [
    S.SpikeConfig(),
    S.SpikeConfig(alpha=0.9, level_alpha=0.9, trend=0.0, threshold=2.0, warmup=5,
                  min_std=0.0, clip=False),
    S.SpikeConfig(alpha=0.8, level_alpha=0.5, trend=0.3, threshold=1.5, warmup=3,
                  min_std=0.3, clip=True),
])
def test_zscore_matches_scalar_reference(cfg):
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(80, 3)).cumsum(0) * 0.1 + rng.standard_t(2, size=(80, 3))
    xs[10, 1] = np.nan
    xs[40, 2] = np.inf
    xs[50, 0] += 30.0
    z, f, _ = run_detector(torch.from_numpy(xs), cfg)
    rz, rf = forecast_zscore(xs.tolist(), cfg.threshold, cfg.alpha, cfg.level_alpha, cfg.trend,
                             cfg.warmup, cfg.min_std, cfg.clip)
    np.testing.assert_allclose(np64(z), rz, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(f.numpy(), rf)
    assert rf.any()  # the reference case does fire somewhere


def test_warmup_and_nonfinite_inputs():
    cfg = S.SpikeConfig(warmup=5)
    xs = torch.tensor([[0.0], [0.1], [5.0], [0.0], [0.1], [0.0], [math.nan], [1e6]],
                      dtype=torch.float64)
    z, f, (_, _, count) = run_detector(xs, cfg)
    assert not f[:5].any() and torch.isnan(z[:5]).all()  # nothing fires during warm-up
    assert torch.isnan(z[6]).all() and not f[6].any()  # NaN input: no z, no flag
    assert bool(f[7, 0])
    assert float(count[0]) == 7  # the NaN step did not count
    # a NaN leaves the state exactly as it was
    m0, v0, c0 = S.zscore_init(torch.zeros(2))
    _, _, m1, v1, c1 = S.zscore_update(torch.tensor([1.0, 2.0]), m0, v0, c0)
    _, _, m2, v2, c2 = S.zscore_update(torch.tensor([math.nan, -math.inf]), m1, v1, c1)
    assert torch.equal(m1, m2) and torch.equal(v1, v2) and torch.equal(c1, c2)


def test_clipping_keeps_a_spike_out_of_the_variance():
    base = torch.tensor([0.0, 0.05] * 30, dtype=torch.float64)
    xs = base.clone()
    xs[40] = 50.0
    cfg_clip = S.SpikeConfig(warmup=10)
    cfg_raw = S.SpikeConfig(warmup=10, clip=False)
    z_c, f_c, (_, var_c, _) = run_detector(xs[:, None], cfg_clip)
    _, f_r, (_, var_r, _) = run_detector(xs[:, None], cfg_raw)
    assert bool(f_c[40, 0]) and bool(f_r[40, 0])
    assert float(var_r[0]) > 100 * float(var_c[0])
    # with clipping, the steps after the spike are judged against an intact scale
    assert float(torch.nan_to_num(z_c[41:], nan=0).abs().max()) < float(z_c[40, 0])


def test_spike_config_validation():
    for bad in (dict(alpha=1.0), dict(level_alpha=-0.1), dict(trend=1.5), dict(threshold=0),
                dict(warmup=0), dict(min_std=-1), dict(spam_theta=0), dict(top_k=0)):
        with pytest.raises(ValueError):
            S.SpikeConfig(**bad)


def test_max_ratio():
    xs = [[1.0, 2.0], [3.0, math.nan], [1.5, 1.0], [6.0, 8.0]]
    run_max = S.max_ratio_init(torch.zeros(2))
    ratios = []
    for row in xs:
        r, run_max = S.max_ratio_update(torch.tensor(row), run_max)
        ratios.append(np64(r))
    ratios = np.array(ratios)
    ref = np.array([[np.nan, np.nan], [3.0, np.nan], [0.5, 0.5], [2.0, 4.0]])
    np.testing.assert_allclose(ratios, ref)
    np.testing.assert_array_equal(np64(run_max), [6.0, 8.0])


def test_spam_fraction():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(30, 20))
    v = rng.uniform(1e-6, 1e-3, size=(30, 20)) ** 2
    g[0, 0] = np.nan
    g[2, 2] = -np.inf  # a non-finite gradient entry is no hit, whatever v is
    v[1, 1] = np.inf
    ok = np.isfinite(g) & np.isfinite(v)
    ref = ((g**2 > 5000 * v) & ok).sum() / ok.sum()
    assert 0 < ref < 1
    got = S.spam_fraction(torch.from_numpy(g).float(), torch.from_numpy(v).float())
    assert got.dtype == torch.float32 and float(got) == pytest.approx(ref)
    both = S.spam_fractions([torch.from_numpy(g), torch.ones(3)], [torch.from_numpy(v),
                                                                   torch.ones(3)])
    np.testing.assert_allclose(np64(both), [ref, 0.0])
    # Adam's first step: v = 0, every non-zero entry counts
    assert float(S.spam_fraction(torch.tensor([1.0, 0.0]), torch.zeros(2))) == 0.5


def test_spam_fractions_stacked_per_shape_equal_one_by_one():
    """Pairs stacked per shape (three of one shape with non-finite entries, a bf16 one, a
    vector, an empty one) give spam_fraction's value for each, in input order."""
    rng = np.random.default_rng(2)
    shapes = [(6, 5), (4,), (6, 5), (6, 5), (0, 3), (6, 5)]
    gs = [torch.from_numpy(rng.normal(size=s)).float() for s in shapes]
    vs = [torch.from_numpy(rng.uniform(1e-5, 1e-3, size=s)).float() for s in shapes]
    gs[2][1, 1], vs[3][0, 4], gs[3][2, 2] = math.nan, math.inf, -math.inf
    gs[5] = gs[5].bfloat16()
    both = S.spam_fractions(gs, vs)
    one = torch.stack([S.spam_fraction(g, v) for g, v in zip(gs, vs, strict=True)])
    torch.testing.assert_close(both, one, rtol=0, atol=0, equal_nan=True)
    assert math.isnan(float(both[4])) and 0 < float(both[0]) < 1
    with pytest.raises(ValueError, match="shape"):
        S.spam_fractions([torch.ones(2, 3)], [torch.ones(3, 2)])


def test_attribute_spike_static_shapes():
    scores = torch.tensor([0.5, math.nan, 9.0, 3.0, -1.0])
    idx, val, active = S.attribute_spike(torch.tensor(True), scores, k=3)
    assert idx.tolist() == [2, 3, 0] and active.all()
    np.testing.assert_allclose(np64(val), [9.0, 3.0, 0.5])
    idx, val, active = S.attribute_spike(torch.tensor(False), scores, k=3)
    assert idx.shape == (3,) and not active.any()
    idx, val, active = S.attribute_spike(torch.tensor(True), scores, k=10)
    assert idx.shape == (5,) and active.tolist() == [True, True, True, True, False]
    with pytest.raises(ValueError):
        S.attribute_spike(torch.tensor(True), scores, k=0)


# ----------------------------------------------------------------------------- a real run

STEPS, INJECT_STEP, AFTER, B, T = 200, 150, 10, 4, 16


def markov_batches(vocab: int, steps: int, seed: int) -> torch.Tensor:
    """Token sequences from a sparse random Markov chain (learnable, not trivial)."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, 4), generator=g)
    x = torch.empty(steps, B, T, dtype=torch.long)
    x[:, :, 0] = torch.randint(0, vocab, (steps, B), generator=g)
    for t in range(1, T):
        pick = torch.randint(0, 4, (steps, B), generator=g)
        x[:, :, t] = succ[x[:, :, t - 1], pick]
    return x


class Run:
    """The tiny LLaMA under AdamW, linear warm-up then cosine decay, one step at a time."""

    def __init__(self):
        self.model = build_llama("tiny", seed=0)
        self.names = [n for n, _ in self.model.named_parameters()]
        self.params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=3e-3, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt,
            lambda s: min(1.0, (s + 1) / 20) * (0.55 + 0.45 * math.cos(math.pi * s / STEPS)))
        self.data = markov_batches(self.model.config.vocab_size, STEPS, seed=1)

    def step(self, s: int, inject: int | None = None) -> torch.Tensor:
        """One optimizer step; returns the per-parameter norms of the gradient it consumed
        (``inject``: index of a parameter whose gradient is multiplied by 100)."""
        loss = self.model(input_ids=self.data[s], labels=self.data[s]).loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if inject is not None:
            self.params[inject].grad.mul_(100.0)
        norms = S.grad_summaries([p.grad for p in self.params])[:, 0].sqrt()
        self.opt.step()
        self.sched.step()
        return norms


@pytest.fixture(scope="module")
def runs():
    """A clean run of STEPS steps, and the same run with a 100x gradient injected into one
    hidden matrix at INJECT_STEP (then AFTER more steps), sharing the steps before it."""
    torch.manual_seed(0)
    run = Run()
    clean = [run.step(s) for s in range(INJECT_STEP)]
    fork = copy.deepcopy(run)
    clean += [run.step(s) for s in range(INJECT_STEP, STEPS)]
    k = run.names.index("model.layers.1.self_attn.q_proj.weight")
    injected = [*clean[:INJECT_STEP], fork.step(INJECT_STEP, inject=k)]
    injected += [fork.step(s) for s in range(INJECT_STEP + 1, INJECT_STEP + 1 + AFTER)]
    return run.names, torch.stack(clean), torch.stack(injected), k


def with_global(norms: torch.Tensor) -> torch.Tensor:
    return torch.cat([norms, norms.square().sum(1, keepdim=True).sqrt()], dim=1)


def test_clean_run_raises_no_spike(runs):
    _, clean, _, _ = runs
    z, flags, _ = run_detector(torch.log(with_global(clean)))
    assert not flags.any(), f"false spikes at (step, layer) {flags.nonzero().tolist()}"
    assert float(torch.nan_to_num(z, nan=0).max()) < 0.8 * S.SpikeConfig().threshold


def test_injected_spike_is_flagged_and_attributed(runs):
    _, _, injected, k = runs
    z, flags, _ = run_detector(torch.log(with_global(injected)))
    assert flags[INJECT_STEP, k]
    fired = flags.nonzero().tolist()
    assert all(step == INJECT_STEP for step, _ in fired), fired  # no aftershocks
    # q_proj is ~0.3% of the global norm here: the global norm barely moves, the per-layer
    # detector is what sees it; the step's event is attributed to it
    event = flags[INJECT_STEP].any()
    idx, _, active = S.attribute_spike(event, z[INJECT_STEP, :-1], k=3)
    assert int(idx[0]) == k and bool(active[0])


def test_global_spike_attributed_to_the_dominant_layer(runs):
    names, clean, _, _ = runs
    k = names.index("lm_head.weight")
    norms = clean.clone()
    norms[120, k] *= 100
    z, flags, _ = run_detector(torch.log(with_global(norms)))
    assert flags[120, -1] and flags[120, k] and int(flags.sum()) == 2
    idx, values, active = S.attribute_spike(flags[120, -1], z[120, :-1], k=3)
    assert int(idx[0]) == k and active.tolist() == [True, True, True]
    assert float(values[0]) > 10 * float(values[1])


def test_offline_injection_into_every_matrix(runs):
    """A 100x jump of any 2-D parameter's norm, at several steps, fires there for that layer
    only. The detector is elementwise: every (step, layer) case runs side by side."""
    names, clean, _, _ = runs
    matrices = [k for k, n in enumerate(names) if not n.endswith("norm.weight")]
    cases = [(step, k) for step in (30, 100, 199) for k in matrices]
    L = clean.shape[1]
    series = []
    for step, k in cases:
        norms = clean.clone()
        norms[step, k] *= 100
        series.append(torch.log(with_global(norms)))
    z, flags, _ = run_detector(torch.cat(series, dim=1))  # (steps, cases * (L + 1))
    z = z.reshape(STEPS, len(cases), L + 1)
    flags = flags.reshape(STEPS, len(cases), L + 1)
    for c, (step, k) in enumerate(cases):
        assert flags[step, c, k], (names[k], step)
        assert int(flags[:, c, :L].sum()) == 1, (names[k], step)
        idx, _, _ = S.attribute_spike(torch.tensor(True), z[step, c, :L], k=1)
        assert int(idx[0]) == k
