"""Verdicts on synthetic tables whose answers are known by construction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from gradlens.kinds import KINDS, layer_kind
from gradlens.report.verdicts import (
    Verdict,
    bootstrap_indices,
    column_spread_verdict,
    compute_verdicts,
    instability_verdict,
    layer_order,
    layer_ranking,
    output_highest_verdict,
    role_spread_table,
    select_run,
    short_labels,
    short_layer_name,
    verdicts_table,
)
from gradlens.schema import VARIANCE_ESTIMATORS
from tests.report._synth import OUTPUT, layers, make_spikes, make_table


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return make_table(50, seed=0, output_first=0.9)


# ----------------------------------------------------------------- question 1: output highest


def test_output_first_in_90_percent_of_steps_is_yes(table):
    v = output_highest_verdict(table, "noise_scale")
    assert v.answer == "yes"
    n = v.numbers
    assert n["fraction_first"] == pytest.approx(0.9)
    assert n["steps_first"] == 45 and n["n_steps"] == 50
    assert (n["first_step"], n["last_step"]) == (0, 49)
    assert n["median_rank"] == 1.0
    assert n["p_value"] < 1e-6
    assert n["rank_biserial"] > 0.8
    assert n["median_ratio"] > 1.5
    assert n["size_fair"] is True and n["output_layer"] == OUTPUT
    # the p-value is the Wilcoxon signed-rank test of log(output / max other), called directly
    wide = table[table["stat"] == "noise_scale"].pivot(index="step", columns="layer",
                                                      values="value")
    d = np.log(wide[OUTPUT] / wide.drop(columns=OUTPUT).max(axis=1))
    assert n["p_value"] == pytest.approx(sps.wilcoxon(d, alternative="greater").pvalue)
    assert n["median_log_ratio"] == pytest.approx(float(np.median(d)))


def test_output_rarely_first_but_leading_the_ranking_cannot_tell():
    """Largest at 10% of the steps, behind a different layer each step at the rest:
    it leads the ranking (median rank 4, the others worse), so the verdict does not say "no" (tests/report/test_ranking.py has
    the "no" of an output behind the same layers at every step)."""
    v = output_highest_verdict(make_table(50, seed=1, output_first=0.1), "noise_scale")
    assert v.answer == "cannot tell"
    assert v.numbers["fraction_first"] == pytest.approx(0.1)
    assert v.numbers["p_less"] < 0.05
    assert v.numbers["median_rank"] > 1 and v.numbers["overall_rank"] == 1
    assert "no one layer is above it consistently" in v.reason


def test_output_first_half_the_time_cannot_tell():
    v = output_highest_verdict(make_table(40, seed=2, output_first=0.5), "noise_scale")
    assert v.answer == "cannot tell"
    assert v.numbers["fraction_first"] == pytest.approx(0.5)


def test_raw_estimator_is_flagged(table):
    v = output_highest_verdict(table, "twobatch_trace")
    assert v.numbers["size_fair"] is False
    assert "raw" in v.question and "favours big tensors" in v.reason


@pytest.mark.parametrize(
    ("estimator", "needle"),
    [
        ("pe_trace", "needs the `full` preset"),
        ("pe_noise_scale", "per-example"),
        ("temporal_var", "temporal buffers"),
        ("temporal_noise_scale", "`full` preset"),
    ],
)
def test_missing_estimator_not_computable(table, estimator, needle):
    v = output_highest_verdict(table, estimator)
    assert v.answer == "not computable"
    assert needle in v.reason


def test_missing_twobatch_names_micro_batches():
    df = make_table(10, estimators=())
    df.loc[df["stat"] == "microbatches", "value"] = 1.0
    v = output_highest_verdict(df, "noise_scale", meta={"preset": "standard", "world_size": 1})
    assert v.answer == "not computable"
    assert v.reason.startswith("no micro-batches, so no two-batch variance")
    assert ">= 2 micro-batches" in v.reason and "data-parallel ranks" in v.reason
    assert "at most 1 micro-batch" in v.reason and "world size 1" in v.reason


def test_missing_although_condition_met(table):
    # the table has 2 micro-batches per step and other two-batch estimators, not this one
    v = output_highest_verdict(table, "unit_nsr_mean")
    assert v.answer == "not computable"
    assert "although the run met the condition" in v.reason


def test_too_few_steps_not_computable():
    v = output_highest_verdict(make_table(3), "noise_scale")
    assert v.answer == "not computable"
    assert "need >= 5" in v.reason and v.numbers["n_steps"] == 3


def test_no_output_layer_not_computable(table):
    v = output_highest_verdict(table[table["layer"] != OUTPUT], "noise_scale")
    assert v.answer == "not computable" and "output" in v.reason


def test_nonpositive_steps_count_for_rank_not_for_test(table):
    df = table.copy()
    sel = (df["stat"] == "noise_scale") & (df["layer"] == OUTPUT) & (df["step"] < 5)
    df.loc[sel, "value"] = -1.0
    v = output_highest_verdict(df, "noise_scale")
    assert v.numbers["n_steps"] == 50 and v.numbers["n_test_steps"] == 45


# ----------------------------------------------------------------- question 2: column spread


def _kinds(df: pd.DataFrame) -> pd.DataFrame:
    """The synthetic table's internal roles as kinds (the verdicts group by kind)."""
    return df.assign(role=[layer_kind(n, r) for n, r in zip(df["layer"], df["role"],
                                                            strict=True)])


def _per_layer_groups(df: pd.DataFrame, stat: str) -> list[list[float]]:
    sub = _kinds(df[df["stat"] == stat])
    med = sub.groupby(["role", "layer"])["value"].median()
    return [list(med[r]) for r in KINDS if r in med.index]


def test_kruskal_matches_scipy(table):
    v = column_spread_verdict(table, "unit_rms_cv")
    groups = _per_layer_groups(table, "unit_rms_cv")
    expected = sps.kruskal(*groups)
    assert v.numbers["p_value"] == pytest.approx(expected.pvalue)
    assert v.numbers["kruskal_H"] == pytest.approx(expected.statistic)
    # one embedding and one output layer: the per-step Friedman test decides, on each role's
    # median over its layers at every step (levels 3 / 2 / 1 in the synthetic table)
    sub = _kinds(table[table["stat"] == "unit_rms_cv"])
    per_step = sub.groupby(["step", "role"])["value"].median().unstack()
    kinds = [k for k in KINDS if k in per_step.columns]
    assert kinds == ["embedding", "attention", "mlp", "output"]
    ref = sps.friedmanchisquare(*(per_step[r] for r in kinds))
    assert v.numbers["test"] == "friedman" and v.numbers["n_steps"] == 50
    assert v.numbers["p_steps"] == pytest.approx(ref.pvalue)
    assert v.numbers["effect"] == pytest.approx(ref.statistic / (50 * (len(kinds) - 1)))
    assert v.answer == "yes" and "Friedman" in v.reason
    flat = column_spread_verdict(table, "fan_rms_cv")  # the same level in every role
    assert flat.numbers["test"] == "friedman" and flat.answer == "no"
    for role in kinds:
        med = float(np.median(sub.loc[sub["role"] == role, "value"]))
        assert v.numbers[f"{role}.median"] == pytest.approx(med)
        assert v.numbers[f"{role}.ci_low"] <= med <= v.numbers[f"{role}.ci_high"]


def _spread_table(shift: float, n_a: int = 8, n_b: int = 8, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for role, n, level in (("hidden", n_a, 1.0), ("embedding", n_b, 1.0 + shift)):
        for i in range(n):
            mu = level + rng.normal(0, 0.05)
            rows += [(t, f"{role}{i}", role, "unit_rms_cv", mu + rng.normal(0, 0.02))
                     for t in range(20)]
    return pd.DataFrame(rows, columns=["step", "layer", "role", "stat", "value"])


def test_spread_differs_yes_and_same_no():
    yes = column_spread_verdict(_spread_table(1.0), "unit_rms_cv")
    assert yes.answer == "yes" and yes.numbers["p_value"] < 0.01
    df = _spread_table(0.0, seed=3)
    no = column_spread_verdict(df, "unit_rms_cv")
    assert no.numbers["p_value"] == pytest.approx(
        sps.kruskal(*_per_layer_groups(df, "unit_rms_cv")).pvalue)
    assert no.numbers["p_value"] >= 0.05 and no.answer == "no"


def test_spread_two_singleton_roles_use_wilcoxon_over_steps():
    df = _spread_table(0.5, n_a=1, n_b=1, seed=5)
    v = column_spread_verdict(df, "unit_rms_cv")
    wide = df.pivot(index="step", columns="layer", values="value")
    ref = sps.wilcoxon(wide["hidden0"] - wide["embedding0"])
    assert v.numbers["test"] == "wilcoxon" and v.answer == "yes"
    assert v.numbers["p_steps"] == pytest.approx(ref.pvalue)
    few = column_spread_verdict(df[df["step"] < 3], "unit_rms_cv")
    assert few.answer == "cannot tell" and "need >= 5" in few.reason


def test_spread_is_deterministic(table):
    a = role_spread_table(table, "unit_rms_gini", seed=0)
    b = role_spread_table(table, "unit_rms_gini", seed=0)
    pd.testing.assert_frame_equal(a, b)
    assert list(a["role"]) == ["embedding", "attention", "mlp", "output"]
    assert (a["ci_low"] <= a["median"]).all() and (a["median"] <= a["ci_high"]).all()


def test_spread_absent_not_computable():
    vs = compute_verdicts(make_table(10, columns=False))
    spread = [v for v in vs if v.kind == "column_spread"]
    assert len(spread) == 1 and spread[0].answer == "not computable"
    assert "standard or full preset" in spread[0].reason


# ----------------------------------------------------------------- question 3: instability


def test_known_spikes(table):
    v = instability_verdict(make_spikes(), table)
    assert v.answer == "yes"
    n = v.numbers
    assert n["n_spikes"] == 4 and n["n_spike_steps"] == 3
    assert n["first_step"] == 7 and n["last_step"] == 20
    assert n["kind.grad_norm_global"] == 2 and n["kind.loss"] == 1 and n["kind.grad_norm"] == 1
    assert n["top_layers"].startswith(f"{OUTPUT}:2")
    assert n["nonfinite_total"] == 0
    assert "first at step 7" in v.reason and "lm_head (2)" in v.reason


def test_layers_field_as_json_text(table):
    sp = make_spikes()
    sp["layers"] = sp["layers"].map(lambda x: str(list(x)).replace("'", '"'))
    v = instability_verdict(sp, table)
    assert v.numbers["top_layers"].startswith(f"{OUTPUT}:2")


def test_no_instability(table):
    empty = make_spikes().iloc[:0]
    v = instability_verdict(empty, table)
    assert v.answer == "no" and v.reason.startswith("no instability found")
    assert v.numbers["n_spikes"] == 0


def test_nonfinite_counts_as_instability(table):
    df = table.copy()
    sel = (df["stat"] == "nonfinite_count") & (df["step"] == 11) & (df["layer"] == OUTPUT)
    df.loc[sel, "value"] = 3.0
    v = instability_verdict(make_spikes().iloc[:0], df)
    assert v.answer == "yes"
    assert v.numbers["nonfinite_total"] == 3 and v.numbers["nonfinite_steps"] == 1
    assert "first at step 11" in v.reason


def test_instability_without_inputs():
    assert instability_verdict(None, None).answer == "not computable"


# ----------------------------------------------------------------- all verdicts, helpers


def test_compute_verdicts_covers_every_question(table):
    vs = compute_verdicts(table.assign(run="r1"), make_spikes().assign(run="r1"))
    kinds = [v.kind for v in vs]
    assert kinds.count("output_highest") == len(VARIANCE_ESTIMATORS)
    assert kinds.count("column_spread") == 3  # unit_rms_cv, unit_rms_gini, fan_rms_cv
    assert kinds.count("instability") == 1
    assert {v.run for v in vs} == {"r1"}
    t = verdicts_table(vs)
    assert len(t) == len(vs) and set(t["answer"]) <= {"yes", "no", "cannot tell",
                                                       "not computable"}


def test_verdict_rejects_unknown_answer():
    with pytest.raises(ValueError, match="answer must be one of"):
        Verdict("q", "maybe", {}, "")


def test_select_run_needs_a_name_for_several_runs(table):
    both = pd.concat([table.assign(run="a"), table.assign(run="b")])
    with pytest.raises(ValueError, match="pass run="):
        select_run(both)
    assert len(select_run(both, "a")) == len(table)


def test_bootstrap_indices_seeded_blocks():
    a = bootstrap_indices(30, 200, seed=1)
    assert a.shape == (200, 30) and a.min() >= 0 and a.max() < 30
    np.testing.assert_array_equal(a, bootstrap_indices(30, 200, seed=1))
    assert not np.array_equal(a, bootstrap_indices(30, 200, seed=2))
    # auto block length ceil(30 ** (1/3)) = 4: consecutive (circular) within each block
    assert np.all((a[:, 1:4] - a[:, 0:3]) % 30 == 1)


def test_layer_ranking_puts_output_first(table):
    r = layer_ranking(table, "noise_scale", n_boot=300)
    assert r.iloc[0]["layer"] == OUTPUT and r.iloc[0]["rank"] == 1
    assert r.iloc[0]["p_first"] > 0.95
    assert len(r) == len(layers())
    assert (r["ci_low"] <= r["ci_high"]).all()
    assert list(r["median_rank"]) == sorted(r["median_rank"])
    pd.testing.assert_frame_equal(r, layer_ranking(table, "noise_scale", n_boot=300))


@pytest.mark.parametrize(
    ("name", "short"),
    [
        ("model.layers.0.self_attn.q_proj.weight", "L0.attn.q"),
        ("model.layers.11.mlp.down_proj.weight", "L11.mlp.down"),
        ("model.embed_tokens.weight", "embed"),
        ("lm_head.weight", "lm_head"),
        ("model.layers.3.input_layernorm.weight", "L3.ln_in"),
        ("model.norm.weight", "norm"),
        ("transformer.h.2.attn.c_attn.bias", "L2.attn.qkv.b"),
        ("transformer.wte.weight", "embed"),
        ("_orig_mod.model.layers.1.self_attn.o_proj.weight", "L1.attn.o"),
    ],
)
def test_short_layer_name(name, short):
    assert short_layer_name(name) == short


def test_short_labels_keep_full_names_on_collision():
    labels = short_labels(["model.embed_tokens.weight", "transformer.wte.weight", "lm_head.weight"])
    assert labels["lm_head.weight"] == "lm_head"
    assert labels["model.embed_tokens.weight"] == "model.embed_tokens.weight"


def test_layer_order_meta_and_heuristic(table):
    names = [n for n, _, _ in layers()]
    shuffled = table.sample(frac=1.0, random_state=0)
    meta = {"layers": [{"name": n} for n in names]}
    assert layer_order(shuffled, meta) == names
    # no metadata: embedding first, blocks in order, the usual order inside a block, output last
    assert layer_order(shuffled) == names
    alpha = sorted(names)
    assert layer_order(None, None, alpha) == [n for n in names if n in alpha]
