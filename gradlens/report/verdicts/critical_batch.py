"""Is the run's batch size below its critical batch size ``B_crit ~ B_simple`` (McCandlish et
al. 2018)? A ratio of means over the last steps with a block-bootstrap interval, spike steps
left out as the lens leaves them out of its EMAs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from gradlens.report.verdicts.base import (
    ROLE_ORDER,
    Verdict,
    fmt,
    layer_roles,
    layer_sums,
    missing_reason,
    pe_wide,
    select_run,
    wide_table,
)
from gradlens.report.verdicts.registry import (
    Answer,
    FigureSpec,
    ReportContext,
    RunData,
    SummaryFigures,
    VerdictKind,
    register_verdict,
)
from gradlens.schema import GLOBAL

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["KIND", "SPIKE_STEP_KINDS", "critical_batch_size_verdict", "spike_steps"]


SPIKE_STEP_KINDS = ("grad_norm", "grad_norm_global", "nonfinite", "skipped_step")


def spike_steps(spikes: pd.DataFrame | None, run: str | None = None) -> set[int]:
    """Steps with a spike event of :data:`SPIKE_STEP_KINDS` (the steps the lens keeps out of
    its variance EMAs)."""
    if spikes is None or spikes.empty or "kind" not in spikes.columns:
        return set()
    sp = select_run(spikes, run) if "run" in spikes.columns else spikes
    return {int(s) for s in sp.loc[sp["kind"].isin(SPIKE_STEP_KINDS), "step"]}


def _batch_size(one: pd.DataFrame, meta: Mapping[str, Any] | None) -> tuple[float | None, str]:
    rows = one[(one["stat"] == "batch_size") & (one["layer"] == GLOBAL)]
    vals = pd.to_numeric(rows.sort_values("step")["value"], errors="coerce").dropna()
    vals = vals[np.isfinite(vals) & (vals > 0)]
    if not vals.empty:
        return float(vals.iloc[-1]), "batch_size rows"
    if meta and isinstance(meta.get("batch_size"), (int, float)) and meta["batch_size"] > 0:
        return float(meta["batch_size"]), "run.json"
    return None, ""


def _estimates(one: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Step x layer ``tr(Sigma)`` and ``|G|^2`` estimates on common steps and layers: the
    per-example ones, else the two-batch ones; and which."""
    tr, sg = pe_wide(one)
    if not (tr.empty or sg.empty or tr.shape[1] == 0):
        return tr, sg, "per-example"
    tr, sg = wide_table(one, "twobatch_trace"), wide_table(one, "twobatch_signal")
    if not tr.empty and not sg.empty:
        cols = [c for c in tr.columns if c in set(sg.columns)]
        idx = tr.index.intersection(sg.index)
        tr, sg = tr.loc[idx, cols], sg.loc[idx, cols]
    return tr, sg, "two-batch"


def critical_batch_size_verdict(
    df: pd.DataFrame,
    *,
    meta: Mapping[str, Any] | None = None,
    run: str | None = None,
    window: int | None = 100,
    beta: float = 0.95,
    ci: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
    min_steps: int = 10,
    spikes: pd.DataFrame | None = None,
) -> Verdict:
    """Is the batch size below the critical batch size (McCandlish et al. 2018)?

    ``B_crit ~ B_simple = tr(Sigma) / |G|**2`` of the whole model (the assumptions are in
    :mod:`gradlens.stats.noise_scale`): per step the sums over all layers of ``pe_trace`` and
    ``pe_signal`` (or, without per-example rows, ``twobatch_trace`` and ``twobatch_signal``),
    a step used when every layer has both. Over the last ``window`` such steps: the ratio of
    means with a circular block-bootstrap percentile interval at level ``ci``
    (:func:`gradlens.stats.noise_scale.noise_scale_readout`), the smoothed ratio of EMAs at the
    last step, and per role the ratio of means of the role's sums (``b_simple_<role>``).
    Steps with a spike event (``spikes``: ``grad_norm``, ``grad_norm_global``, ``nonfinite``,
    ``skipped_step``) are left out, as the lens leaves them out of its EMAs: one spike step
    would otherwise decide a ratio of means (``n_spike_steps_excluded``).

    The batch size ``B`` (examples per optimizer step, all micro-batches and ranks) is the last
    ``batch_size`` global row, else run.json's ``batch_size``. Answer ``yes`` when ``B`` is
    below the interval (more data per step would still speed training up nearly linearly),
    ``no`` when above (a larger batch mostly costs compute), ``cannot tell`` inside it or when
    the mean signal is not positive (no detectable signal), ``not computable`` without the
    estimates, the batch size or ``min_steps`` steps.
    """
    from gradlens.stats.noise_scale import noise_scale_readout

    one = select_run(df, run)
    question = "Is the batch size below the critical batch size?"
    mk = dict(kind="critical_batch", stat="critical_batch_size", run=run)
    base: dict[str, Any] = {"ci": ci, "window": window}
    tr, sg, source = _estimates(one)
    if tr.empty or sg.empty or tr.shape[1] == 0:
        return Verdict(question, "not computable", base,
                       "no (trace, signal) pairs: the critical batch size needs pe_trace and "
                       "pe_signal (full preset) or twobatch_trace and twobatch_signal "
                       f"({missing_reason('twobatch_trace', one, meta)})", **mk)
    bsz, bsz_src = _batch_size(one, meta)
    if bsz is None:
        return Verdict(question, "not computable", base,
                       "the run's batch size is unknown: no batch_size global row and no "
                       "batch_size in run.json", **mk)
    t_all, s_all = layer_sums(tr, sg, list(tr.columns))
    flagged = spike_steps(spikes, run)
    ok = (t_all.notna() & s_all.notna()).to_numpy() & ~tr.index.isin(flagged)
    base["n_spike_steps_excluded"] = int(tr.index.isin(flagged).sum())
    n_ok = int(ok.sum())
    base.update(source=source, batch_size=bsz, batch_size_from=bsz_src,
                n_layers=int(tr.shape[1]))
    if n_ok < min_steps:
        base["n_steps"] = n_ok
        return Verdict(question, "not computable", base,
                       f"only {n_ok} step(s) with {source} estimates for every layer; need >= "
                       f"{min_steps}", **mk)
    steps = tr.index.to_numpy()[ok]
    r = noise_scale_readout(t_all.to_numpy()[ok], s_all.to_numpy()[ok], steps=steps,
                            window=window, beta=beta, ci=ci, n_boot=n_boot, seed=seed)
    base.update(critical_batch_size=r.estimate, ci_low=r.ci_low, ci_high=r.ci_high,
                smoothed=r.smoothed, step=r.step, n_steps=r.n_steps, block=r.block,
                mean_trace=r.mean_trace, mean_signal=r.mean_signal)
    logged = one[(one["stat"] == "critical_batch_size") & (one["layer"] == GLOBAL)]
    if not logged.empty:
        base["logged_critical_batch_size"] = float(logged.sort_values("step")["value"].iloc[-1])
    roles = layer_roles(one)
    lo_step = int(steps[-r.n_steps:][0]) if r.n_steps else None
    win = tr.index >= lo_step if lo_step is not None else np.ones(len(tr.index), bool)
    for role in sorted({roles.get(c, "") for c in tr.columns} - {""},
                       key=lambda x: ROLE_ORDER.get(x, 9)):
        cols = [c for c in tr.columns if roles.get(c) == role]
        t_r, s_r = layer_sums(tr.loc[win], sg.loc[win], cols)
        good = t_r.notna() & s_r.notna()
        ms = float(s_r[good].mean()) if good.any() else math.nan
        base[f"b_simple_{role}"] = (float(t_r[good].mean()) / ms if ms > 0 else
                                    (math.inf if good.any() else math.nan))
    pct = f"{100 * ci:g}%"
    span = f"steps {lo_step}..{r.step} (n={r.n_steps}, {source} estimates)"
    interval = f"~{fmt(r.estimate)} ({pct} CI {fmt(r.ci_low)}..{fmt(r.ci_high)})"
    if not math.isfinite(r.estimate):
        return Verdict(question, "cannot tell", base,
                       f"no detectable gradient signal over {span}: the mean |G|^2 estimate is "
                       f"{fmt(r.mean_signal)} <= 0, so the noise scale is unbounded; the batch "
                       f"size B={bsz:g} is not compared", **mk)
    if bsz < r.ci_low:
        answer, where = "yes", "below"
    elif bsz > r.ci_high:
        answer, where = "no", "above"
    else:
        answer, where = "cannot tell", "within the interval of"
    reason = (f"the batch size B={bsz:g} is {where} the critical batch size {interval} at step "
              f"{r.step}; ratio of means over {span}, smoothed B_simple {fmt(r.smoothed)}. "
              "B_crit ~ B_simple assumes a Hessian close to a multiple of the identity.")
    return Verdict(question, answer, base, reason, **mk)


# --------------------------------------------------------------------------- the kind


def _compute(data: RunData) -> list[Verdict]:
    o = data.options
    return [critical_batch_size_verdict(data.df, meta=data.meta, n_boot=o.get("n_boot", 2000),
                                        seed=o.get("seed", 0), spikes=data.spikes)]


def _figures(v: Verdict) -> SummaryFigures:
    """The critical batch size over the run's batch size (> 1: the batch is below it)."""
    crit, b = v.numbers.get("critical_batch_size"), v.numbers.get("batch_size")
    if isinstance(crit, (int, float)) and isinstance(b, (int, float)) and b > 0 and \
            math.isfinite(crit):
        return SummaryFigures("B_crit / B", crit / b)
    return SummaryFigures()


def _draw(r: RunData, v: Verdict) -> Figure:
    """The smoothed ``B_simple`` over steps (spike steps left out), the readout's interval over
    its window, and the run's batch size."""
    from gradlens.report.plots import new_figure
    from gradlens.stats.noise_scale import smoothed_noise_scale

    tr, sg, source = _estimates(r.df)
    t_all, s_all = layer_sums(tr, sg, list(tr.columns))
    ok = (t_all.notna() & s_all.notna()).to_numpy() & ~tr.index.isin(spike_steps(r.spikes))
    steps = tr.index.to_numpy()[ok]
    smooth = smoothed_noise_scale(t_all.to_numpy()[ok], s_all.to_numpy()[ok], 0.95)
    n = v.numbers
    fig = new_figure(8.0, 3.4)
    ax = fig.add_subplot()
    shown = np.isfinite(smooth) & (smooth > 0)
    ax.plot(steps[shown], smooth[shown], color="#1f618d", lw=1.4,
            label=f"B_simple, EMA 0.95 ({source} estimates)")
    lo = steps[-int(n["n_steps"])] if n.get("n_steps") else steps[0]
    ax.fill_between([lo, steps[-1]], n["ci_low"], n["ci_high"], color="#1f618d", alpha=0.15,
                    label=f"ratio of means, {100 * n['ci']:g}% CI")
    ax.axhline(n["batch_size"], color="#922b21", ls="--", lw=1.2,
               label=f"batch size {n['batch_size']:g}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("examples")
    ax.set_title(f"{r.label}: critical batch size ~ B_simple")
    ax.legend(loc="best", fontsize=8)
    return fig


def _plots(ctx: ReportContext) -> list[FigureSpec]:
    """One figure per run whose critical batch size is finite."""
    figs = []
    for r in ctx.runs:
        v = next((v for v in ctx.verdicts if v.kind == "critical_batch" and v.run == r.label),
                 None)
        crit = None if v is None else v.numbers.get("critical_batch_size")
        if isinstance(crit, (int, float)) and math.isfinite(crit) and \
                math.isfinite(v.numbers.get("ci_high") or math.nan):
            figs.append(FigureSpec(
                f"critical_batch_{r.slug}", "critical_batch",
                f"{r.label}: the noise scale B_simple over steps (smoothed), its interval over "
                "the readout's window, and the run's batch size.",
                lambda r=r, v=v: _draw(r.only(KIND.needs), v)))
    return figs


def _answer(verdicts: list[Verdict]) -> Answer | None:
    """In words: the critical batch size against the run's batch size, and what to change."""
    v = verdicts[0] if verdicts else None
    if v is None or v.answer == "not computable":
        return None
    n = v.numbers
    b = f"{n['batch_size']:g}"
    if n.get("critical_batch_size") is None or not math.isfinite(n["critical_batch_size"]):
        return Answer(f"The critical batch size is unbounded here: no detectable gradient "
                      f"signal over the last {n.get('n_steps')} steps (batch size {b}).",
                      "No batch-size advice from this run: log more steps (or more "
                      "micro-batches) to measure the signal.")
    crit = (f"~{fmt(n['critical_batch_size'])} ({100 * n['ci']:g}% CI {fmt(n['ci_low'])}.."
            f"{fmt(n['ci_high'])}, at step {n['step']})")
    text = f"The critical batch size is {crit}; the run's batch size is {b}."
    if v.answer == "yes":
        nxt = (f"The batch size {b} is below the critical batch size: a larger batch, up to "
               f"~{fmt(n['critical_batch_size'])}, would still cut the steps nearly "
               "proportionally (more accumulation or more ranks).")
    elif v.answer == "no":
        nxt = (f"The batch size {b} is above the critical batch size: a smaller batch, toward "
               f"~{fmt(n['critical_batch_size'])}, reaches the same loss with less compute.")
    else:
        nxt = f"The batch size {b} is within the interval: about right for this point of training."
    return Answer(text, nxt)


KIND = register_verdict(VerdictKind(
    name="critical_batch",
    title="Is the batch size below the critical batch size?",
    intro="Below the critical batch size (McCandlish et al. 2018), a larger batch cuts the "
          "number of steps nearly in proportion; above it, extra examples per step mostly cost "
          "compute. B_crit ~ B_simple = tr(Sigma) / |G|^2 of the whole model.",
    needs=("pe_trace", "pe_signal", "twobatch_trace", "twobatch_signal", "batch_size",
           "critical_batch_size", "microbatches"),
    compute=_compute, figures=_figures, plots=_plots, answer=_answer, order=50,
))
