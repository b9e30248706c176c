"""The momentum advisor on a synthetic run whose answer is known.

Three layers get gradients ``g_t = mu + e_t`` set directly (the lens's ``step()``, no
optimizer): ``white`` (noise-to-signal 4, white noise: momentum at beta 0.9 cuts the squared
direction error to 5.3%), ``persistent`` (noise-to-signal 4, AR(1) noise with rho 0.95: only
to 67%), ``quiet`` (white, noise-to-signal 0.05: nothing to average). The advisor must pick
``white`` only, with the injected rho and noise-to-signal recovered from the lens's own
``grad_lag*`` statistics, which are checked against the inner products computed here.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradlens import GradLens
from gradlens.advise import advise_momentum, ema_mse_ratio
from gradlens.families.lag import GradLag

D, STEPS, EVERY = 400, 600, 5
CASES = {"white": (4.0, 0.0), "persistent": (4.0, 0.95), "quiet": (0.05, 0.0)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.ModuleDict({k: nn.Linear(20, 20, bias=False) for k in CASES})
    logdir = tmp_path_factory.mktemp("adv") / "run"
    lens = GradLens(model, None, logdir=logdir, preset="minimal", log_every=EVERY,
                    overrides={f"{k}.weight": "hidden" for k in CASES},
                    statistics=[GradLag], tensorboard=False)
    gen = torch.Generator().manual_seed(1)
    mus = {k: torch.randn(20, 20, generator=gen) for k in CASES}
    for k, (n, _) in CASES.items():  # |mu|^2 = s^2 / n with s^2 = D (unit noise entries)
        mus[k] *= math.sqrt(D / n) / mus[k].norm()
    noise = {k: torch.randn(20, 20, generator=gen) for k in CASES}
    history: list[dict[str, torch.Tensor]] = []
    for _ in range(STEPS):
        grads = {}
        for k, (_, rho) in CASES.items():
            noise[k] = rho * noise[k] + math.sqrt(1 - rho**2) * torch.randn(20, 20,
                                                                           generator=gen)
            grads[k] = mus[k] + noise[k]
            model[k].weight.grad = grads[k].clone()
        history.append(grads)
        lens.step()
    lens.close()
    return logdir, history


def test_lag_statistics_match_brute_force(run):
    from gradlens.report import load_run

    logdir, history = run
    df = load_run(logdir)
    for step in (EVERY * 10, STEPS):
        g = history[step - 1]
        for k in CASES:
            row = df[(df.step == step) & (df.layer == f"{k}.weight")].set_index("stat").value
            for lag, stat in ((1, "grad_lag1_dot"), (2, "grad_lag2_dot")):
                ref = float((g[k] * history[step - 1 - lag][k]).sum())
                assert row[stat] == pytest.approx(ref, rel=1e-5, abs=1e-3)


def test_advisor_picks_the_white_noise_layer(run):
    logdir, _ = run
    advice = {a.layer: a for a in advise_momentum(logdir, beta=0.9)}
    assert [k for k, a in advice.items() if a.momentum] == ["white.weight"]
    for k in ("white", "quiet"):  # measured: rho 0.003 / -0.043, n 3.89 / 0.048
        n, rho = CASES[k]
        a = advice[f"{k}.weight"]
        assert a.rho == pytest.approx(rho, abs=0.1)
        assert a.noise_to_signal == pytest.approx(n, rel=0.2)
    for a in advice.values():
        assert a.buffer_bytes == 20 * 20 * 4
        assert a.evidence["source"] == "grad_lag"
    assert advice["white.weight"].mse_ratio == pytest.approx(ema_mse_ratio(0.9, 0.0), abs=0.01)
    # rho 0.95 reads as 0.84 and n 4 as 0.35: within a 300-step window, noise with a 20-step
    # memory is partly indistinguishable from signal; the error is on the safe side (no
    # momentum is advised either way)
    persistent = advice["persistent.weight"]
    assert persistent.rho > 0.8 and not persistent.momentum


def test_ema_mse_ratio_against_simulation():
    """V(beta, rho) against the measured error of an EMA of simulated AR(1) noise."""
    gen = torch.Generator().manual_seed(3)
    for beta, rho in ((0.9, 0.0), (0.9, 0.8), (0.5, 0.5)):
        e = torch.zeros(4000)
        m = torch.zeros(4000)
        errs = []
        for t in range(600):
            e = rho * e + math.sqrt(1 - rho**2) * torch.randn(4000, generator=gen)
            m = beta * m + (1 - beta) * e
            if t > 200:
                errs.append(float(m.square().mean()))
        assert sum(errs) / len(errs) == pytest.approx(ema_mse_ratio(beta, rho), rel=0.05)


def test_drift_turns_momentum_off(run):
    logdir, _ = run
    advice = {a.layer: a for a in advise_momentum(logdir, beta=0.9, drift=1.0)}
    assert not any(a.momentum for a in advice.values())


def test_report_section_and_in_memory_lens(run, tmp_path):
    """The report lists the advice (momentum.csv and a section); a lens without a logdir is
    advised from its memory table with the same answer."""
    from gradlens.report import build_report

    logdir, history = run
    paths = build_report([logdir], tmp_path / "rep", progress=False)
    import pandas as pd

    table = pd.read_csv(paths.tables["momentum"])
    assert table.loc[table.momentum, "layer"].tolist() == ["white.weight"]
    assert "## Momentum advice" in paths.markdown.read_text()

    model = nn.ModuleDict({k: nn.Linear(20, 20, bias=False) for k in CASES})
    lens = GradLens(model, None, preset="minimal", log_every=EVERY, statistics=[GradLag])
    for grads in history:
        for k in CASES:
            model[k].weight.grad = grads[k].clone()
        lens.step()
    lens.close()
    advice = advise_momentum(lens.memory.frame())
    assert [a.layer for a in advice if a.momentum] == ["white.weight"]


def test_layers_without_evidence_get_no_advice():
    import pandas as pd

    df = pd.DataFrame({"step": [1, 1, 2, 2], "layer": ["a", "b", "a", "b"],
                       "role": ["hidden"] * 4, "stat": ["grad_norm"] * 4,
                       "value": [float("nan"), 1.0, float("nan"), 1.0]})
    advice = advise_momentum(df)
    assert [(a.layer, a.momentum) for a in advice] == [("a", False), ("b", False)]
    assert all(math.isnan(a.noise_to_signal) for a in advice)


def test_advisor_study_runs_scale_with_momentum_on_the_advised_matrices(tmp_path, corpus_file):
    """scripts/advisor_study.py on a finished comparison: the probe, the advice table, the
    advised SCALE whose optimizer state is exactly one buffer per advised matrix, and the
    budgeted one within the output layer's buffer bytes."""
    import importlib.util
    import json
    from pathlib import Path

    import pandas as pd

    from gradlens.compare import run_compare

    out = tmp_path / "cmp"
    run_compare(out, optimizers=("adamw", "scale"), lr_factors=(1.0,), steps=4, size="tiny",
                corpus=str(corpus_file), preset="minimal", progress=False, seq_len=16,
                batch_size=2, grad_accum=2, eval_batches=1, vocab_size=300,
                model_overrides={"vocab_size": 300}, seeds=2)
    script = Path(__file__).parents[1] / "scripts" / "advisor_study.py"
    spec = importlib.util.spec_from_file_location("advisor_study", script)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    with pytest.raises(SystemExit, match="ran 4"):
        study.main(["--out", str(out), "--steps", "5", "--quiet"])
    assert study.main(["--out", str(out), "--seeds", "2", "--preset", "minimal", "--quiet"]) == 0

    advice = pd.read_csv(out / "advisor" / "advice.csv")
    assert advice["noise_to_signal"].notna().all()  # grad_lag evidence on every layer
    assert set(advice["source"]) == {"grad_lag"}
    table = pd.read_csv(out / "comparison.csv").set_index("optimizer")
    assert set(table.index) == {"adamw", "scale", "scale_advised", "scale_budget",
                                "colnorm_sgd_momentum_all"}
    assert (table["n_seeds"] == 2).all()
    assert table.loc["scale_advised", "best_lr"] == table.loc["scale", "best_lr"]
    advised = advice[advice["momentum"] & (advice["role"] != "norms")]
    run = next(p for p in (out / "runs").glob("scale_advised-*/result.json"))
    info = json.loads(run.read_text())["info"]["optimizer"]
    assert info["momentum_layers"] == list(advised["layer"])
    # SCALE's state: AdamW's two moments on 1-D tensors + one fp32 buffer per momentum matrix
    output = advice.loc[advice["role"] == "output", "buffer_bytes"].sum()
    expected = (table.loc["scale", "optimizer_state_bytes"] - output
                + advised["buffer_bytes"].sum())
    assert table.loc["scale_advised", "optimizer_state_bytes"] == expected
    # the budgeted choice: never more buffer bytes than the published output-only choice
    assert table.loc["scale_budget", "optimizer_state_bytes"] <= table.loc[
        "scale", "optimizer_state_bytes"]


def test_within_budget_takes_the_largest_gain_per_byte_that_fits():
    from gradlens.advise import MomentumAdvice, within_budget

    def adv(name, role, n, ratio, nbytes, momentum=True):
        return MomentumAdvice(name, role, momentum, n, 0.0, ratio, nbytes)

    advice = [
        adv("emb", "embedding", math.inf, 0.05, 400),   # all noise, but large
        adv("a", "hidden", math.inf, 0.05, 100),        # all noise, small: first
        adv("b", "hidden", 10.0, 0.1, 100),             # gain 9 per 100 bytes
        adv("c", "hidden", 40.0, 0.1, 200),             # gain 36 per 200: better per byte
        adv("d", "hidden", 90.0, 0.1, 100, momentum=False),  # not advised
        adv("g", "vector", math.inf, 0.05, 1),          # a 1-D tensor: AdamW's
        adv("out", "output", 2.0, 0.5, 300),
    ]
    assert within_budget(advice, 300) == ["a", "c"]
    assert within_budget(advice, 400) == ["a", "b", "c"]
    assert within_budget(advice, 10_000) == ["emb", "a", "b", "c", "out"]
    assert within_budget(advice, 0) == []
    with pytest.raises(ValueError, match="budget_bytes"):
        within_budget(advice, -1)
