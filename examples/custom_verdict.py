"""A user verdict in one file: "Did the loss fall?", with its summary cells, its section, its
figure and its answer in plain words, registered for the report and the dashboard's Verdicts.

    python examples/custom_verdict.py runs/plain -o runs/plain-report

The test: Spearman's rank correlation of the logged loss with the step (one-sided, H1: the loss
falls), which makes no assumption on the shape of the curve; consecutive steps are correlated,
so the p-value is optimistic, as for every test across steps in the report.
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import stats

from gradlens.report.build import build_report
from gradlens.report.verdicts import (
    Answer,
    FigureSpec,
    ReportContext,
    RunData,
    SummaryFigures,
    Verdict,
    VerdictKind,
    register_verdict,
)

QUESTION = "Did the loss fall over the run?"


def loss_falls(data: RunData) -> list[Verdict]:
    """One verdict: Spearman's rho of the global ``loss`` rows with the step."""
    rows = data.df[(data.df["stat"] == "loss") & (data.df["layer"] == "global")]
    rows = rows.sort_values("step")
    loss = rows["value"].to_numpy(dtype=float)
    ok = np.isfinite(loss)
    steps, loss = rows["step"].to_numpy()[ok], loss[ok]
    if loss.size < 5 or np.ptp(loss) == 0:
        return [Verdict(QUESTION, "not computable", {"n_steps": int(loss.size)},
                        f"only {loss.size} step(s) with a finite, varying loss; need >= 5")]
    res = stats.spearmanr(steps, loss, alternative="less")
    rho, p = float(res.statistic), float(res.pvalue)
    numbers = {"spearman": rho, "p_value": p, "n_steps": int(loss.size),
               "first_loss": float(loss[0]), "last_loss": float(loss[-1]),
               "fraction_below_first": float(np.mean(loss[1:] < loss[0]))}
    answer = "yes" if p < 0.05 else ("no" if rho >= 0 else "cannot tell")
    reason = (f"loss {loss[0]:.4g} at step {steps[0]} -> {loss[-1]:.4g} at step {steps[-1]}; "
              f"Spearman rho with the step {rho:.2f}, one-sided p = {p:.2g} (n = {loss.size}).")
    return [Verdict(QUESTION, answer, numbers, reason, stat="loss")]


def figures(v: Verdict) -> SummaryFigures:
    n = v.numbers
    return SummaryFigures("Spearman rho", n.get("spearman"), n.get("p_value"),
                          n.get("fraction_below_first"))


def answer(verdicts: list[Verdict]) -> Answer | None:
    v = verdicts[0] if verdicts else None
    if v is None or v.answer == "not computable":
        return None
    n = v.numbers
    text = (f"The loss went from {n['first_loss']:.3g} to {n['last_loss']:.3g} over "
            f"{n['n_steps']} steps (Spearman rho {n['spearman']:.2f}).")
    if v.answer == "yes":
        return Answer(text)
    return Answer(text, "The loss did not fall clearly: check the learning rate and the data.")


def plots(ctx: ReportContext) -> list[FigureSpec]:
    def draw(r: RunData):  # the loss and its linear trend; matplotlib only when drawn
        from matplotlib.figure import Figure

        rows = r.df[(r.df["stat"] == "loss") & (r.df["layer"] == "global")].sort_values("step")
        fig = Figure(figsize=(8, 3))
        ax = fig.add_subplot()
        ax.plot(rows["step"], rows["value"], label="loss")
        if len(rows) >= 2:
            slope, icpt = np.polyfit(rows["step"], rows["value"], 1)
            ax.plot(rows["step"], icpt + slope * rows["step"], "--", label="linear trend")
        ax.set_xlabel("step")
        ax.legend()
        return fig

    return [FigureSpec(f"loss_falls_{r.slug}", "loss_falls", f"{r.label}: loss and its trend.",
                       lambda r=r: draw(r)) for r in ctx.runs]


KIND = VerdictKind(
    name="loss_falls", title="Did the loss fall?", needs=("loss",), compute=loss_falls,
    intro="Spearman's rank correlation of the loss with the step (one-sided).",
    figures=figures, plots=plots, answer=answer)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories written by the lens")
    parser.add_argument("-o", "--out", required=True, help="the report directory")
    args = parser.parse_args(argv)
    register_verdict(KIND, replace=True)  # replace: main() may run twice in one process
    paths = build_report(args.runs, args.out, progress=False)
    return str(paths.html)


if __name__ == "__main__":
    print("report:", main())
