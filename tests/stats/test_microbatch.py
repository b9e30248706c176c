"""Batched micro-batch squared norms against a float64 per-tensor reference."""

from __future__ import annotations

import math

import pytest
import torch

from gradlens.roles import output_units_view
from gradlens.stats.microbatch import micro_sq_norms


def _reference(g: torch.Tensor, layout: str | None):
    x = g.double()
    if layout is None:
        return None, x.square().sum()
    u = output_units_view(x, layout).square().sum(1)
    return u, u.sum()


def test_micro_sq_norms_matches_float64_per_tensor(monkeypatch):
    monkeypatch.setattr("gradlens.stats.norms.STACK_ENTRIES", 40)  # stacks split in chunks
    g = torch.Generator().manual_seed(0)
    shapes = [((6, 5), "linear"), ((7,), None), ((6, 5), "linear"), ((6, 5), "embedding"),
              ((3, 2, 4), "other"), ((6, 5), "conv1d"), ((6, 5), "linear"), ((7,), None),
              ((4,), None)]
    grads = [torch.randn(s, generator=g) for s, _ in shapes]
    grads.append(torch.randn(5, 3, generator=g, dtype=torch.float64))
    layouts = [lay for _, lay in shapes] + ["linear"]
    grads.append(torch.randn(5, 3, generator=g).to(torch.bfloat16))
    layouts.append("linear")
    out = micro_sq_norms(grads, layouts)
    for (unit, sq), gr, lay in zip(out, grads, layouts, strict=True):
        ref_u, ref_sq = _reference(gr, lay)
        # float32 sums of <= 30 squares: relative rounding ~ 30 * 6e-8
        assert sq.dtype == (torch.float64 if gr.dtype == torch.float64 else torch.float32)
        assert float(sq) == pytest.approx(float(ref_sq), rel=1e-5)
        if lay is None:
            assert unit is None
        else:
            torch.testing.assert_close(unit.double(), ref_u, rtol=1e-5, atol=0)


def test_a_non_finite_entry_propagates_to_its_unit_and_total_only():
    a = torch.ones(3, 4)
    a[1, 2] = math.nan
    b = torch.ones(3, 4)
    (ua, sa), (ub, sb) = micro_sq_norms([a, b], ["linear", "linear"])
    assert math.isnan(float(sa)) and math.isnan(float(ua[1]))
    assert ua[0] == 4 and ua[2] == 4 and float(sb) == 12 and torch.equal(ub, torch.full((3,), 4.0))
