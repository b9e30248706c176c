"""Per-unit RMS, spread, Gini and log histograms against float64 numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradlens import stats as S
from tests.stats._reference import gini, np64, rms_rows, spread, units

SHAPES = {"linear": (12, 7), "conv1d": (7, 12), "embedding": (30, 5), "other": (6, 2, 3)}


def heavy(shape, seed, dtype=torch.float32, n_bad=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(2 * torch.randn(shape[0], 1, generator=g, dtype=torch.float64))
    t = torch.randn(shape, generator=g, dtype=torch.float64) * scale.reshape(
        (shape[0],) + (1,) * (len(shape) - 1))
    flat = t.view(-1)
    for j in range(n_bad):
        flat[(7 * j + 3) % flat.numel()] = (math.nan, math.inf, -math.inf)[j % 3]
    return t.to(dtype)


@pytest.mark.parametrize("layout", list(SHAPES))
@pytest.mark.parametrize("n_bad", [0, 4])
def test_unit_and_fan_rms(layout, n_bad):
    g = heavy(SHAPES[layout], seed=3, n_bad=n_bad)
    m = units(np64(g), layout)
    np.testing.assert_allclose(np64(S.unit_rms(g, layout)), rms_rows(m), rtol=1e-5)
    np.testing.assert_allclose(np64(S.fan_rms(g, layout)), rms_rows(m.T), rtol=1e-5)
    fin = np.where(np.isfinite(m), m, 0.0)
    np.testing.assert_allclose(np64(S.unit_sq_norms(g, layout)), (fin**2).sum(1), rtol=1e-5)
    np.testing.assert_allclose(np64(S.fan_sq_norms(g, layout)), (fin**2).sum(0), rtol=1e-5)
    summary, unit, fan = S.summary_and_axis_sq_norms(g, layout)
    np.testing.assert_allclose(np64(unit), (fin**2).sum(1), rtol=1e-5)
    np.testing.assert_allclose(np64(fan), (fin**2).sum(0), rtol=1e-5)
    np.testing.assert_allclose(np64(summary), np64(S.grad_summary(g)), rtol=1e-5)
    assert float(summary[2]) == n_bad and float(summary[3]) == g.numel()
    if n_bad == 0:  # the documented identity with SCALE's axis
        norm_dim = {"linear": 1, "conv1d": 0, "embedding": 0}.get(layout)
        if norm_dim is not None:
            np.testing.assert_allclose(np64(S.unit_rms(g, layout)),
                                       np64(g.square().mean(dim=norm_dim).sqrt()), rtol=1e-6)


def test_unit_rms_rejects_vectors_and_unknown_layouts():
    with pytest.raises(ValueError, match="layout"):
        S.unit_rms(torch.ones(3, 3), "vector")
    with pytest.raises(ValueError):
        S.unit_rms(torch.ones(3), "linear")


def test_unit_rms_bf16_accumulates_in_float32():
    g = heavy((9, 64), seed=4, dtype=torch.bfloat16)
    r = S.unit_rms(g, "linear")
    assert r.dtype == torch.float32
    np.testing.assert_allclose(np64(r), rms_rows(np64(g)), rtol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_spread_matches_numpy(seed):
    r = S.unit_rms(heavy((101, 9), seed=seed), "linear")
    got = S.spread(r)
    assert got.shape == (4,)
    np.testing.assert_allclose(np64(got), spread(np64(r)), rtol=2e-5)


def test_spread_float64_tight():
    x = torch.rand(57, dtype=torch.float64) ** 3
    np.testing.assert_allclose(np64(S.spread(x)), spread(np64(x)), rtol=1e-12)


def test_spread_edge_cases():
    nan4 = np.full(4, np.nan)
    np.testing.assert_array_equal(np64(S.spread(torch.zeros(6))), [0, 1, 1, 0])
    np.testing.assert_array_equal(np64(S.spread(torch.full((5,), 2.5))), [0, 1, 1, 0])
    one_dead = S.spread(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    assert np64(one_dead)[1] == np.inf
    np.testing.assert_allclose(np64(one_dead), spread(np.array([0.0, 1, 2, 3])))
    # NaN / Inf entries are ignored
    x = torch.tensor([1.0, math.nan, 4.0, math.inf, 2.0])
    np.testing.assert_allclose(np64(S.spread(x)), spread(np.array([1.0, 4.0, 2.0])), rtol=1e-6)
    np.testing.assert_array_equal(np64(S.spread(torch.full((3,), math.nan))), nan4)
    # a single value
    np.testing.assert_array_equal(np64(S.spread(torch.tensor([3.0]))), [0, 1, 1, 0])
    # one non-zero among n: Gini (n-1)/n
    x = torch.zeros(10)
    x[3] = 5.0
    assert float(S.spread(x)[3]) == pytest.approx(0.9)
    assert gini(np64(x)) == pytest.approx(0.9)


def test_spread_batched_equals_individual():
    rs = [torch.rand(n) + 0.1 for n in (3, 17, 1, 40, 17, 3)]  # equal lengths share a sort
    rs[1][4] = math.nan
    rs[5][0] = 0.0
    batched = S.spread_batched(rs)
    assert batched.shape == (6, 4)
    for k, r in enumerate(rs):
        np.testing.assert_allclose(np64(batched[k]), np64(S.spread(r)), rtol=1e-6)


@pytest.mark.parametrize("layout", ["linear", "conv1d", "embedding"])
def test_scale_normalized_gradient_has_no_spread(layout):
    g = heavy(SHAPES[layout], seed=5, dtype=torch.float64)
    r = S.unit_rms(g, layout)
    shape = (-1, 1) if layout == "linear" else (1, -1)
    normalized = g / r.reshape(shape)
    np.testing.assert_allclose(np64(S.spread(S.unit_rms(normalized, layout))), [0, 1, 1, 0],
                               atol=1e-12)


@pytest.mark.parametrize("bins", [1, 5, 32])
def test_log_histogram_counts(bins):
    g = torch.Generator().manual_seed(bins)
    x = torch.exp(3 * torch.randn(500, generator=g))
    x[:7] = 0.0
    x[7] = math.nan
    x[8] = math.inf
    edges, counts = S.log_histogram(x, bins=bins)
    assert edges.shape == (bins + 1,) and counts.shape == (bins + 1,)
    xe = np64(x)
    fin = xe[np.isfinite(xe)]
    pos = fin[fin > 0]
    e = np64(edges)
    assert e[0] == pos.min() and e[-1] == pos.max()
    np.testing.assert_allclose(np.diff(np.log(e)), np.log(pos.max() / pos.min()) / bins,
                               rtol=1e-4)
    ref, _ = np.histogram(pos, bins=e)
    np.testing.assert_array_equal(np64(counts), np.concatenate([[7], ref]))
    assert float(counts.sum()) == fin.size


def test_log_histogram_degenerate():
    edges, counts = S.log_histogram(torch.zeros(4), bins=3)
    np.testing.assert_array_equal(np64(counts), [4, 0, 0, 0])
    assert bool(torch.all(edges[1:] >= edges[:-1]))
    edges, counts = S.log_histogram(torch.full((5,), 0.25), bins=4)
    np.testing.assert_array_equal(np64(counts), [0, 5, 0, 0, 0])
    assert float(edges[0]) == 0.25 and bool(torch.all(edges[1:] > edges[:-1]))
    with pytest.raises(ValueError):
        S.log_histogram(torch.ones(3), bins=0)


def test_histogram_moments():
    x = torch.tensor([0.5, math.nan, 2.0, 0.0, math.inf, 4.0], dtype=torch.float64)
    np.testing.assert_allclose(np64(S.histogram_moments(x)), [0, 4, 4, 6.5, 0.25 + 4 + 16])
    assert np.isnan(np64(S.histogram_moments(torch.full((2,), math.nan)))[:2]).all()


def test_sorted_quantile_matches_numpy():
    x = torch.rand(23, dtype=torch.float64)
    xs, _ = torch.sort(x)
    n = torch.tensor(23.0, dtype=torch.float64)
    for q in (0.0, 0.1, 0.5, 0.99, 1.0):
        assert float(S.sorted_quantile(xs, n, q)) == pytest.approx(np.quantile(np64(x), q))
    with pytest.raises(ValueError):
        S.sorted_quantile(xs, n, 1.5)


def test_batched_histograms_equal_individual():
    g = torch.Generator().manual_seed(3)
    rs = [torch.exp(torch.randn(n, generator=g)) for n in (40, 9, 40, 9, 1)]
    rs[2][5] = 0.0
    rs[3][:] = math.nan
    rs.append(torch.empty(0))
    hists = S.log_histograms(rs, bins=6)
    moments = S.histograms_moments(rs)
    assert len(hists) == len(rs) and moments.shape == (len(rs), 5)
    for k, r in enumerate(rs):
        edges, counts = S.log_histogram(r, bins=6)
        np.testing.assert_array_equal(np64(hists[k][0]), np64(edges))
        np.testing.assert_array_equal(np64(hists[k][1]), np64(counts))
        np.testing.assert_array_equal(np64(moments[k]), np64(S.histogram_moments(r)))
    ref, _ = np.histogram(np64(rs[0]), bins=np64(hists[0][0]))
    np.testing.assert_array_equal(np64(hists[0][1])[1:], ref)
    assert float(hists[5][1].sum()) == 0.0 and float(moments[5][2]) == 0.0


def test_unit_sq_norms_propagating_matches_the_masked_kernel_and_propagates():
    import numpy as np

    from gradlens import stats as S

    rng = np.random.default_rng(4)
    for layout, shape in (("linear", (6, 5)), ("conv1d", (5, 6)), ("embedding", (7, 3)),
                          ("other", (4, 2, 3))):
        g = torch.from_numpy(rng.standard_normal(shape))
        units = g.reshape(g.shape[0], -1).numpy()
        if layout in ("conv1d", "embedding"):
            units = units.T
        ref = (units.astype(np.float64) ** 2).sum(axis=1)
        np.testing.assert_allclose(S.unit_sq_norms_propagating(g, layout).numpy(), ref,
                                   rtol=1e-13)
        np.testing.assert_allclose(S.unit_sq_norms(g, layout).numpy(), ref, rtol=1e-13)
    g = torch.randn(4, 3)
    g[1, 2] = float("inf")
    out = S.unit_sq_norms_propagating(g, "linear")
    assert torch.isinf(out[1]) and torch.isfinite(out[[0, 2, 3]]).all()
    # the strided axis (units are columns) takes the sum-of-squares path: same propagation
    g = torch.randn(5, 3)
    g[2, 1] = float("nan")
    out = S.unit_sq_norms_propagating(g, "embedding")
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
    np.testing.assert_allclose(out[[0, 2]].numpy(), (g[:, [0, 2]].double() ** 2).sum(0).numpy(),
                               rtol=1e-6)
    for layout in ("linear", "embedding"):
        bf = torch.randn(4, 8).to(torch.bfloat16)
        out = S.unit_sq_norms_propagating(bf, layout)
        units = bf.double() if layout == "linear" else bf.double().T
        assert out.dtype == torch.float32
        np.testing.assert_allclose(out.numpy(), (units ** 2).sum(1).numpy(), rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_summary_and_axis_sq_norms_16bit_in_float32(dtype):
    g = heavy(SHAPES["embedding"], seed=5, n_bad=3, dtype=dtype)
    summary, unit, fan = S.summary_and_axis_sq_norms(g, "embedding")
    assert summary.dtype == unit.dtype == fan.dtype == torch.float32
    m = units(np64(g), "embedding")
    fin = np.where(np.isfinite(m), m, 0.0)
    np.testing.assert_allclose(np64(unit), (fin**2).sum(1), rtol=1e-5)
    np.testing.assert_allclose(np64(fan), (fin**2).sum(0), rtol=1e-5)
    np.testing.assert_allclose(np64(summary), [(fin**2).sum(), np.abs(fin).max(), 3, m.size],
                               rtol=1e-5)


def test_grad_summaries_with_axes_equals_the_separate_kernels():
    grads = [heavy(SHAPES["linear"], seed=6, n_bad=2, dtype=torch.float32),
             heavy((7,), seed=7, n_bad=1, dtype=torch.float32),
             heavy(SHAPES["embedding"], seed=8, n_bad=0, dtype=torch.float64)]
    layouts = ["linear", None, "embedding"]
    summary, axes = S.grad_summaries_with_axes(grads, layouts)
    assert summary.dtype == torch.float64 and sorted(axes) == [0, 2]  # the float64 rule
    np.testing.assert_allclose(np64(summary), np64(S.grad_summaries(grads)), rtol=1e-6)
    for k in (0, 2):
        np.testing.assert_allclose(np64(axes[k][0]), np64(S.unit_sq_norms(grads[k], layouts[k])),
                                   rtol=1e-6)
        np.testing.assert_allclose(np64(axes[k][1]), np64(S.fan_sq_norms(grads[k], layouts[k])),
                                   rtol=1e-6)


def test_grad_summaries_with_axes_batched_per_shape_match_numpy():
    """Groups of one shape, dtype and layout share one stacked pass: each tensor's summary and
    both axes' squared norms equal float64 numpy on that tensor alone (non-finite entries,
    one shape under two layouts, transposed shapes of one numel, a 3-D ``other``, a bf16
    matrix beside float32 ones, an empty matrix, vectors)."""
    specs = [((16, 8), "linear", 1), ((16, 8), "embedding", 2), ((16, 8), "linear", 0),
             ((8, 16), "linear", 3), ((5,), None, 1), ((4, 3, 2), "other", 1),
             ((4, 3, 2), "other", 0), ((16, 8), "conv1d", 1), ((7,), None, 0),
             ((16, 8), "linear", 2)]
    grads = [heavy(s, seed=30 + i, n_bad=b, dtype=torch.float32)
             for i, (s, _, b) in enumerate(specs)]
    grads[-1] = grads[-1].to(torch.bfloat16)
    grads.append(torch.empty(0, 4))
    layouts = [lay for _, lay, _ in specs] + ["linear"]
    summary, axes = S.grad_summaries_with_axes(grads, layouts)
    assert summary.shape == (len(grads), 4) and summary.dtype == torch.float32
    assert sorted(axes) == [k for k, lay in enumerate(layouts) if lay is not None]
    for k, (g, lay) in enumerate(zip(grads, layouts, strict=True)):
        m = np64(g)
        fin = np.where(np.isfinite(m), m, 0.0)
        ref = [(fin**2).sum(), np.abs(fin).max() if m.size else 0.0,
               (~np.isfinite(m)).sum(), m.size]
        np.testing.assert_allclose(np64(summary[k]), ref, rtol=1e-5)
        if lay is not None:
            u = units(fin, lay)
            np.testing.assert_allclose(np64(axes[k][0]), (u**2).sum(1), rtol=1e-5)
            np.testing.assert_allclose(np64(axes[k][1]), (u**2).sum(0), rtol=1e-5)


@pytest.mark.parametrize("kept", [False, True])
def test_grad_summaries_with_axes_planned_stacks_match_numpy(monkeypatch, kept):
    """Through a plan's buffer (kept between calls or one-off), stacks split at a small
    size, a tensor larger than a stack in chunks of whole memory rows (float32 and bf16, units
    along the rows and across them, a row longer than a stack):
    per-unit / per-fan squared norms and the sum of squares equal float64 numpy to float32
    summation rounding (a few hundred terms: rtol 1e-5); the largest magnitude and the
    non-finite count are exact; calls with new values do not change earlier results."""
    monkeypatch.setattr("gradlens.stats.summary_plan.PLAN_STACK_ENTRIES", 200)
    specs = [((12, 7), "linear", 2, torch.float32), ((12, 7), "linear", 0, torch.float32),
             ((12, 7), "embedding", 1, torch.float32), ((30, 10), "embedding", 3,
             torch.float32), ((30, 10), "linear", 0, torch.bfloat16), ((6, 2, 3), "other",
             1, torch.float32), ((7, 12), "conv1d", 0, torch.float32), ((9,), None, 1,
             torch.float32), ((12, 7), "linear", 1, torch.float32), ((0, 4), "linear", 0,
             torch.float32), ((3, 250), "linear", 1, torch.float32), ((3, 250), "embedding",
             2, torch.float32)]  # the last two: a memory row longer than a stack
    layouts = [lay for _, lay, _, _ in specs]
    plans = S.SummaryPlans() if kept else None
    kept_results = []
    for call in range(3):
        grads = [heavy(s, seed=60 + 10 * call + i, n_bad=b, dtype=d)
                 for i, (s, _, b, d) in enumerate(specs)]
        summary, axes = S.grad_summaries_with_axes(grads, layouts, plans=plans)
        kept_results.append((grads, summary, axes))
    for grads, summary, axes in kept_results:
        assert sorted(axes) == [k for k, lay in enumerate(layouts) if lay is not None]
        for k, (g, lay) in enumerate(zip(grads, layouts, strict=True)):
            m = np64(g)
            fin = np.where(np.isfinite(m), m, 0.0)
            got = np64(summary[k])
            np.testing.assert_allclose(got[0], (fin**2).sum(), rtol=1e-5)
            assert got[1] == (np.abs(fin).max() if m.size else 0.0)  # exact
            assert got[2] == (~np.isfinite(m)).sum() and got[3] == m.size
            if lay is not None:
                u = units(fin, lay)
                np.testing.assert_allclose(np64(axes[k][0]), (u**2).sum(1), rtol=1e-5)
                np.testing.assert_allclose(np64(axes[k][1]), (u**2).sum(0), rtol=1e-5)
    if kept:
        assert len(plans._plans) == 1


def test_grad_summaries_with_axes_rejects_bad_layouts():
    with pytest.raises(ValueError, match="unknown layout 'rows'"):
        S.grad_summaries_with_axes([torch.ones(3, 2)], ["rows"])
    with pytest.raises(ValueError, match="needs a matrix"):
        S.grad_summaries_with_axes([torch.ones(3)], ["linear"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sort_rows_equals_numpy_sort_exactly(dtype):
    """The integer-key sort gives numpy's sorted values exactly: negative and positive
    values, both zeros, both infinities, subnormals, ties, rows of several lengths."""
    g = torch.Generator().manual_seed(3)
    tiny = torch.finfo(dtype).tiny
    for n_rows, n in ((1, 1), (5, 64), (3, 173), (2, 4096)):
        x = (torch.randn(n_rows, n, generator=g, dtype=torch.float64)
             * torch.exp(4 * torch.randn(n_rows, 1, generator=g, dtype=torch.float64)))
        x = x.to(dtype)
        flat = x.view(-1)
        specials = [0.0, -0.0, math.inf, -math.inf, tiny / 4, -tiny / 8, 1.5, 1.5]
        for j, v in enumerate(specials[: flat.numel()]):
            flat[(j * 37) % flat.numel()] = v
        got = S.sort_rows(x)
        assert got.dtype == dtype and got.shape == x.shape
        ref = np.sort(x.double().numpy(), axis=-1)
        np.testing.assert_array_equal(got.double().numpy(), ref)
        # where the zeros' signs land is the only freedom: the same bits elsewhere
        nonzero = got != 0
        assert torch.equal(got[nonzero], torch.sort(x, dim=-1).values[nonzero])
