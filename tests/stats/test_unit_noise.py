"""The per-unit noise-to-signal's rounding floor, against exact rational arithmetic.

Property: for micro-batch gradients where some units get gradient from one micro-batch only
(their exact signal is 0), the lens's ``unit_nsr`` median and mean in float32 and float64
equal the exact ones (``fractions.Fraction`` from the very values the lens reads, units with an
exact signal <= 0 excluded): the floor removes the zero-signal units, and keeps every unit
whose signal is real.
"""

from __future__ import annotations

import math
import statistics
from fractions import Fraction

import pytest
import torch

from gradlens import stats as S


def _case(seed: int, dtype: torch.dtype, K: int, units: int = 24, fan: int = 16):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(units, fan, generator=g, dtype=torch.float64)
    grads = [mean + 0.7 * torch.randn(units, fan, generator=g, dtype=torch.float64)
             for _ in range(K)]
    only_first = torch.rand(units, generator=g) < 0.3  # units seen in micro-batch 0 only
    only_first[0] = True
    for k in range(1, K):
        grads[k][only_first] = 0.0
    return [x.to(dtype) for x in grads], only_first


def _exact(grads: list[torch.Tensor], b: int) -> tuple[float, float]:
    """Median and mean of trace_i / signal_i in exact arithmetic (signal_i > 0 kept)."""
    K = len(grads)
    rows = [[[Fraction(float(x)) for x in row] for row in gk.double()] for gk in grads]
    ratios = []
    for i in range(len(rows[0])):
        small = sum(sum(x * x for x in rows[k][i]) for k in range(K)) / K
        big_vec = [sum(rows[k][i][j] for k in range(K)) / K for j in range(len(rows[0][i]))]
        big = sum(x * x for x in big_vec)
        bs, bb = b, K * b
        signal = (bb * big - bs * small) / (bb - bs)
        trace = (small - big) / (Fraction(1, bs) - Fraction(1, bb))
        if signal > 0:
            ratios.append(trace / signal)
    return float(statistics.median(ratios)), float(sum(ratios) / len(ratios))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-3)])
@pytest.mark.parametrize("seed", range(6))
def test_units_from_one_microbatch(seed, dtype, tol):
    K, b = 2 + seed % 3, 4
    grads, only_first = _case(seed, dtype, K)
    # what the lens computes: per-unit squared norms of each micro-batch's mean gradient and
    # of the step's gradient, in the gradients' dtype
    small = torch.stack([S.unit_sq_norms(gk, "linear") for gk in grads]).mean(0)
    big = S.unit_sq_norms(sum(grads) / K, "linear")
    median, mean = S.unit_noise_to_signal(small, big, b, K * b)
    want_median, want_mean = _exact(grads, b)
    assert float(median) == pytest.approx(want_median, rel=tol)
    assert float(mean) == pytest.approx(want_mean, rel=tol)
    ratios = S.unit_noise_to_signal_ratios(small, big, b, K * b)
    assert torch.isnan(ratios[only_first]).all()  # exactly the zero-signal units go
    assert torch.isfinite(ratios[~only_first]).all()


def test_without_floor_rounding_explodes():
    """The failure the floor prevents: with the sign rule alone a zero-signal unit's ratio
    is 1/rounding (checks that the property above is not vacuous)."""
    grads, only_first = _case(1, torch.float32, 3)  # 1/3: rounding (1/2 would be exact)
    small = torch.stack([S.unit_sq_norms(gk, "linear") for gk in grads]).mean(0)
    big = S.unit_sq_norms(sum(grads) / 3, "linear")
    signal, trace = S.two_batch_unit_estimates(small, big, 4, 12)
    residual = signal[only_first]
    assert (residual != 0).any()  # rounding leaves them off zero
    r = (trace[only_first] / residual).abs()
    assert float(r[residual != 0].max()) > 1e4


def test_signal_floor_scale():
    """The floor is FLOOR eps (|t1| + |t2|) / |den| in the named dtype."""
    t1, t2 = torch.tensor([1.0, 4.0]), torch.tensor([1.0, -2.0])
    got = S.signal_floor(t1, t2, -2.0, torch.float32)
    eps = torch.finfo(torch.float32).eps
    assert got.tolist() == pytest.approx([S.FLOOR * eps * 2 / 2, S.FLOOR * eps * 6 / 2])
    assert math.isclose(S.FLOOR, 32.0)
