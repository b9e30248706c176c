"""Gradient summaries against float64 numpy, with NaN/Inf entries."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradlens import stats as S
from tests.stats._reference import np64, summary


def poisoned(shape, n_bad: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    flat = t.view(-1)
    idx = torch.randperm(flat.numel(), generator=g)[:n_bad]
    for j, i in enumerate(idx.tolist()):
        flat[i] = (math.nan, math.inf, -math.inf)[j % 3]
    return t.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_bad", [0, 1, 7])
def test_grad_summary_matches_numpy(dtype, n_bad):
    g = poisoned((37, 23), n_bad, seed=n_bad, dtype=dtype)
    got = S.grad_summary(g)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == (4,)
    ref = summary(np64(g))
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(np64(got), ref, rtol=rtol)
    # the pieces agree with the summary
    assert float(S.finite_sq_norm(g)) == pytest.approx(ref[0], rel=rtol)
    assert float(S.finite_max_abs(g)) == pytest.approx(ref[1], rel=rtol)
    assert float(S.nonfinite_count(g)) == ref[2]


def test_input_untouched_and_edge_cases():
    g = poisoned((5, 4), 3, seed=1)
    before = g.clone()
    S.grad_summary(g)
    S.grad_summaries([g], foreach=True)
    assert torch.equal(torch.isnan(g), torch.isnan(before))
    assert torch.equal(torch.nan_to_num(g), torch.nan_to_num(before))
    # all non-finite: norm and max 0, count = numel
    bad = torch.full((3, 3), math.nan)
    np.testing.assert_array_equal(np64(S.grad_summary(bad)), [0, 0, 9, 9])
    # empty and 0-d tensors
    np.testing.assert_array_equal(np64(S.grad_summary(torch.empty(0, 4))), [0, 0, 0, 0])
    np.testing.assert_allclose(np64(S.grad_summary(torch.tensor(-2.0))), [4, 2, 0, 1])
    # a non-contiguous view
    v = poisoned((8, 6), 2, seed=2).t()
    np.testing.assert_allclose(np64(S.grad_summary(v)), summary(np64(v)), rtol=1e-5)


@pytest.mark.parametrize("foreach", [False, True, None])
def test_grad_summaries_batched(foreach):
    grads = [poisoned(s, k, seed=i) for i, (s, k) in
             enumerate([((16, 8), 0), ((32,), 2), ((4, 3, 5), 1), ((7, 9), 0)])]
    out = S.grad_summaries(grads, foreach=foreach)
    assert out.shape == (4, 4) and out.dtype == torch.float32
    for k, g in enumerate(grads):
        np.testing.assert_allclose(np64(out[k]), summary(np64(g)), rtol=1e-5)


def test_foreach_and_loop_paths_agree_float64():
    grads = [poisoned(s, k, seed=10 + i, dtype=torch.float64)
             for i, (s, k) in enumerate([((20, 10), 3), ((10,), 0), ((3, 50), 1)])]
    a = S.grad_summaries(grads, foreach=False)
    b = S.grad_summaries(grads, foreach=True)
    assert a.dtype == b.dtype == torch.float64
    np.testing.assert_allclose(np64(a), np64(b), rtol=1e-12, atol=0)
    # mixed precisions stack in float64
    mixed = S.grad_summaries([grads[0], grads[1].float()])
    assert mixed.dtype == torch.float64


@pytest.mark.parametrize("max_abs", [True, False])
def test_grouped_summaries_match_numpy_per_tensor(max_abs):
    """The default path batches per group of one shape and dtype: rows in the input order,
    each equal to float64 numpy on its own tensor (non-finite entries, transposed shapes of
    one numel in two groups, bf16 and float16 beside float32, an empty and a 0-d tensor)."""
    specs = [((16, 8), 0, torch.float32), ((8, 16), 3, torch.float32), ((32,), 2, torch.float32),
             ((16, 8), 1, torch.float32), ((16, 8), 0, torch.bfloat16), ((5, 3), 4, torch.float16),
             ((0, 4), 0, torch.float32), ((), 0, torch.float32), ((16, 8), 7, torch.float32)]
    grads = [poisoned(s, k, seed=20 + i, dtype=d) for i, (s, k, d) in enumerate(specs)]
    grads[6] = torch.empty(0, 4)
    out = S.grad_summaries(grads, max_abs=max_abs)
    assert out.shape == (len(grads), 4) and out.dtype == torch.float32
    for k, g in enumerate(grads):
        ref = np.asarray(summary(np64(g))) if g.numel() else np.zeros(4)
        cols = [0, 1, 2, 3] if max_abs else [0, 2, 3]
        np.testing.assert_allclose(np64(out[k])[cols], ref[cols], rtol=1e-5)
    assert S.shape_groups(grads) == [[0, 3, 8], [1], [2], [4], [5], [6], [7]]
    # stacks stay under STACK_ENTRIES entries (one tensor at least): 2 of 2**15 per stack
    big = [torch.ones(1 << 15)] * 3 + [torch.ones((1 << 16) + 1)] * 2
    assert S.shape_groups(big) == [[0, 1], [2], [3], [4]]
    for g, before in zip(grads, [poisoned(s, k, seed=20 + i, dtype=d)
                                 for i, (s, k, d) in enumerate(specs)], strict=True):
        if g.numel():  # inputs untouched
            assert torch.equal(torch.nan_to_num(g), torch.nan_to_num(before.reshape(g.shape)))


@pytest.mark.parametrize("max_abs", [True, False])
def test_kept_plans_equal_one_off_calls(monkeypatch, max_abs):
    """A collector's kept plans give a one-tensor group_summary's numbers bit for bit, call
    after call with other values (earlier results untouched by the buffer's reuse),
    non-finite entries included; tensors larger than a stack (float32 and bf16, summed in
    chunks of a stack, the last one partial) within float32 rounding of the sum; every row
    matches float64 numpy."""
    monkeypatch.setattr("gradlens.stats.norms.STACK_ENTRIES", 300)
    monkeypatch.setattr("gradlens.stats.summary_plan.PLAN_STACK_ENTRIES", 300)
    specs = [((16, 8), 2, torch.float32), ((16, 8), 0, torch.float32), ((40, 10), 5,
             torch.float32), ((30, 12), 1, torch.bfloat16), ((7,), 1, torch.float32),
             ((16, 8), 1, torch.float32), ((0, 3), 0, torch.float32), ((8, 16), 0,
             torch.bfloat16)]
    plans = S.SummaryPlans()
    kept = []
    for call in range(3):
        grads = [poisoned(s, k, seed=40 + 10 * call + i, dtype=d)
                 for i, (s, k, d) in enumerate(specs)]
        got = S.grad_summaries(grads, max_abs=max_abs, plans=plans)
        kept.append((got, got.clone()))
        for k, g in enumerate(grads):
            ref = np.asarray(summary(np64(g))) if g.numel() else np.zeros(4)
            cols = [0, 1, 2, 3] if max_abs else [0, 2, 3]
            np.testing.assert_allclose(np64(got[k])[cols], ref[cols], rtol=1e-5)
            if g.numel():  # the stacked rows equal a one-tensor group_summary's
                acc = torch.float32
                one = S.norms.group_summary([g], acc, max_abs)[0]
                # a tensor larger than a stack is summed in chunks: another order of float32
                # sums of <= 400 non-negative terms (pairwise: a few eps apart); max and
                # count are exact
                chunked = g.numel() > 300
                torch.testing.assert_close(got[k][cols[:1]], one[cols[:1]],
                                           rtol=1e-6 if chunked else 0, atol=0)
                torch.testing.assert_close(got[k][cols[1:]], one[cols[1:]], rtol=0, atol=0,
                                           equal_nan=True)
    assert len(plans._plans) == 1  # one signature, one plan
    cols = [0, 1, 2, 3] if max_abs else [0, 2, 3]  # without max_abs: a NaN column
    for got, at_return in kept:  # earlier results unchanged by later calls (buffer reuse)
        torch.testing.assert_close(got, at_return, rtol=0, atol=0, equal_nan=True)
    # a different list (a layer without gradient: a 0-d stand-in) gets its own plan
    S.grad_summaries([torch.zeros(()), *grads[1:]], plans=plans)
    assert len(plans._plans) == 2


def test_grad_summaries_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        S.grad_summaries([])
    with pytest.raises(ValueError, match="one device"):
        S.grad_summaries([torch.ones(2), torch.ones(2, device="meta")])
    with pytest.raises(ValueError, match="at least one"):  # the same with kept plans
        S.grad_summaries([], plans=S.SummaryPlans())
    with pytest.raises(ValueError, match="one device"):
        S.grad_summaries([torch.ones(2), torch.ones(2, device="meta")], plans=S.SummaryPlans())


def test_finite_sum_skips_nonfinite():
    x = torch.tensor([1.0, math.nan, 2.5, math.inf, -0.5])
    assert float(S.finite_sum(x)) == 3.0
    assert float(S.nonfinite_count(x)) == 2.0


@pytest.mark.parametrize("foreach", [False, True, None])
def test_grad_summaries_without_max_abs_keep_the_other_columns(foreach):
    """``max_abs=False`` (the lens's unlogged steps) skips one pass: NaN in that column, the
    other columns exactly as with it, non-finite entries included."""
    g = [torch.randn(6, 5), torch.randn(7), torch.randn(3, 2, 2)]
    g[0][1, 2] = float("nan")
    g[2][0, 0, 1] = float("-inf")
    full = S.grad_summaries(g, foreach=foreach)
    lean = S.grad_summaries(g, foreach=foreach, max_abs=False)
    assert torch.isnan(lean[:, 1]).all()
    torch.testing.assert_close(lean[:, [0, 2, 3]], full[:, [0, 2, 3]], rtol=0, atol=0)
    assert full[:, 2].tolist() == [1.0, 0.0, 1.0]


def test_sq_norms_matches_float64_numpy():
    """One multi-tensor reduction: each tensor's squared norm (float64 numpy), NaN for None,
    bf16 accumulated in float32, a non-finite entry non-finite (not masked)."""
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(7, 5, generator=g), None, torch.randn(3, generator=g) * 1e3,
          torch.randn(2, 3, 4, generator=g).to(torch.bfloat16)]
    got = S.sq_norms(xs, torch.float32)
    assert got.dtype == torch.float32 and got.shape == (4,)
    for k, x in enumerate(xs):
        if x is None:
            assert math.isnan(float(got[k]))
            continue
        want = float((x.double().numpy() ** 2).sum())
        assert float(got[k]) == pytest.approx(want, rel=1e-6)
    f64 = [torch.randn(9, generator=g, dtype=torch.float64)]
    assert float(S.sq_norms(f64, torch.float64)[0]) == pytest.approx(
        float((f64[0].numpy() ** 2).sum()), rel=1e-14)
    bad = torch.ones(4)
    bad[1] = float("inf")
    assert not math.isfinite(float(S.sq_norms([bad, torch.ones(2)], torch.float32)[0]))
    assert math.isnan(float(S.sq_norms([None, None], torch.float32)[1]))


def test_rowwise_max_abs_is_the_largest_magnitude_of_each_row():
    """Against a float64 per-row reference: rows whose largest magnitude is negative,
    positive, zero, a single column; exact (a max is not rounded)."""
    from gradlens.stats.norms import rowwise_max_abs

    g = torch.Generator().manual_seed(3)
    c = torch.randn(5, 7, generator=g)
    c[1] = -c[1].abs() - 1  # largest magnitude negative
    c[2] = 0.0
    c[3, 4] = 50.0
    for x in (c, c[:, :1], c.double()):
        ref = torch.tensor([max(abs(v) for v in row.tolist()) for row in x.double()])
        assert torch.equal(rowwise_max_abs(x).double(), ref)
        assert rowwise_max_abs(x).dtype == x.dtype


def test_cpu_summaries_make_no_rowwise_aminmax(monkeypatch):
    """On CPU a row-wise ``aminmax`` is 10-20x slower than ``amin`` and ``amax`` (torch 2.13):
    neither the kept plans nor the one-off grouped path may call it (it once cost a logged
    step at 291 tensors 5 ms of its 7 ms summary)."""
    real, rowwise = torch.aminmax, []

    def spy(x, *args, **kwargs):
        if args or kwargs.get("dim") is not None:
            rowwise.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch, "aminmax", spy)
    grads = [torch.randn(16, 8) for _ in range(3)] + [torch.randn(7), torch.randn(8, 16)]
    ref = torch.stack([S.norms.grad_summary(g) for g in grads])
    for plans in (S.SummaryPlans(), None):
        got = S.grad_summaries(grads, plans=plans)
        torch.testing.assert_close(got, ref)
    assert rowwise == []
