"""Batched micro-batch squared norms against a float64 per-tensor reference."""

from __future__ import annotations

import math

import pytest
import torch

from gradlens.roles import output_units_view
from gradlens.stats.microbatch import MicroNorms, micro_sq_norm_stacks, micro_sq_norms


def _reference(g: torch.Tensor, layout: str | None):
    x = g.double()
    if layout is None:
        return None, x.square().sum()
    u = output_units_view(x, layout).square().sum(1)
    return u, u.sum()


def test_micro_sq_norms_matches_float64_per_tensor(monkeypatch):
    monkeypatch.setattr("gradlens.stats.microbatch.MICRO_STACK_ENTRIES", 40)  # split stacks
    g = torch.Generator().manual_seed(0)
    shapes = [((6, 5), "linear"), ((7,), None), ((6, 5), "linear"), ((6, 5), "embedding"),
              ((3, 2, 4), "other"), ((6, 5), "conv1d"), ((6, 5), "linear"), ((7,), None),
              ((4,), None)]
    grads = [torch.randn(s, generator=g) for s, _ in shapes]
    grads.append(torch.randn(5, 3, generator=g, dtype=torch.float64))
    layouts = [lay for _, lay in shapes] + ["linear"]
    grads.append(torch.randn(5, 3, generator=g).to(torch.bfloat16))
    layouts.append("linear")
    # alone in its stack (the input itself, not a copy), bf16 columns, empty tensors
    extra = [(torch.randn(9, 2, generator=g), "conv1d"), (torch.randn(4, 6, generator=g).to(
        torch.bfloat16), "embedding"), (torch.randn(4, 6, generator=g).to(torch.bfloat16),
        "embedding"), (torch.empty(0, 3), "linear"), (torch.empty(0), None),
        # columns of a matrix larger than a stack, in chunks of whole rows (10 + 3 rows; bf16;
        # a row longer than a stack)
        (torch.randn(13, 4, generator=g), "embedding"),
        (torch.randn(11, 5, generator=g).to(torch.bfloat16), "conv1d"),
        (torch.randn(2, 50, generator=g), "embedding")]
    grads += [t for t, _ in extra]
    layouts += [lay for _, lay in extra]
    before = [t.clone() for t in grads]
    out = micro_sq_norms(grads, layouts)
    assert all(torch.equal(a, b) for a, b in zip(grads, before, strict=True))  # untouched
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


def test_a_non_finite_entry_of_a_chunked_matrix_stays_in_its_unit(monkeypatch):
    """Columns of a matrix larger than a stack are summed in chunks of rows: a NaN in the
    second chunk makes its column (unit) and the total NaN, nothing else."""
    monkeypatch.setattr("gradlens.stats.microbatch.MICRO_STACK_ENTRIES", 40)
    a = torch.ones(13, 4)
    a[11, 2] = math.nan
    ((unit, sq),) = micro_sq_norms([a], ["embedding"])
    assert math.isnan(float(sq)) and math.isnan(float(unit[2]))
    assert unit[[0, 1, 3]].tolist() == [13.0, 13.0, 13.0]


def _index(t: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(t, dtype=torch.long)


def test_micro_norms_sums_match_a_float64_per_layer_loop_on_ragged_layers(monkeypatch):
    """Weighted sums over micro-batches of every layer at once, against the per-layer sum in
    float64: layers of different unit counts and layouts, 1-D parameters, a layer absent from
    one micro-batch (NaN), a layer never seen (0), a NaN entry (its unit and total), an entry
    never confirmed (left out), entries arriving out of micro-batch order, stacks split."""
    monkeypatch.setattr("gradlens.stats.microbatch.MICRO_STACK_ENTRIES", 40)
    g = torch.Generator().manual_seed(1)
    layers = [((6, 5), "linear"), ((7,), None), ((6, 5), "linear"), ((4, 3, 2), "other"),
              ((5,), None), ((6, 4), "embedding"), ((3, 6), "conv1d"), ((6, 5), "linear")]
    L, M = len(layers), 3
    w = [0.5, 2.0, 1.25]
    rows: dict[int, tuple[int, ...]] = {}
    for k, (shape, lay) in enumerate(layers):
        if lay is not None:
            U = shape[1] if lay in ("embedding", "conv1d") else shape[0]
            rows[U] = (*rows.get(U, ()), k)
    absent = {(2, 1)}  # layer 2 has no gradient in micro-batch 1
    never = {4}
    grads = {(k, m): torch.randn(layers[k][0], generator=g)
             for k in range(L) for m in range(M) if (k, m) not in absent and k not in never}
    grads[(0, 2)][1, 3] = math.nan
    norms = MicroNorms(L)

    def add(entries, extra=()):
        ks = [k for k, _ in entries] + [k for k, _ in extra]
        ms = [m for _, m in entries] + [-1] * len(extra)  # extra: read, never confirmed
        gs = [grads[e] for e in entries] + [torch.full(layers[k][0], 1e6) for k, _ in extra]
        norms.add(ks, ms, micro_sq_norm_stacks(gs, [layers[k][1] for k in ks]))
        for k, _ in entries:
            norms.count[k] += 1

    by_m = {m: [e for e in grads if e[1] == m] for m in range(M)}
    add(by_m[2][::2])  # out of order: part of micro-batch 2 first
    add(by_m[0], extra=[(3, 0), (1, 0)])
    add(by_m[1])
    add(by_m[2][1::2])
    a, counts, units, ucounts = norms.sums(w, rows, torch.float32, _index, None)
    assert counts == [M, M, M - 1, M, 0, M, M, M]
    for k, (_, lay) in enumerate(layers):
        mine = [grads[(k, m)].double() for m in range(M) if (k, m) in grads]
        if k in never:
            assert float(a[k]) == 0.0
            continue
        if len(mine) != M:
            assert math.isnan(float(a[k]))
        else:
            ref = sum(wm * x.square().sum() for wm, x in zip(w, mine, strict=True))
            if k == 0:
                assert math.isnan(float(a[k]))
            else:  # float32 sums of <= 30 squares, 3 terms: relative rounding < 1e-5
                assert float(a[k]) == pytest.approx(float(ref), rel=1e-5)
        if lay is None:
            continue
        U = next(U for U, ks in rows.items() if k in ks)
        row = units[U][rows[U].index(k)].double()
        assert ucounts[k] == len(mine)
        if len(mine) != M:
            assert torch.isnan(row).all()
            continue
        ref_u = sum(wm * output_units_view(x, lay).square().sum(1)
                    for wm, x in zip(w, mine, strict=True))
        finite = torch.isfinite(ref_u)
        assert torch.equal(torch.isfinite(row), finite)  # NaN in the NaN entry's unit only
        torch.testing.assert_close(row[finite], ref_u[finite], rtol=1e-5, atol=0)
    assert (~torch.isfinite(units[6][0])).sum() == 1  # layer 0: one unit hit by its NaN


def test_micro_norms_without_entries_sum_to_zero_everywhere():
    norms = MicroNorms(3)
    a, counts, units, ucounts = norms.sums([1.0, 1.0], {4: (0, 2)}, torch.float64, _index, None)
    assert counts == ucounts == [0, 0, 0]
    assert torch.equal(a, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(units[4], torch.zeros(2, 4, dtype=torch.float64))


def test_kept_scatter_plans_give_each_step_its_own_sums():
    """A layout kept per pattern of records (the same every step) gives the sums of the
    step's own values, equal to a one-off layout's bit for bit and to a float64 loop; a new
    pattern (an entry not confirmed) gets its own layout."""
    layers = [((6, 5), "linear"), ((7,), None), ((6, 5), "linear"), ((6, 4), "embedding")]
    rows = {6: (0, 2), 4: (3,)}
    w = [0.5, 2.0]
    plans: dict = {}
    for step in range(3):
        g = torch.Generator().manual_seed(10 + step)
        grads = {(k, m): torch.randn(layers[k][0], generator=g)
                 for k in range(len(layers)) for m in range(2)}
        norms = MicroNorms(len(layers))
        for m in range(2):
            ks = list(range(len(layers)))[::-1] if m else list(range(len(layers)))
            ms = [m] * len(ks)
            if step == 2 and m == 1:
                ms[0] = -1  # layer 3's second entry never confirmed: another pattern
            norms.add(ks, ms, micro_sq_norm_stacks([grads[(k, m)] for k in ks],
                                                   [layers[k][1] for k in ks]))
            for k, mm in zip(ks, ms, strict=True):
                norms.count[k] += mm >= 0
        got = norms.sums(w, rows, torch.float32, _index, None, plans)
        one_off = norms.sums(w, rows, torch.float32, _index, None)
        torch.testing.assert_close(got[0], one_off[0], rtol=0, atol=0, equal_nan=True)
        assert got[1::2] == one_off[1::2]  # the entry counts
        for U in rows:
            torch.testing.assert_close(got[2][U], one_off[2][U], rtol=0, atol=0, equal_nan=True)
        for k in range(len(layers)):
            ref = sum(wm * grads[(k, m)].double().square().sum() for m, wm in enumerate(w))
            if step == 2 and k == 3:
                assert math.isnan(float(got[0][k])) and torch.isnan(got[2][4][0]).all()
            else:  # float32 sums of <= 30 squares, 2 terms
                assert float(got[0][k]) == pytest.approx(float(ref), rel=1e-5)
        assert len(plans) == (1 if step < 2 else 2)
