"""Stacked temporal states (one update for many same-shaped matrices) against the weighted
float64 reference and against the per-matrix update they replace."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradlens import stats as S
from gradlens.stats.temporal_groups import TemporalStack
from tests.stats._reference import scale_normalize, temporal_reference


def _steps(rng, rows: int, steps: int, shape=(5, 4)) -> list[list[np.ndarray | None]]:
    """Per step, one gradient per row (None: the row has none at that step); row 1 has a NaN
    at step 2 (that step is skipped for it alone), row 2 none at steps 1 and 3."""
    out = []
    for s in range(steps):
        gs = [rng.normal(size=shape) * rng.uniform(0.1, 3, size=(shape[0], 1)) + 0.5
              for _ in range(rows)]
        if s == 2:
            gs[1][1, 2] = np.nan
        if s in (1, 3):
            gs[2] = None
        out.append(gs)
    return out


@pytest.mark.parametrize("layout", ["linear", "embedding"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_stack_matches_the_weighted_reference_per_row(layout, unbiased):
    """float64: each row's variance, signal and normalized variance equal the float64
    reference over that row's own finite steps (absent and non-finite steps left out)."""
    rng = np.random.default_rng(7)
    beta, rows = 0.7, 3
    steps = _steps(rng, rows, 6)
    stack = TemporalStack(rows, (5, 4), layout, torch.float64, torch.device("cpu"), [0, 1, 2])
    zero = torch.zeros(5, 4, dtype=torch.float64)
    for gs in steps:
        grads = [None if g is None else torch.from_numpy(g) for g in gs]
        ok = torch.tensor([g is not None and bool(np.isfinite(g).all()) for g in gs])
        stack.update_(grads, beta, ok, zero)
    var, msq, var_n = stack.readout(unbiased)
    for j in range(rows):
        mine = [gs[j] for gs in steps if gs[j] is not None]
        ref_var, ref_msq = temporal_reference(mine, beta, unbiased)
        ref_n, _ = temporal_reference([scale_normalize(g, layout) for g in mine], beta,
                                      unbiased)
        assert float(var[j]) == pytest.approx(ref_var, rel=1e-10)
        assert float(msq[j]) == pytest.approx(ref_msq, rel=1e-10)
        assert float(var_n[j]) == pytest.approx(ref_n, rel=1e-10)
    assert [stack.state(j)["count"] for j in range(rows)] == [6, 6, 4]
    assert [float(stack.state(j)["n"]) for j in range(rows)] == [6, 5, 4]


@pytest.mark.parametrize("layout", ["linear", "embedding"])
def test_stack_rows_equal_per_matrix_updates_float32(layout):
    """float32: every buffer of every row equals temporal_update_ on that matrix alone
    (the EMA of g and the counts bit for bit; what goes through per-unit sums within float32
    rounding, rtol 1e-6), and
    the row views are what temporal_readout reads."""
    rng = np.random.default_rng(3)
    beta, rows = 0.9, 3
    steps = _steps(rng, rows, 5, shape=(6, 8))
    stack = TemporalStack(rows, (6, 8), layout, torch.float32, torch.device("cpu"), [0, 1, 2])
    alone = [S.temporal_init(torch.zeros(6, 8)) for _ in range(rows)]
    zero = torch.zeros(6, 8)
    for gs in steps:
        grads = [None if g is None else torch.from_numpy(g).float() for g in gs]
        ok = torch.tensor([g is not None and bool(torch.isfinite(g).all()) for g in grads])
        stack.update_(grads, beta, ok, zero)
        for j, g in enumerate(grads):
            if g is not None:
                S.temporal_update_(alone[j], g, layout, beta, finite=ok[j])
    for j in range(rows):
        st = stack.state(j)
        assert st["count"] == alone[j]["count"] and st["beta"] == beta
        for key in ("mean", "n"):  # elementwise from the same values: bit for bit
            torch.testing.assert_close(st[key], alone[j][key], rtol=0, atol=0)
        for key in ("sq", "mean_n", "sq_n"):  # through per-unit sums: float32 rounding
            torch.testing.assert_close(st[key], alone[j][key], rtol=1e-6, atol=0)
        got, ref = S.temporal_readout(st), S.temporal_readout(alone[j])
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    batched = stack.readout()
    for j in range(rows):
        for a, b in zip(batched, S.temporal_readout(alone[j]), strict=True):
            torch.testing.assert_close(a[j], b, rtol=1e-5, atol=0)


def test_load_and_validation():
    """A saved exact state loads into a row; sketched states, vectors and a changed beta are
    refused; before any update the readout is NaN."""
    stack = TemporalStack(2, (3, 2), "linear", torch.float32, torch.device("cpu"), [0, 1])
    assert all(math.isnan(float(v)) for out in stack.readout() for v in out)
    st = S.temporal_init(torch.zeros(3, 2))
    S.temporal_update_(st, torch.ones(3, 2), "linear", 0.9)
    stack.load(1, st)
    assert stack.state(1)["count"] == 1 and float(stack.n[1]) == 1
    torch.testing.assert_close(stack.mean[1], st["mean"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="exact"):
        stack.load(0, S.temporal_init(torch.zeros(3, 2), sketch_dim=4))
    with pytest.raises(ValueError, match="matrices"):
        TemporalStack(1, (3,), "linear", torch.float32, torch.device("cpu"), [0])
    with pytest.raises(ValueError, match="beta"):
        stack.update_([torch.ones(3, 2)] * 2, 0.5, torch.tensor([True, True]), None)
