"""The report's first section: each answer's numbers recomputed from the run's table with numpy
(not with the code under test), and the section comes before the verdict table."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from gradlens.report.answers import answers
from gradlens.report.summary import summary_cells
from gradlens.report.verdicts import compute_verdicts
from tests.report._synth import OUTPUT, layers, make_spikes, make_table, write_run

N_STEPS, BATCH = 40, 64


def variance_table(seed: int = 3) -> pd.DataFrame:
    """Per layer and step: a per-entry variance around a layer's own level, its total
    (``twobatch_trace`` = per entry x numel), a signal ``|G|^2`` and the batch size."""
    rng = np.random.default_rng(seed)
    lay = layers()
    level = {n: float(np.exp(rng.normal(0, 1))) for n, _, _ in lay}
    level[OUTPUT] = 1.5 * level["model.embed_tokens.weight"]  # the same size: mostly above it
    rows = []
    for t in range(N_STEPS):
        for name, role, shape in lay:
            numel = int(np.prod(shape))
            per_entry = level[name] * float(np.exp(rng.normal(0, 0.4)))
            rows += [(t, name, role, "var_per_element", per_entry),
                     (t, name, role, "twobatch_trace", per_entry * numel),
                     (t, name, role, "twobatch_signal", per_entry * numel / 300
                      * float(rng.uniform(0.5, 1.5)))]
        rows += [(t, "global", "global", "batch_size", float(BATCH)),
                 (t, "global", "global", "microbatches", 2.0),
                 (t, "global", "global", "loss", 3.0 - t / N_STEPS)]
    return pd.DataFrame(rows, columns=["step", "layer", "role", "stat", "value"])


def _wide(df: pd.DataFrame, stat: str) -> pd.DataFrame:
    sub = df[df["stat"] == stat]
    return sub.pivot(index="step", columns="layer", values="value").sort_index()


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


@pytest.fixture(scope="module")
def said():
    df = variance_table().assign(run="r")
    vs = compute_verdicts(df, make_spikes().assign(run="r"), n_boot=200)
    return df, answers(vs, "r"), vs


def test_the_output_layer_sentence_holds_the_tables_numbers(said):
    df, got, _ = said
    text = got["output_highest"].text
    tr = _wide(df, "twobatch_trace")
    others = tr.drop(columns=[OUTPUT]).max(axis=1)
    first = int((tr[OUTPUT] > others).sum())
    ratio = float(np.exp(np.median(np.log(tr[OUTPUT] / others))))
    head = f"total variance (twobatch_trace) is the largest at {first} of {N_STEPS} steps"
    assert head in text, text
    assert 2 * first > N_STEPS  # the table is built so: then the sentence gives the margin
    assert f"{ratio:.2g}x the next" in text, text
    # per entry: the median over steps of each layer's rank (1 = largest), output's place
    pe = _wide(df, "var_per_element").to_numpy()
    ranks = 1 + (pe[:, None, :] > pe[:, :, None]).sum(axis=2)  # rank of each layer per step
    med = np.median(ranks, axis=0)
    out = list(_wide(df, "var_per_element").columns).index(OUTPUT)
    lo, hi = 1 + int((med < med[out]).sum()), int((med <= med[out]).sum())
    m = re.search(r"per entry \(var_per_element\) it ranks (\d+)\w\w of (\d+)", text)
    assert m, text
    assert lo <= int(m.group(1)) <= hi and int(m.group(2)) == pe.shape[1]
    assert f"ranks {_ordinal(int(m.group(1)))} of" in text
    assert got["output_highest"].next_step  # says where the noise is, and what follows


def test_the_instability_sentence_names_the_first_step_and_the_layer(said):
    _, got, _ = said
    sp = make_spikes()
    implicated = Counter()
    for row in sp.itertuples():
        implicated.update(row.layers if row.layer == "global" else [row.layer])
    top = implicated.most_common(1)[0][0]
    text = got["instability"].text
    assert text.startswith("Training went unstable: ")
    assert (f"{len(sp)} spike event(s) at {sp['step'].nunique()} of {N_STEPS} logged steps, "
            f"first at step {sp['step'].min()}") in text, text
    assert top == OUTPUT and "the layer implicated most: lm_head" in text
    assert got["instability"].next_step.startswith(
        f"Look at step {sp['step'].min()} in the heatmaps and the spike timeline (lm_head first)")


def test_the_critical_batch_sentence_compares_it_with_the_batch_size(said):
    df, got, vs = said
    spike_steps = set(make_spikes().query("kind in ['grad_norm', 'grad_norm_global']")["step"])
    keep = [s for s in range(N_STEPS) if s not in spike_steps]
    tr = _wide(df, "twobatch_trace").loc[keep].sum(axis=1)
    sg = _wide(df, "twobatch_signal").loc[keep].sum(axis=1)
    b_simple = float(tr.mean() / sg.mean())  # ratio of means over every (unflagged) step
    a = got["critical_batch"]
    assert f"The critical batch size is ~{b_simple:.3g} (95% CI " in a.text, a.text
    assert f"the run's batch size is {BATCH}." in a.text
    assert b_simple > 2 * BATCH  # the table is built so; then more data per step still pays
    assert a.next_step.startswith(f"The batch size {BATCH} is below the critical batch size")
    v = next(v for v in vs if v.kind == "critical_batch")  # its summary cell: B_crit / B
    assert summary_cells(v)["effect size"] == f"{b_simple / BATCH:.4g} (B_crit / B)"


def test_without_micro_batches_it_says_variance_was_not_measured():
    df = variance_table()
    df = df[~df["stat"].isin(["var_per_element", "twobatch_trace", "twobatch_signal"])].copy()
    df.loc[df["stat"] == "microbatches", "value"] = 1.0
    got = answers(compute_verdicts(df), None)
    a = got["output_highest"]
    assert a.text.startswith("Gradient variance was not measured: no micro-batches")
    assert "at most 1 micro-batch(es) per step" in a.text
    assert ">= 2 micro-batches per step" in a.next_step


def test_the_first_section_comes_before_the_verdict_table(tmp_path):
    from gradlens.report.build import build_report

    run = write_run(tmp_path / "r", variance_table(), make_spikes(), name="r")
    p = build_report([run], tmp_path / "out", progress=False)
    md = p.markdown.read_text(encoding="utf-8")
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads[:3] == ["## In short", "## Runs", "## Verdicts"]
    short = md[md.index("## In short"):md.index("## Runs")]
    assert "largest at" in short and "**What to do next:**" in short
    html = p.html.read_text(encoding="utf-8")
    assert html.index("<h2>In short</h2>") < html.index("<h2>Verdicts</h2>")
    assert "critical_batch_r" in p.figures  # the critical batch size's section has its figure


def test_the_spread_sentence_gives_the_roles_medians():
    from gradlens.kinds import layer_kind

    df = make_table(12, seed=4)  # unit_rms_cv: output ~3, embedding ~2, attention and mlp ~1
    got = answers(compute_verdicts(df, n_boot=100), None)["column_spread"].text
    cv = df[df["stat"] == "unit_rms_cv"]
    kind = [layer_kind(n, r) for n, r in zip(cv["layer"], cv["role"], strict=True)]
    med = cv.groupby(kind)["value"].median()  # pooled over the kind's layers and steps
    low = med.idxmin()
    assert med.idxmax() == "output"
    assert (f"(unit_rms_cv) is most spread in the output layer (median {med['output']:.3g}; "
            f"least: {low} {med[low]:.3g}); the roles differ.") in got, got


def test_the_critical_batch_figure_draws_the_tables_noise_scale(said):
    from gradlens.report.figures import figure_plan
    from gradlens.report.verdicts import RunData
    from gradlens.report.verdicts.registry import ReportContext

    df, _, vs = said
    run = RunData(df, make_spikes().assign(run="r"), {}, "r", slug="r")
    (spec,) = [f for f in figure_plan(ReportContext([run], df, verdicts=vs))
               if f.section == "critical_batch"]
    ax = spec.draw().axes[0]
    curve, batch = ax.lines[0], ax.lines[1]
    # the smoothed B_simple: EMA(0.95) of the summed trace over that of the summed signal,
    # over the steps without a grad-norm spike event
    flagged = set(make_spikes().query("kind in ['grad_norm', 'grad_norm_global']")["step"])
    keep = [s for s in range(N_STEPS) if s not in flagged]
    tr = _wide(df, "twobatch_trace").loc[keep].sum(axis=1).to_numpy()
    sg = _wide(df, "twobatch_signal").loc[keep].sum(axis=1).to_numpy()
    m_t = m_s = 0.0
    ema = []
    for t, s in zip(tr, sg, strict=True):
        m_t, m_s = 0.95 * m_t + 0.05 * t, 0.95 * m_s + 0.05 * s
        ema.append(m_t / m_s)
    np.testing.assert_allclose(curve.get_xdata(), keep)
    np.testing.assert_allclose(curve.get_ydata(), ema, rtol=1e-12)
    assert list(batch.get_ydata()) == [BATCH, BATCH]
    v = next(v for v in vs if v.kind == "critical_batch")
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(v.numbers["ci_low"])
    assert band.max() == pytest.approx(v.numbers["ci_high"])
