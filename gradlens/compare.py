"""``gradlens compare``: several optimizers on the same model and data, each under the lens.

For every optimizer a small learning-rate sweep (its demo-scale default lr,
:data:`gradlens.experiment.DEFAULT_LRS`, times a few factors) runs on the same initialization, tokenizer and batches. Finished runs are not redone
(each run directory keeps its ``result.json``), so an interrupted comparison resumes. Outputs
in ``out_dir``:

    runs/<optimizer>-lr<lr>/   the lens's run directory + result.json, one per sweep point
    comparison.csv / .md       best eval loss and perplexity per optimizer, tokens,
                               optimizer-state bytes, weights + state relative to AdamW,
                               step time relative to AdamW (measured in the same process)
    loss_curves.png            training loss of each optimizer's best run
    report/                    the lens report across the best runs

The lens runs the ``full`` preset by default (every variance estimator: the comparison is
about why the optimizers differ, and on a small model it costs a few percent at the logging
interval used here).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gradlens.experiment import RunConfig, run_experiment, save_result

DEFAULT_OPTIMIZERS = ("adamw", "scale", "colnorm_sgd", "colnorm_sgd_momentum_all",
                      "sgd_output_momentum", "swan", "stable_spam")
"""Muon is left out by default: torch's Muon runs its iterations in bf16, which is ~400x
slower than AdamW on a CPU; add it with ``--optimizers ... muon`` on a GPU."""
DEFAULT_LR_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
"""A factor-2 grid over 16x: at 100 steps the best lr of a three-point grid sat on an edge for
most optimizers (the first study run); five points bracket it, within the 30-minute budget."""
COMPARE_STEPS = 100
PRIOR_S_PER_STEP = 0.5
"""Seconds per step of a ``demo``-size run (1.84M parameters, 16 x 128 tokens per step, the
``full`` lens, evaluation included), measured in the study (a run of 300 steps took 2.5 min on
2 shared cores, two streams): the estimate's scale before any run of this comparison has
finished, taken as proportional to parameters x tokens per step."""
PRIOR_PARAMS, PRIOR_TOKENS = 1.84e6, 16 * 128


def _lr_tag(lr: float) -> str:
    return f"{lr:.2e}".replace("+", "")


def sweep_points(optimizers: Sequence[str], lr_factors: Sequence[float],
                 lrs: dict[str, float] | None = None) -> list[tuple[str, float]]:
    """``(optimizer, lr)`` pairs: each optimizer's base lr (``lrs``, else the demo-scale
    :data:`gradlens.experiment.DEFAULT_LRS`, else the registry's published value) times every
    factor."""
    from gradlens.experiment import default_lr
    from gradlens.optim.registry import OPTIMIZERS

    points = []
    for name in optimizers:
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; choose from {list(OPTIMIZERS)}")
        base = (lrs or {}).get(name) or default_lr(name)
        points.extend((name, base * f) for f in lr_factors)
    return points


def run_compare(
    out_dir: str | Path = "gradlens_compare",
    optimizers: Sequence[str] = DEFAULT_OPTIMIZERS,
    lr_factors: Sequence[float] = DEFAULT_LR_FACTORS,
    steps: int = COMPARE_STEPS,
    size: str = "demo",
    corpus: str | None = None,
    seed: int = 0,
    preset: str = "full",
    progress: bool = True,
    lrs: dict[str, float] | None = None,
    seeds: int = 1,
    sweep_seeds: int | None = None,
    **config: Any,
) -> list[dict[str, Any]]:
    """Run the sweep (skipping finished runs), then write the table, curves and report.

    ``seeds > 1`` repeats every (optimizer, lr) with seeds ``seed .. seed + seeds - 1`` (run
    directories ``<optimizer>-lr<lr>-seed<s>``, each resumable on its own); the table then
    has the mean, standard deviation and bootstrap 95% CI of the held-out loss over seeds,
    and the best lr is the one with the lowest seed mean (:func:`comparison_rows`).
    ``sweep_seeds = K < seeds`` tunes first and confirms after: the lr sweep runs the first
    ``K`` seeds, then the other ``seeds - K`` run only at each optimizer's best lr on the
    ``K``-seed mean (the cost of ``K`` sweeps plus ``seeds - K`` runs per optimizer).

    Returns the comparison rows (one per optimizer, at its best lr).
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds!r}")
    sweep_seeds = seeds if sweep_seeds is None else sweep_seeds
    if not 1 <= sweep_seeds <= seeds:
        raise ValueError(f"sweep_seeds must be in 1..seeds={seeds}, got {sweep_seeds!r}")
    from gradlens import GradLens
    from gradlens.data.batches import prepare_data

    if "adamw" not in optimizers:
        raise ValueError("the comparison is relative to AdamW: include 'adamw' in optimizers")
    out = Path(out_dir)
    config.setdefault("batch_size", 8)
    config.setdefault("grad_accum", 2)
    points = sweep_points(optimizers, lr_factors, lrs)
    cfg = RunConfig(size=size, optimizers=tuple(optimizers), steps=steps, corpus=corpus,
                    seed=seed, out_dir=str(out), **config)
    data = None
    session = f"{os.getpid()}-{time.time():.0f}"
    every = max(1, min(5, steps // 20))  # enough logged steps for the report's verdicts
    sweep = [(name, lr, seed + j) for name, lr in points for j in range(sweep_seeds)]
    n_runs = len(sweep) + len(optimizers) * (seeds - sweep_seeds)

    def confirm() -> list[tuple[str, float, int]]:  # the other seeds at each best lr
        if sweep_seeds == seeds:
            return []
        tuned = _best_lrs(_load_results(out), range(seed, seed + sweep_seeds))
        return [(name, tuned[name], seed + j) for name in optimizers
                for j in range(sweep_seeds, seeds)]

    def run_dir_of(name: str, lr: float, run_seed: int) -> Path:
        return out / "runs" / (f"{name}-lr{_lr_tag(lr)}" if seeds == 1
                               else f"{name}-lr{_lr_tag(lr)}-seed{run_seed}")

    done = sum((run_dir_of(*point) / "result.json").is_file() for point in sweep)
    todo = n_runs - done  # the confirmation runs count as to do until their lr is known
    s_per_step, basis = seconds_per_step(out, cfg)
    if progress:
        print(f"gradlens compare: {n_runs} runs ({len(optimizers)} optimizers x "
              f"{len(lr_factors)} lrs x {sweep_seeds} seed(s)"
              + (f" + {len(optimizers) * (seeds - sweep_seeds)} confirmation runs" if
                 seeds > sweep_seeds else "")
              + f"), {done} done already, {todo} to run; estimated "
              f"{format_seconds(todo * steps * s_per_step)} ({basis})", flush=True)
    from tqdm.auto import tqdm

    bar = tqdm(total=todo, disable=not progress, desc="runs", unit="run", dynamic_ncols=True)
    bar.set_postfix_str(f"~{format_seconds(todo * steps * s_per_step)} left")
    run_walls: list[float] = []
    for i, (name, lr, run_seed) in enumerate(_chain(sweep, confirm), start=1):
        run_dir = run_dir_of(name, lr, run_seed)
        if (run_dir / "result.json").is_file():
            if progress:
                bar.write(f"[{i}/{n_runs}] {run_dir.name}: done already, skipped")
            if i > len(sweep):  # a confirmation run found finished: one less to do
                bar.total = max(bar.n, bar.total - 1)
                bar.refresh()
            continue
        if data is None:
            data = prepare_data(cfg.corpus, cfg.tokenizer_vocab_size(), cfg.cache_dir,
                                cfg.eval_fraction)
        if progress:
            bar.write(f"[{i}/{n_runs}] {run_dir.name}")
        cfg.lrs = {name: lr}
        cfg.seed = run_seed

        if run_dir.exists():
            shutil.rmtree(run_dir)  # an unfinished run (no result.json) starts over

        def lens_factory(model, optimizer, run_dir=run_dir, name=name):
            return GradLens(model, optimizer, logdir=run_dir, preset=preset, log_every=every,
                            name=run_dir.name, meta={"optimizer_name": name})

        start = time.perf_counter()
        _, result = run_experiment(cfg, name, data, lens_factory=lens_factory,
                                   progress=progress)
        run_walls.append(time.perf_counter() - start)
        result.info.update(session=session, lr=lr, optimizer_name=name, seed=run_seed,
                           wall_s=run_walls[-1])
        save_result(result, run_dir / "result.json")
        bar.update(1)
        per_run = sorted(run_walls)[len(run_walls) // 2]  # this session's median run
        bar.set_postfix_str(f"~{format_seconds((bar.total - bar.n) * per_run)} left")
    bar.close()
    rows = comparison_rows(out)
    write_outputs(out, rows, progress=progress)
    return rows


def seconds_per_step(out: Path, cfg: RunConfig) -> tuple[float, str]:
    """Wall seconds per optimizer step of one run, evaluation and lens included: the median
    ``wall_s / steps`` of the runs already finished in ``out``, else :data:`PRIOR_S_PER_STEP`
    scaled by parameters x tokens per step (a rough figure); with the basis in words."""
    finished = [r for path in sorted((out / "runs").glob("*/result.json"))
                if (r := json.loads(path.read_text())).get("info", {}).get("wall_s")]
    if finished:
        per_step = sorted(r["info"]["wall_s"] / max(1, len(r.get("step_times") or [1]))
                          for r in finished)
        return per_step[len(per_step) // 2], f"the median of the {len(finished)} finished runs"
    from gradlens.experiment import build_model

    model = build_model(cfg.size, seed=None, device="meta", **cfg.model_overrides)
    params = sum(p.numel() for p in model.parameters())
    tokens = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    scale = params / PRIOR_PARAMS * tokens / PRIOR_TOKENS
    return PRIOR_S_PER_STEP * scale, ("rough: a demo run's 0.5 s per step on 2 shared cores, "
                                      f"x{scale:.2g} for parameters x tokens per step")


def format_seconds(seconds: float) -> str:
    """``42 s``, ``7 min``, ``2.5 h``."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _chain(first: list, then: Callable[[], list]):
    """``first``'s items, then those of ``then()``, called only once ``first`` is done."""
    yield from first
    yield from then()


def _load_results(out: Path) -> list[dict[str, Any]]:
    results = []
    for path in sorted((out / "runs").glob("*/result.json")):
        r = json.loads(path.read_text())
        r["run_dir"] = str(path.parent)
        results.append(r)
    if not results:
        raise ValueError(f"{out} holds no finished runs (runs/*/result.json)")
    return results


def seed_summary(losses: Sequence[float], n_boot: int = 2000, seed: int = 0
                 ) -> dict[str, float]:
    """Mean, sample standard deviation and a percentile bootstrap 95% CI of the mean of the
    held-out losses of one (optimizer, lr) over seeds (resampling seeds with replacement;
    the CI is the mean itself for one seed; non-finite losses count as +inf)."""
    import numpy as np

    x = np.array([v if v is not None and math.isfinite(v) else math.inf for v in losses])
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if len(x) > 1 else 0.0
    if len(x) > 1 and np.isfinite(x).all():
        rng = np.random.default_rng(seed)
        boots = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
        low, high = (float(v) for v in np.percentile(boots, [2.5, 97.5]))
    else:
        low = high = mean
    return {"loss_mean": mean, "loss_std": std, "loss_ci_low": low, "loss_ci_high": high,
            "n_seeds": len(x)}


def _groups(results: list[dict[str, Any]]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    """Finished runs by ``(optimizer, lr)``, each with ``_name``, ``_seed`` and ``_loss``
    (+inf where the held-out loss is missing or not finite)."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in results:
        name = r["info"].get("optimizer_name") or r["info"]["optimizer"].get("name")
        loss = r.get("eval_loss")
        r["_loss"] = math.inf if loss is None or not math.isfinite(loss) else loss
        r["_name"], r["_seed"] = name, r["info"].get("seed", 0)
        groups.setdefault((name, float(r["info"].get("lr") or 0.0)), []).append(r)
    for members in groups.values():
        members.sort(key=lambda m: m["_seed"])
    return groups


def _best_lrs(results: list[dict[str, Any]], seeds: Sequence[int] | None = None
              ) -> dict[str, float]:
    """Per optimizer, the lr of the lowest mean held-out loss over ``seeds`` (None: the
    seeds that every lr of that optimizer has, so that a confirmation seed run at one lr
    only does not decide)."""
    groups = _groups(results)
    names = dict.fromkeys(name for name, _ in groups)
    best: dict[str, float] = {}
    for name in names:
        lrs = {lr: members for (n, lr), members in groups.items() if n == name}
        common = (set(seeds) if seeds is not None
                  else set.intersection(*({m["_seed"] for m in ms} for ms in lrs.values())))

        def score(lr: float, common=common, lrs=lrs) -> float:
            losses = [m["_loss"] for m in lrs[lr] if m["_seed"] in common]
            return sum(losses) / len(losses) if losses else math.inf

        best[name] = min(lrs, key=score)
    return best


def comparison_rows(out_dir: str | Path) -> list[dict[str, Any]]:
    """One row per optimizer at its best lr (lowest finite eval loss; with several seeds the
    lowest mean over the seeds every lr has), relative to AdamW; with several seeds the row's
    mean, std and CI are over all seeds at that lr."""
    results = _load_results(Path(out_dir))
    groups = _groups(results)
    best: dict[str, dict[str, Any]] = {}
    summaries: dict[str, dict[str, float]] = {}
    curves: dict[str, list[list[float]]] = {}
    for name, lr in _best_lrs(results).items():
        members = groups[(name, lr)]
        best[name], summaries[name] = members[0], seed_summary([m["_loss"] for m in members])
        curves[name] = [m["losses"] for m in members]
    if "adamw" not in best:
        raise ValueError("no finished AdamW run to compare with")
    ref = best["adamw"]
    multi = any(len(v) > 1 for v in groups.values())
    params = ref["info"]["parameters"]
    rows = []
    for name, r in best.items():
        weights = 4 * r["info"]["parameters"]
        same_process = r["info"].get("session") == ref["info"].get("session")
        step = r.get("mean_step_s") or r.get("first_step_s")
        ref_step = ref.get("mean_step_s") or ref.get("first_step_s")
        rows.append({
            "optimizer": name,
            "best_lr": r["info"].get("lr"),
            "best_eval_loss": r["eval_loss"],
            "eval_ppl": r.get("eval_ppl"),
            "tokens": r["tokens_seen"],
            "optimizer_state_bytes": r["optimizer_state_bytes"],
            "weights_plus_state_vs_adamw": (weights + r["optimizer_state_bytes"])
            / (4 * params + ref["optimizer_state_bytes"]),
            "step_time_vs_adamw": step / ref_step if step and ref_step else math.nan,
            "step_time_same_process": same_process,
            "loss_vs_adamw": r["eval_loss"] / ref["eval_loss"] - 1.0
            if r["eval_loss"] is not None and ref["eval_loss"] else math.nan,
            "run_dir": r["run_dir"],
            "losses": r["losses"],
            "seed_losses": curves[name],
        })
        if multi:  # several seeds: the seed means decide and compare
            rows[-1].update(summaries[name])
            rows[-1]["loss_vs_adamw"] = (summaries[name]["loss_mean"]
                                         / summaries["adamw"]["loss_mean"] - 1.0)
    key = "loss_mean" if multi else "best_eval_loss"
    rows.sort(key=lambda row: (row["optimizer"] != "adamw", row[key] or math.inf))
    return rows


def write_outputs(out: Path, rows: list[dict[str, Any]], progress: bool = True) -> None:
    """comparison.csv / .md, loss_curves.png and the lens report of the best runs."""
    import pandas as pd

    from gradlens.report.build import build_report

    table = pd.DataFrame([{k: v for k, v in r.items() if k not in ("losses", "seed_losses")}
                          for r in rows])
    table.to_csv(out / "comparison.csv", index=False)
    cols = ["optimizer", "best_lr", "best_eval_loss", "eval_ppl", "loss_vs_adamw", "tokens",
            "optimizer_state_bytes", "weights_plus_state_vs_adamw", "step_time_vs_adamw"]
    if rows and "loss_mean" in rows[0]:
        cols[2:3] = ["loss_mean", "loss_std", "loss_ci_low", "loss_ci_high", "n_seeds"]
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        md.append("| " + " | ".join(cells) + " |")
    (out / "comparison.md").write_text("\n".join(md) + "\n")
    _loss_curves(rows, out / "loss_curves.png")
    build_report([r["run_dir"] for r in rows], out / "report", title="gradlens compare",
                 progress=progress)
    if progress:
        print("\n" + "\n".join(md))
        print(f"\nreport: {out / 'report' / 'report.html'}")


def _loss_curves(rows: list[dict[str, Any]], path: Path) -> None:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in rows:
        runs = r.get("seed_losses") or [r["losses"]]
        length = min(len(c) for c in runs)
        curve = np.array([c[:length] for c in runs], dtype=float)
        steps = np.arange(1, length + 1)
        label = f"{r['optimizer']} (lr {r['best_lr']:.1e}" + (
            f", {len(runs)} seeds)" if len(runs) > 1 else ")")
        mean = curve.mean(axis=0)
        (line,) = ax.plot(steps, mean, label=label)
        if len(runs) > 1:  # the band: seed mean +- one standard deviation
            spread = curve.std(axis=0, ddof=1)
            ax.fill_between(steps, mean - spread, mean + spread, color=line.get_color(),
                            alpha=0.2, linewidth=0)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("best lr of each optimizer (band: +-1 std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
