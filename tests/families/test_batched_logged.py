"""A logged step's batched statistics (two-batch sums and per-unit ratios per group of equal
unit count, column spreads per group of equal length) against float64 per-layer references,
on a model of ragged layers: different unit counts and layouts, 1-D parameters, a layer that
one micro-batch does not use."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradlens import GradLens
from gradlens.roles import output_units_view
from tests.golden._twobatch import nsr, two_batch


class Ragged(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.conv = nn.Conv1d(6, 4, 3)  # (4, 6, 3): 'other', 4 units of 18
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 7)
        self.extra = nn.Linear(4, 7)  # fc's shape; unused by micro-batch 1
        self.head = nn.Linear(7, 5)

    def forward(self, ids: torch.Tensor, use_extra: bool) -> torch.Tensor:
        x = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
        x = self.norm(x)
        h = self.fc(x) + (self.extra(x) if use_extra else 0)
        return self.head(torch.tanh(h))


def _spread(r: np.ndarray) -> list[float]:
    """cv, max/min, p99/p50, Gini of a vector (float64, numpy's quantiles)."""
    x = np.sort(r[np.isfinite(r)])
    n = len(x)

    def ratio(a: float, b: float) -> float:
        return 1.0 if a == b else (math.inf if b == 0 else a / b)

    gini = 0.0 if x.sum() == 0 else float(((2 * np.arange(1, n + 1) - n - 1) * x).sum()
                                         / (n * x.sum()))
    return [0.0 if x.std() == 0 else float(x.std() / x.mean()), ratio(x[-1], x[0]),
            ratio(float(np.quantile(x, 0.99)), float(np.quantile(x, 0.5))), gini]


@pytest.fixture(scope="module", params=[(True, False), (False, False), (True, True)],
                ids=["columns", "no-columns", "columns-extra-unused"])
def run(request):
    """A run's last logged step; without the columns family no summary pass reads the
    per-unit norms and the two-batch family's come from the batched fallback; with ``extra``
    unused by every micro-batch, its width's per-unit norms come row by row (no gradient:
    NaN row) beside the summary's stacks."""
    columns, unused = request.param
    torch.manual_seed(0)
    model = Ragged().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lens = GradLens(model, opt, preset="standard", log_every=1, columns=columns)
    seen: dict[str, list[torch.Tensor]] = {i.name: [] for i in lens.layers}
    hooks = [i.param.register_hook(lambda g, n=i.name: seen[n].append(g.detach().clone()))
             for i in lens.layers]
    sizes = [24, 8, 16]  # unequal: unequal weights per micro-batch
    K = len(sizes)
    for _ in range(2):  # the second step is compared (EMAs warm, stashes reused)
        for v in seen.values():
            v.clear()
        for k, b in enumerate(sizes):
            ids = torch.randint(0, 11, (b, 9))
            target = torch.randint(0, 5, (b, 7))
            out = model(ids, use_extra=k != 1 and not unused)
            loss = nn.functional.cross_entropy(out.reshape(-1, 5), target.reshape(-1)) / K
            loss.backward()
        step_grads = {i.name: i.param.grad.detach().clone() for i in lens.layers
                      if i.param.grad is not None}
        opt.step()
        opt.zero_grad(set_to_none=True)
    for h in hooks:
        h.remove()
    lens.flush()
    df = lens.memory.frame()
    rows = df[df.step == df.step.max()]
    values = {(r.layer, r.stat): r.value for r in rows.itertuples()}
    layouts = {i.name: i.layout for i in lens.layers}
    lens.close()
    return values, seen, step_grads, layouts, sizes


def test_two_batch_per_layer_and_per_unit_match_float64(run):
    values, seen, _, layouts, sizes = run
    checked = 0
    for name, hs in seen.items():
        if not hs:  # no gradient at all: no rows
            assert (name, "twobatch_trace") not in values and name.startswith("extra.")
            continue
        trace = values[(name, "twobatch_trace")]
        if name.startswith("extra."):  # 2 entries for 3 micro-batches
            assert math.isnan(trace)
            if layouts[name] != "vector":
                assert math.isnan(values[(name, "unit_nsr_median")])
            continue
        ref = two_batch(hs, sizes, "mean", None if layouts[name] == "vector" else layouts[name])
        assert trace == pytest.approx(ref["T"], rel=1e-9 * ref["kT"])  # float64 rounding
        if "uT" in ref:
            med, mean = nsr(ref["uT"], ref["uS"])
            assert values[(name, "unit_nsr_median")] == pytest.approx(med, rel=1e-8, nan_ok=True)
            assert values[(name, "unit_nsr_mean")] == pytest.approx(mean, rel=1e-8, nan_ok=True)
            checked += not math.isnan(med)
    assert checked == 4  # emb, conv, fc, head: unit counts 6, 4, 7, 5


def test_column_spreads_match_float64_per_layer(run):
    values, _, grads, layouts, _ = run
    if not any(stat == "unit_rms_cv" for _, stat in values):
        pytest.skip("the columns family is off in this run")
    checked = 0
    for name, g in grads.items():
        if layouts[name] == "vector":
            assert math.isnan(values.get((name, "unit_rms_cv"), math.nan))
            continue
        u = output_units_view(g.double(), layouts[name]).square()
        for side, r in (("unit", u.mean(1).sqrt()), ("fan", u.mean(0).sqrt())):
            want = _spread(r.numpy())
            got = [values[(name, f"{side}_rms_{s}")] for s in ("cv", "max_min", "p99_p50",
                                                                "gini")]
            assert got == pytest.approx(want, rel=1e-9), (name, side)
            checked += 1
    assert checked == (10 if "extra.weight" in grads else 8)  # 5 matrices (4 if unused)
    if "extra.weight" not in grads:
        assert math.isnan(values.get(("extra.weight", "unit_rms_cv"), math.nan))
