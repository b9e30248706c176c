"""The norm-layer GNS verdict (Gray et al. 2024) and the critical-batch-size verdict, on synthetic
long tables whose answers are known by construction."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from gradlens.report.verdicts import (
    compute_verdicts,
    critical_batch_size_verdict,
    norm_gain_layers,
    norm_gns_verdict,
)
from gradlens.stats.noise_scale import noise_scale_readout
from tests.report._synth import layers

NORMS = {n for n, r, _ in layers() if r == "vector"}  # input/post-attention layernorms, norm


@pytest.fixture(autouse=True)
def _no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no scipy/numpy RuntimeWarning may slip through
        yield


def gns_table(n_steps: int = 300, *, seed: int = 0, norm: str = "tracks",
              total_gns=lambda t: 20.0 * math.exp(t / 120.0), noise: float = 0.2,
              batch_size: float | None = 32.0) -> pd.DataFrame:
    """pe_trace / pe_signal rows for every layer: per layer a fixed signal level s_l, per step
    ``tr_l = k_l * B(t) * s_l`` with multiplicative noise, so the all-layer GNS is ``B(t)`` up to
    noise (k_l averages 1). Norm layers: ``norm="tracks"``: ``k = 0.5`` (norm GNS = B(t)/2);
    ``"flat"``: their GNS is a constant 30 times noise, unrelated to B(t)."""
    rng = np.random.default_rng(seed)
    lay = layers()
    level = {n: float(np.exp(rng.normal(0, 1))) for n, _, _ in lay}
    k = {n: (0.5 if n in NORMS else float(rng.uniform(0.5, 1.5))) for n, _, _ in lay}
    rows = []
    for t in range(n_steps):
        b = total_gns(t)
        for name, role, _ in lay:
            s = level[name] * (1 + noise * rng.normal())
            gns = (30.0 * math.exp(0.4 * rng.normal()) if norm == "flat" and name in NORMS
                   else k[name] * b)
            tr = gns * level[name] * (1 + noise * rng.normal())
            rows += [(t, name, role, "pe_trace", tr), (t, name, role, "pe_signal", s)]
        if batch_size is not None:
            rows.append((t, "global", "global", "batch_size", batch_size))
    return pd.DataFrame(rows, columns=["step", "layer", "role", "stat", "value"])


def meta_layers() -> dict:
    return {"layers": [dict(name=n, role=r, group="norms" if n in NORMS else r)
                       for n, r, _ in layers()]}


# ----------------------------------------------------------------- norm-layer GNS


def test_norm_gain_layers_from_names_and_from_meta():
    names = [n for n, _, _ in layers()] + ["transformer.h.0.ln_1.weight",
                                           "transformer.h.0.ln_1.bias", "model.layers.0.mlp.bias"]
    roles = {n: r for n, r, _ in layers()} | dict.fromkeys(names[-3:], "vector")
    got = set(norm_gain_layers(names, roles))
    assert got == NORMS | {"transformer.h.0.ln_1.weight"}
    meta = {"layers": [dict(name="model.norm.weight", group="norms"),
                       dict(name="model.layers.0.input_layernorm.weight", group="other")]}
    assert "model.layers.0.input_layernorm.weight" not in norm_gain_layers(names, roles, meta)
    assert "model.norm.weight" in norm_gain_layers(names, roles, meta)


def test_norm_layers_tracking_the_total_is_yes():
    v = norm_gns_verdict(gns_table(norm="tracks"), meta=meta_layers())
    n = v.numbers
    assert v.answer == "yes", v.reason
    assert v.kind == "norm_gns" and n["n_norm_layers"] == len(NORMS) == 5
    assert n["spearman"] > 0.9 and n["pearson"] > 0.9 and n["spearman_ci_low"] > 0.7
    # norm-layer GNS is half of their own trace/signal scale: the ratio to the total is a
    # stable constant below 1
    assert 0.3 < n["ratio_median"] < 0.8 and n["ratio_rel_iqr"] < 0.5
    assert n["total_range"] > 5.0 and n["n_steps"] == 300


def test_flat_norm_gns_against_a_rising_total_is_no():
    v = norm_gns_verdict(gns_table(norm="flat", seed=1))
    assert v.answer == "no", v.reason
    assert v.numbers["spearman_ci_high"] < 0.7
    assert abs(v.numbers["spearman"]) < 0.5


def test_constant_total_gns_cannot_tell():
    v = norm_gns_verdict(gns_table(total_gns=lambda t: 20.0, seed=2))
    assert v.answer == "cannot tell"
    assert v.numbers["total_range"] < 1.25 and "hardly varies" in v.reason


def test_norm_gns_not_computable_reasons():
    df = gns_table(60)
    no_norm = df[~df["layer"].isin(NORMS)]
    v = norm_gns_verdict(no_norm)
    assert v.answer == "not computable" and "normalization layers" in v.reason
    v = norm_gns_verdict(df[df["stat"] != "pe_signal"])
    assert v.answer == "not computable" and "pe_signal" in v.reason
    v = norm_gns_verdict(df[~df["stat"].str.startswith("pe_")])
    assert v.answer == "not computable" and "full" in v.reason
    v = norm_gns_verdict(df[df["step"] < 5])
    assert v.answer == "not computable" and "need >= 10" in v.reason


# ----------------------------------------------------------------- critical batch size


def cbs_table(b_simple: float = 50.0, batch_size: float | None = 32.0, n_steps: int = 200,
              seed: int = 0) -> pd.DataFrame:
    return gns_table(n_steps, seed=seed, total_gns=lambda t: b_simple, batch_size=batch_size)


@pytest.mark.parametrize(("bsz", "answer", "where"),
                         [(16.0, "yes", "below"), (400.0, "no", "above"),
                          (50.0, "cannot tell", "within")])
def test_batch_size_against_critical(bsz, answer, where):
    v = critical_batch_size_verdict(cbs_table(50.0, bsz), n_boot=500)
    n = v.numbers
    assert v.answer == answer, v.reason
    assert where in v.reason and f"B={bsz:g}" in v.reason
    assert n["ci_low"] < 50.0 < n["ci_high"]  # the true B_simple is inside the interval
    assert n["critical_batch_size"] == pytest.approx(50.0, rel=0.1)
    assert n["batch_size"] == bsz and n["batch_size_from"] == "batch_size rows"
    assert n["n_steps"] == 100 and n["step"] == 199 and n["source"] == "per-example"
    # per kind: the matrices' k_l average ~1, the norm gains' are 0.5
    assert n["b_simple_norms"] == pytest.approx(25.0, rel=0.1)


def test_critical_batch_size_equals_the_readout_of_the_sums():
    df = cbs_table(50.0, 16.0, n_steps=80)
    v = critical_batch_size_verdict(df, window=None, n_boot=300, seed=3)
    pe = df[df["stat"].isin(["pe_trace", "pe_signal"])]
    sums = pe.groupby(["stat", "step"])["value"].sum().unstack(0)
    r = noise_scale_readout(sums["pe_trace"], sums["pe_signal"], steps=sums.index,
                            n_boot=300, seed=3)
    assert v.numbers["critical_batch_size"] == pytest.approx(r.estimate, rel=1e-12)
    assert (v.numbers["ci_low"], v.numbers["ci_high"]) == pytest.approx((r.ci_low, r.ci_high))


def test_batch_size_from_run_json_and_two_batch_fallback():
    df = cbs_table(50.0, None)
    df = df.replace({"stat": {"pe_trace": "twobatch_trace", "pe_signal": "twobatch_signal"}})
    v = critical_batch_size_verdict(df, meta={"batch_size": 8}, n_boot=300)
    assert v.answer == "yes" and v.numbers["source"] == "two-batch"
    assert v.numbers["batch_size_from"] == "run.json"


def test_critical_batch_size_not_computable_and_no_signal():
    df = cbs_table(50.0, None, n_steps=40)
    v = critical_batch_size_verdict(df)
    assert v.answer == "not computable" and "batch size is unknown" in v.reason
    v = critical_batch_size_verdict(df[df["stat"] == "batch_size"], meta={"batch_size": 8})
    assert v.answer == "not computable" and "no (trace, signal) pairs" in v.reason
    zero = cbs_table(50.0, 32.0, n_steps=60)
    sig = zero["stat"] == "pe_signal"
    zero.loc[sig, "value"] = np.random.default_rng(0).normal(0.0, 1.0, int(sig.sum()))
    zero.loc[sig & (zero["step"] % 2 == 0), "value"] -= 0.5  # mean signal negative
    v = critical_batch_size_verdict(zero, n_boot=200)
    assert v.answer == "cannot tell" and "no detectable gradient signal" in v.reason


def test_compute_verdicts_includes_both():
    vs = compute_verdicts(gns_table(120).assign(run="r"), meta=meta_layers(), n_boot=200)
    kinds = {v.kind: v for v in vs}
    assert kinds["norm_gns"].answer == "yes"
    assert kinds["critical_batch"].answer in {"yes", "no", "cannot tell"}
    assert all(v.run == "r" for v in vs)


def test_a_spike_step_does_not_decide_the_critical_batch_size():
    """One step whose traces are 1e4 times larger, flagged by a spike event: the verdict
    equals the verdict on the table without that step."""
    df = cbs_table(50.0, 16.0, n_steps=120)
    spike_step = int(df["step"].max()) - 10
    hit = (df["step"] == spike_step) & df["stat"].isin(["pe_trace", "twobatch_trace"])
    spiked = df.copy()
    spiked.loc[hit, "value"] *= 1e4
    events = pd.DataFrame({"step": [spike_step], "layer": ["global"],
                           "kind": ["grad_norm_global"], "value": [1.0], "score": [20.0]})
    clean = critical_batch_size_verdict(df[df["step"] != spike_step], n_boot=200)
    got = critical_batch_size_verdict(spiked, n_boot=200, spikes=events)
    assert got.numbers["n_spike_steps_excluded"] == 1
    assert got.numbers["critical_batch_size"] == pytest.approx(
        clean.numbers["critical_batch_size"], rel=1e-12)
    assert got.answer == clean.answer
    unflagged = critical_batch_size_verdict(spiked, n_boot=200)  # what the event prevents
    assert unflagged.numbers["critical_batch_size"] > 10 * clean.numbers["critical_batch_size"]


def test_the_norm_gns_section_draws_both_noise_scales():
    """The figure's curves are the EMA(0.8) ratios of the summed pe_trace and pe_signal, over
    all layers and over the norm gains, recomputed here with a loop."""
    from gradlens.report.figures import figure_plan
    from gradlens.report.verdicts import RunData
    from gradlens.report.verdicts.registry import ReportContext

    df = gns_table(60).assign(run="r")
    vs = compute_verdicts(df, meta=meta_layers(), n_boot=100)
    run = RunData(df, None, meta_layers(), "r", slug="r")
    (spec,) = [f for f in figure_plan(ReportContext([run], df, verdicts=vs))
               if f.section == "norm_gns"]
    lines = spec.draw().axes[0].lines

    def ema_ratio(layer_names):
        sub = df[df["layer"].isin(layer_names)]
        tr = sub[sub["stat"] == "pe_trace"].groupby("step")["value"].sum().to_numpy()
        sg = sub[sub["stat"] == "pe_signal"].groupby("step")["value"].sum().to_numpy()
        m_t = m_s = 0.0
        out = []
        for t, s in zip(tr, sg, strict=True):
            m_t, m_s = 0.8 * m_t + 0.2 * t, 0.8 * m_s + 0.2 * s
            out.append(m_t / m_s)
        return np.array(out)

    everything = ema_ratio([n for n, _, _ in layers()])
    norms = ema_ratio(sorted(NORMS))
    assert lines[0].get_label() == f"all {len(layers())} layers"
    np.testing.assert_allclose(lines[0].get_ydata(), everything[everything > 0], rtol=1e-12)
    assert lines[1].get_label() == f"{len(NORMS)} norm-gain layers"
    np.testing.assert_allclose(lines[1].get_ydata(), norms[norms > 0], rtol=1e-12)
