"""The layer ranking: median per-step ranks, against a brute-force loop, and with an injected
spike the ranking and the output-highest verdict agree (one computation)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gradlens.report.ranking import layer_ranking, rank_order, step_ranks
from gradlens.report.verdicts import output_highest_verdict, wide_table
from tests.report._synth import OUTPUT, layers, make_table

RUNNER = "model.layers.0.self_attn.q_proj.weight"
THIRD = "model.layers.1.mlp.down_proj.weight"


def third_place_table(n_steps: int = 60, spike_step: int = 30, factor: float = 1e6,
                      seed: int = 0) -> pd.DataFrame:
    """``var_per_element`` where the output is third at every step (below RUNNER and THIRD)
    except at ``spike_step``, where its value is multiplied by ``factor``."""
    rng = np.random.default_rng(seed)
    rows = []
    for t in range(n_steps):
        vals = {name: float(np.exp(rng.normal(0.0, 0.3))) for name, _, _ in layers()}
        top = max(vals.values())
        vals[RUNNER] = 4.0 * top
        vals[THIRD] = 3.0 * top
        vals[OUTPUT] = 2.0 * top * (factor if t == spike_step else 1.0)
        rows += [(t, n, r, "var_per_element", vals[n]) for n, r, _ in layers()]
    return pd.DataFrame(rows, columns=["step", "layer", "role", "stat", "value"])


def test_step_ranks_brute_force():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 4, size=(7, 5)).astype(float)  # many ties
    x[2, 1] = np.nan
    r = step_ranks(x)
    for t in range(7):
        for j in range(5):
            if np.isnan(x[t, j]):
                assert np.isnan(r[t, j])
            else:
                others = [x[t, k] for k in range(5) if k != j and np.isfinite(x[t, k])]
                assert r[t, j] == 1 + sum(v >= x[t, j] for v in others)


def test_rank_order_brute_force():
    table = make_table(30, seed=4, output_first=0.4)
    wide = wide_table(table, "noise_scale")
    order = rank_order(wide)
    x = wide.to_numpy()
    keys = {}
    for j, name in enumerate(wide.columns):
        ranks = [1 + sum(x[t, k] >= x[t, j] for k in range(x.shape[1]) if k != j)
                 for t in range(x.shape[0])]
        keys[name] = (float(np.median(ranks)), float(np.mean(ranks)), -float(np.median(x[:, j])))
    assert list(order["layer"]) == sorted(keys, key=lambda n: keys[n])
    for _, row in order.iterrows():
        assert row["median_rank"] == keys[row["layer"]][0]
        assert row["mean_rank"] == pytest.approx(keys[row["layer"]][1], rel=1e-12)


def test_spike_does_not_carry_output_to_the_top():
    df = third_place_table()
    wide = wide_table(df, "var_per_element")
    assert wide[OUTPUT].mean() > wide.drop(columns=OUTPUT).mean().max()  # the old key: first
    r = layer_ranking(df, "var_per_element", n_boot=200)
    assert list(r["layer"][:3]) == [RUNNER, THIRD, OUTPUT]
    out = r[r["layer"] == OUTPUT].iloc[0]
    assert out["rank"] == 3 and out["median_rank"] == 3.0 and out["p_first"] == 0.0
    assert r.iloc[0]["p_first"] == 1.0
    v = output_highest_verdict(df, "var_per_element")
    assert v.answer == "no"
    assert v.numbers["overall_rank"] == out["rank"] == 3
    assert v.numbers["ranked_first"] == r.iloc[0]["layer"] == RUNNER
    assert v.numbers["fraction_first"] == pytest.approx(1 / 60)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("output_first", [0.1, 0.5, 0.52, 0.9])
def test_verdict_and_ranking_never_contradict(seed, output_first):
    """``yes`` only when the ranking puts the output first; ``no`` only when it does not."""
    df = make_table(25, seed=seed, output_first=output_first, estimators=("noise_scale",))
    wide = wide_table(df, "noise_scale")
    wide.iloc[seed % 25, list(wide.columns).index(OUTPUT)] *= 1e6  # one spike step
    spiked = df.copy()
    mask = (spiked.step == wide.index[seed % 25]) & (spiked.layer == OUTPUT)
    spiked.loc[mask & (spiked.stat == "noise_scale"), "value"] *= 1e6
    v = output_highest_verdict(spiked, "noise_scale")
    r = layer_ranking(spiked, "noise_scale", n_boot=50)
    first = r.iloc[0]["layer"] == OUTPUT
    assert v.numbers["overall_rank"] == int(r.loc[r["layer"] == OUTPUT, "rank"].iloc[0])
    if v.answer == "yes":
        assert first
    if v.answer == "no":
        assert not first
