"""``gradlens demo``: SCALE and AdamW on a small LLaMA and real text, under the lens.

Both runs share the initialization, the tokenizer and the batches; each writes its own run
directory (TensorBoard events with the dashboards, the long table, spikes, run.json), then
one report compares them. Everything is local: the corpus is Shakespeare's plays (installed
with gradlens's setup) or any text the user points at; the tokenizer is trained on it and
cached.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradlens.experiment import RunConfig, run_experiment, save_result
from gradlens.training import TrainResult

DEMO_STEPS = 150
DEMO_BATCH = 8
DEMO_ACCUM = 2  # two micro-batches per step: the two-batch variance estimator has data


@dataclass
class DemoResult:
    """Paths and measurements of a finished demo."""

    out_dir: Path
    runs: dict[str, Path]
    results: dict[str, TrainResult]
    report_html: Path
    seconds: float

    def summary_table(self) -> str:
        """Plain-text table: eval loss, perplexity, optimizer state, step time, tokens/s.

        Every optimizer is timed the same way: the median wall time of its steps after the
        warm-up steps (:func:`gradlens.training.warmup_steps`), and tokens/s from that
        median. A run that goes first no longer pays for the warm-up of the machine, and a
        step slowed by another process does not move the median.
        """
        head = (f"{'optimizer':12s} {'eval loss':>9s} {'eval ppl':>9s} {'state MB':>9s} "
                f"{'ms/step':>8s} {'tokens/s':>9s}")
        lines = [head, "-" * len(head)]
        for name, r in self.results.items():
            step_ms = 1e3 * (r.median_step_s or float("nan"))
            lines.append(
                f"{name:12s} {r.eval_loss if r.eval_loss is not None else float('nan'):9.3f} "
                f"{r.eval_ppl if r.eval_ppl is not None else float('nan'):9.1f} "
                f"{r.optimizer_state_bytes / 1e6:9.2f} {step_ms:8.0f} {r.median_tokens_per_s:9.0f}"
            )
        lines.append("ms/step and tokens/s: median step after the warm-up steps, the same for "
                     "every optimizer")
        return "\n".join(lines)


def run_demo(
    out_dir: str | Path = "gradlens_demo",
    steps: int | None = None,
    size: str = "demo",
    optimizers: Sequence[str] = ("scale", "adamw"),
    corpus: str | None = None,
    seed: int = 0,
    preset: str = "full",
    progress: bool = True,
    log_every: int = 5,
    **config: Any,
) -> DemoResult:
    """Train one model per optimizer with the lens attached, then write the report.

    Args:
        out_dir: receives ``runs/<optimizer>/`` and ``report/``.
        steps: optimizer steps per run (default 150: both runs and the report take about
            three minutes on 2 CPU cores).
        size: model size (``demo``: hidden 128, 4 layers, vocabulary 4096; ``tiny``: hidden
            32, 2 layers, vocabulary 512; ``small``: hidden 256, 4 layers; the papers' ``60m``
            .. ``1b``): a :data:`gradlens.experiment.MODEL_PRESETS` or ``LLAMA_SIZES`` name.
        optimizers: names of :data:`gradlens.optim.registry.OPTIMIZERS`, run one after the other.
        corpus: a text file or directory; None: Shakespeare's plays.
        seed: initialization and batch order.
        preset: lens preset.
        log_every: lens logging period in steps.
        **config: any other :class:`gradlens.experiment.RunConfig` field.
    """
    from gradlens import GradLens
    from gradlens.data.batches import prepare_data
    from gradlens.report.build import build_report

    if not optimizers:
        raise ValueError("give at least one optimizer")
    t0 = time.perf_counter()
    out = Path(out_dir)
    config.setdefault("batch_size", DEMO_BATCH)
    config.setdefault("grad_accum", DEMO_ACCUM)
    cfg = RunConfig(size=size, optimizers=tuple(optimizers), steps=steps or DEMO_STEPS,
                    corpus=corpus, seed=seed, out_dir=str(out), **config)
    data = prepare_data(cfg.corpus, cfg.tokenizer_vocab_size(), cfg.cache_dir, cfg.eval_fraction)
    if progress:
        print(f"gradlens demo: corpus {data.summary().get('corpus', '?')}, "
              f"{cfg.steps} steps x {cfg.batch_size * cfg.grad_accum} x {cfg.seq_len} tokens "
              f"per optimizer, model '{size}', optimizers {', '.join(optimizers)}", flush=True)

    runs: dict[str, Path] = {}
    results: dict[str, TrainResult] = {}
    for name in optimizers:
        run_dir = out / "runs" / name
        runs[name] = run_dir

        def lens_factory(model, optimizer, run_dir=run_dir, name=name):
            return GradLens(model, optimizer, logdir=run_dir, preset=preset,
                            log_every=log_every, name=name,
                            meta={"demo": cfg.to_dict(), "optimizer_name": name})

        _, result = run_experiment(cfg, name, data, lens_factory=lens_factory,
                                   progress=progress)
        save_result(result, run_dir / "result.json")
        results[name] = result

    report = build_report(list(runs.values()), out / "report", title="gradlens demo",
                          progress=progress)
    demo = DemoResult(out, runs, results, report.html, time.perf_counter() - t0)
    if progress:
        print()
        print(demo.summary_table())
        print(f"\nreport:      {report.html}")
        print(f"TensorBoard: gradlens dashboard {out / 'runs'}")
        print(f"total time:  {demo.seconds:.0f} s")
    return demo
