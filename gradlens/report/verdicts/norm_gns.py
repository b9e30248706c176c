"""Does the normalization layers' gradient noise scale predict the whole model's (Gray et al.
2024)? Correlations of the log GNS over steps and the norm/total ratio, from the per-example
rows."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from gradlens.report.verdicts.base import (
    Verdict,
    fmt,
    fmt_p,
    layer_roles,
    layer_sums,
    missing_reason,
    pe_wide,
    select_run,
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
from gradlens.stats.noise_scale import lag1_autocorrelation

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["KIND", "norm_gain_layers", "norm_gns_verdict"]

_NORM_MODULE = re.compile(r"norm|^ln(_|\d|$)")
_GAIN_LEAVES = ("weight", "scale", "gamma", "g")


def norm_gain_layers(layers: Iterable[str], roles: Mapping[str, str] | None = None,
                     meta: Mapping[str, Any] | None = None) -> list[str]:
    """The normalization-gain layers among ``layers``.

    With run.json layer metadata: layers whose ``group`` is ``"norms"`` (the lens's dashboard
    group of 1-D parameters of norm modules) and whose leaf name is a gain (``weight``,
    ``scale``, ``gamma``); norm biases are left out. Without it: kind ``norms`` (or the old role
    ``vector``) and a module
    name component containing ``norm`` (``input_layernorm``, ``norm``, ``final_layer_norm``) or
    GPT-2's ``ln_1`` / ``ln_2`` / ``ln_f``, with a gain leaf.
    """
    names = [str(x) for x in layers]
    groups: dict[str, str] = {}
    if meta and isinstance(meta.get("layers"), Sequence):
        groups = {str(d.get("name")): str(d.get("group", "")) for d in meta["layers"]
                  if isinstance(d, Mapping)}
    roles = roles or {}
    out = []
    for name in names:
        parts = name.lower().split(".")
        if parts[-1] not in _GAIN_LEAVES:
            continue
        if name in groups:
            if groups[name] == "norms":
                out.append(name)
        elif roles.get(name) in ("norms", "vector") and any(_NORM_MODULE.search(p)
                                                             for p in parts[:-1]):
            out.append(name)
    return out


def _fisher_ci(r: float, n_eff: float, level: float = 0.95) -> tuple[float, float]:
    """CI of a Spearman correlation via Fisher's z with the Fieller et al. (1957) variance
    ``1.06 / (n - 3)``, at an effective sample size."""
    if not math.isfinite(r) or n_eff <= 3:
        return math.nan, math.nan
    z = math.atanh(max(min(r, 1 - 1e-12), -1 + 1e-12))
    half = float(sps.norm.ppf(0.5 + level / 2)) * math.sqrt(1.06 / (n_eff - 3))
    return math.tanh(z - half), math.tanh(z + half)


def norm_gns_verdict(
    df: pd.DataFrame,
    *,
    meta: Mapping[str, Any] | None = None,
    run: str | None = None,
    beta: float = 0.8,
    alpha: float = 0.05,
    min_steps: int = 10,
    strong: float = 0.7,
) -> Verdict:
    """Does the normalization layers' GNS predict the total GNS here? (Gray, Tiwari, Bergsma,
    Hestness, NeurIPS 2024, arXiv 2411.00999: the per-example GNS of the normalization layers
    alone tracks the GNS of the whole model.)

    Per step ``t``, from the per-example rows ``pe_trace`` and ``pe_signal``:
    ``total_t = EMA(sum_l tr_l) / EMA(sum_l s_l)`` over every layer with both, and ``norm_t``
    the same over the norm-gain layers (:func:`norm_gain_layers`), ratio of EMAs with factor
    ``beta`` (``0``: per-step ratios); a step is used when every layer of a set has both values
    and both smoothed GNS are positive.

    Numbers: Pearson and Spearman correlations of ``log norm_t`` with ``log total_t`` (scipy's
    p-values, one-sided "positive", which assume independent steps), the lag-1
    autocorrelation ``r`` of the residuals of ``log norm`` regressed on ``log total`` (the EMA
    makes them dependent; a trend shared by both is what is being measured, so it is taken
    out first) and the effective step count ``n (1 - r)/(1 + r)`` (``r`` clipped to
    ``[0, 0.95]``),
    a ``1 - alpha`` (95%) CI of Spearman's rho from Fisher's z at that effective count, the ratio
    ``norm_t / total_t`` (median, quartiles, relative IQR = IQR / median) and the range of the
    total GNS over the run (``total_range`` = max / min).

    Answer ``yes`` when Spearman's rho >= ``strong`` (0.7), its CI lies above 0, and the
    relative IQR of the ratio is <= 0.5 (the norm layers' GNS is a stable multiple of the
    total); ``no`` when the CI's upper bound is below ``strong`` or the relative IQR exceeds
    1; ``cannot tell`` otherwise, or when the total GNS varies by less than a factor 1.25 over
    the run (then there is nothing for a correlation to explain). ``not computable`` (with the
    reason) without per-example rows, without norm-gain layers among them, or with fewer than
    ``min_steps`` usable steps.
    """
    from gradlens.stats.noise_scale import smoothed_noise_scale

    one = select_run(df, run)
    question = "Does the normalization layers' GNS predict the total GNS here?"
    mk = dict(kind="norm_gns", stat="pe_noise_scale", run=run)
    base: dict[str, Any] = {"beta": beta}
    tr, sg = pe_wide(one)
    if tr.empty:
        return Verdict(question, "not computable", base, missing_reason("pe_trace", one, meta),
                       **mk)
    if sg.empty or tr.shape[1] == 0:
        return Verdict(question, "not computable", base,
                       "no pe_signal rows: the per-example |G|^2 estimate per layer is needed "
                       "next to pe_trace (written by lens versions that emit pe_signal)", **mk)
    roles = layer_roles(one)
    norms = norm_gain_layers(tr.columns, roles, meta)
    base.update(n_layers=int(tr.shape[1]), n_norm_layers=len(norms))
    if not norms:
        return Verdict(question, "not computable", base,
                       "the run has no per-example rows for normalization layers (pe_trace / "
                       "pe_signal of norm gains): the per-example family must cover the 1-D "
                       "norm parameters", **mk)
    if len(norms) == tr.shape[1]:
        return Verdict(question, "not computable", base,
                       "only normalization layers have per-example rows: the total GNS would "
                       "be the norm layers' own", **mk)
    t_all, s_all = layer_sums(tr, sg, list(tr.columns))
    t_norm, s_norm = layer_sums(tr, sg, norms)
    ok = (t_all.notna() & s_all.notna() & t_norm.notna() & s_norm.notna()).to_numpy()
    steps = tr.index.to_numpy()[ok]
    total = smoothed_noise_scale(t_all.to_numpy()[ok], s_all.to_numpy()[ok], beta)
    normg = smoothed_noise_scale(t_norm.to_numpy()[ok], s_norm.to_numpy()[ok], beta)
    pos = np.isfinite(total) & np.isfinite(normg) & (total > 0) & (normg > 0)
    n = int(pos.sum())
    base.update(n_steps=n)
    if n < min_steps:
        return Verdict(question, "not computable", base,
                       f"only {n} step(s) with a positive smoothed GNS for both the norm layers "
                       f"and all layers; need >= {min_steps}", **mk)
    lt, ln = np.log(total[pos]), np.log(normg[pos])
    ratio = normg[pos] / total[pos]
    q25, med, q75 = (float(x) for x in np.quantile(ratio, [0.25, 0.5, 0.75]))
    rel_iqr = (q75 - q25) / med
    total_range = float(math.exp(np.ptp(lt)))
    slope, icpt = np.polyfit(lt, ln, 1) if np.ptp(lt) > 0 else (0.0, float(np.mean(ln)))
    # the dependence of the residuals, not of the trend
    ac = lag1_autocorrelation(ln - (icpt + slope * lt))
    r_ac = min(max(ac, 0.0), 0.95) if math.isfinite(ac) else 0.0
    n_eff = n * (1 - r_ac) / (1 + r_ac)
    base.update(first_step=int(steps[pos].min()), last_step=int(steps[pos].max()),
                ratio_median=med, ratio_q25=q25, ratio_q75=q75, ratio_rel_iqr=rel_iqr,
                total_gns_median=float(np.median(total[pos])),
                norm_gns_median=float(np.median(normg[pos])), total_range=total_range,
                lag1_autocorr=ac, n_eff=n_eff)
    if np.ptp(lt) == 0 or np.ptp(ln) == 0:
        base.update(pearson=math.nan, spearman=math.nan)
        return Verdict(question, "cannot tell", base,
                       "the GNS is constant over the run: no correlation to compute", **mk)
    pr = sps.pearsonr(lt, ln, alternative="greater")
    sr = sps.spearmanr(lt, ln, alternative="greater")
    rho = float(sr.statistic)
    lo, hi = _fisher_ci(rho, n_eff, 1.0 - alpha)
    base.update(pearson=float(pr.statistic), pearson_p=float(pr.pvalue), spearman=rho,
                spearman_p=float(sr.pvalue), spearman_ci_low=lo, spearman_ci_high=hi)
    where = f"steps {base['first_step']}..{base['last_step']} (n={n}, effective {n_eff:.0f})"
    head = (f"over {len(norms)} norm-gain layer(s) of {tr.shape[1]}: log GNS correlation "
            f"Spearman {rho:.2f} ({100 * (1 - alpha):g}% CI {fmt(lo, 2)}..{fmt(hi, 2)}, p = "
            f"{fmt_p(float(sr.pvalue))}), Pearson {float(pr.statistic):.2f}; norm/total GNS "
            f"median {fmt(med)} (IQR {fmt(q25)}..{fmt(q75)}), total GNS spans "
            f"x{fmt(total_range)} over {where}")
    if total_range < 1.25:
        answer = "cannot tell"
        head += "; the total GNS hardly varies, so a correlation has little to explain"
    elif rho >= strong and math.isfinite(lo) and lo > 0 and rel_iqr <= 0.5:
        answer = "yes"
    elif (math.isfinite(hi) and hi < strong) or rel_iqr > 1.0:
        answer = "no"
    else:
        answer = "cannot tell"
    if math.isfinite(ac) and ac > 0.5:
        head += (f". Residuals are autocorrelated (lag-1 r = {ac:.2f}, EMA-smoothed): scipy's "
                 "p-values are optimistic, the CI uses the effective count")
    return Verdict(question, answer, base, head + ".", **mk)


# --------------------------------------------------------------------------- the kind


def _compute(data: RunData) -> list[Verdict]:
    return [norm_gns_verdict(data.df, meta=data.meta, alpha=data.options.get("alpha", 0.05))]


def _figures(v: Verdict) -> SummaryFigures:
    """Spearman's rho of log norm-layer GNS with log total GNS, and its one-sided p-value."""
    return SummaryFigures("Spearman rho" if "spearman" in v.numbers else None,
                          v.numbers.get("spearman"), v.numbers.get("spearman_p"))


def _draw(r: RunData, v: Verdict) -> Figure:
    """The smoothed GNS of all layers and of the norm-gain layers over steps (log scale)."""
    from gradlens.report.plots import new_figure
    from gradlens.stats.noise_scale import smoothed_noise_scale

    tr, sg = pe_wide(r.df)
    norms = norm_gain_layers(tr.columns, layer_roles(r.df), r.meta)
    fig = new_figure(8.0, 3.4)
    ax = fig.add_subplot()
    for cols, label, color in ((list(tr.columns), f"all {tr.shape[1]} layers", "#1f618d"),
                               (norms, f"{len(norms)} norm-gain layers", "#b9770e")):
        t, sig = layer_sums(tr, sg, cols)
        gns = smoothed_noise_scale(t.to_numpy(), sig.to_numpy(), v.numbers["beta"])
        shown = np.isfinite(gns) & (gns > 0)
        ax.plot(tr.index.to_numpy()[shown], gns[shown], color=color, lw=1.4, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("GNS (examples)")
    ax.set_title(f"{r.label}: per-example GNS, EMA {v.numbers['beta']:g} "
                 f"(Spearman {v.numbers['spearman']:.2f})")
    ax.legend(loc="best", fontsize=8)
    return fig


def _plots(ctx: ReportContext) -> list[FigureSpec]:
    """One figure per run whose correlation was computed."""
    figs = []
    for r in ctx.runs:
        v = next((v for v in ctx.verdicts if v.kind == "norm_gns" and v.run == r.label), None)
        if v is not None and isinstance(v.numbers.get("spearman"), (int, float)):
            figs.append(FigureSpec(
                f"norm_gns_{r.slug}", "norm_gns",
                f"{r.label}: the smoothed gradient noise scale of all layers and of the "
                "normalization gains alone.", lambda r=r, v=v: _draw(r.only(KIND.needs), v)))
    return figs


def _answer(verdicts: list[Verdict]) -> Answer | None:
    """In words: whether the norm layers' GNS is a stand-in for the whole model's."""
    v = verdicts[0] if verdicts else None
    if v is None or v.answer not in ("yes", "no") or v.numbers.get("spearman") is None:
        return None
    n = v.numbers
    nums = (f"Spearman {n['spearman']:.2f} over {n['n_steps']} steps, norm/total ratio median "
            f"{fmt(n['ratio_median'])}")
    if v.answer == "yes":
        return Answer(f"The normalization layers' GNS tracks the whole model's ({nums}).",
                      "The norm layers alone can monitor the noise scale: the gns preset "
                      "computes per-example norms for them only.")
    return Answer(f"The normalization layers' GNS does not track the whole model's ({nums}).",
                  "Monitor the noise scale over all layers, not the norm layers alone.")


KIND = register_verdict(VerdictKind(
    name="norm_gns",
    title="Does the normalization layers' noise scale predict the whole model's?",
    intro="Gray et al. (2024) find that the per-example gradient noise scale of the "
          "normalization layers alone tracks the noise scale of the whole model; if it does "
          "here, the cheap per-example norms of those layers suffice to monitor it.",
    needs=("pe_trace", "pe_signal", "microbatches"),
    compute=_compute, figures=_figures, plots=_plots, answer=_answer, order=40,
))
