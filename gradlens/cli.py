"""``gradlens demo | compare | report | dashboard``: argument parsing only."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

from gradlens.core.config import PRESETS


def _int_in(low: int, high: int | None = None):
    """An argparse type: an integer in ``[low, high]`` (a clear message naming the flag)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            rng = f"in {low}..{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"expected an integer {rng}, got {text!r}")
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _demo(args: argparse.Namespace) -> int:
    from gradlens.demo import run_demo

    run_demo(
        out_dir=args.out, steps=args.steps, size=args.size, optimizers=args.optimizers,
        corpus=args.corpus, seed=args.seed, preset=args.preset, progress=not args.quiet,
    )
    return 0


def _compare(args: argparse.Namespace) -> int:
    from gradlens.compare import run_compare

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    run_compare(
        out_dir=args.out, optimizers=args.optimizers, lr_factors=args.lr_factors,
        steps=args.steps, size=args.size, corpus=args.corpus, seed=args.seed,
        preset=args.preset, progress=not args.quiet, seeds=args.seeds,
        sweep_seeds=args.sweep_seeds,
    )
    return 0


def _report(args: argparse.Namespace) -> int:
    from gradlens.report.build import build_report

    paths = build_report(args.runs, args.out, title=args.title, progress=not args.quiet)
    print(f"report: {paths.html}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from gradlens.report.export import export_csv

    path, n = export_csv(args.run, args.out)
    print(f"export: {n} rows -> {path}")
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    from gradlens.tensorboard.launcher import LOG_FILE, serve

    def ready(proc, url: str) -> None:
        print(f"TensorBoard (pid {proc.pid}) is serving {args.run_dir} at {url}  (Ctrl-C to "
              f"stop; its log: {args.run_dir}/{LOG_FILE})", flush=True)

    return serve(args.run_dir, port=args.port, on_ready=ready)


def model_sizes() -> list[str]:
    """Every ``--size`` the demo and compare accept."""
    from gradlens.data.models import LLAMA_SIZES
    from gradlens.experiment import MODEL_PRESETS

    return [*MODEL_PRESETS, *(s for s in LLAMA_SIZES if s not in MODEL_PRESETS)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradlens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small LLaMA with SCALE and AdamW under the lens, "
                                       "then write the report")
    demo.add_argument("--out", default="gradlens_demo", help="output directory")
    demo.add_argument("--steps", type=_int_in(1), default=None, help="optimizer steps per run")
    demo.add_argument("--size", default="demo", choices=model_sizes(),
                      help="model size (demo: hidden 128, 4 layers; tiny: hidden 32, 2 layers; "
                           "small: hidden 256, 4 layers; the papers' 60m .. 1b)")
    demo.add_argument("--optimizers", nargs="+", default=["scale", "adamw"],
                      help="optimizers to run one after the other")
    demo.add_argument("--corpus", default=None,
                      help="a text file or directory (default: Shakespeare's plays)")
    demo.add_argument("--seed", type=_int_in(0), default=0)
    demo.add_argument("--preset", default="full", choices=list(PRESETS),
                      help="lens preset (default: full, every estimator and verdict)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)

    from gradlens.compare import COMPARE_STEPS, DEFAULT_LR_FACTORS, DEFAULT_OPTIMIZERS

    compare = sub.add_parser("compare", help="several optimizers, a small lr sweep each, on the "
                                             "same model and data; table, curves, report")
    compare.add_argument("--out", default="gradlens_compare", help="output directory "
                         "(finished runs in it are not redone)")
    compare.add_argument("--optimizers", nargs="+", default=list(DEFAULT_OPTIMIZERS))
    compare.add_argument("--lr-factors", nargs="+", type=_positive_float, default=list(DEFAULT_LR_FACTORS),
                         help="multipliers of each optimizer's default lr")
    compare.add_argument("--steps", type=_int_in(1), default=COMPARE_STEPS)
    compare.add_argument("--size", default="demo", choices=model_sizes())
    compare.add_argument("--corpus", default=None)
    compare.add_argument("--seed", type=_int_in(0), default=0)
    compare.add_argument("--seeds", type=_int_in(1), default=1,
                         help="seeds per (optimizer, lr): mean +- std and a bootstrap 95%% CI "
                              "of the held-out loss, best lr on the seed mean")
    compare.add_argument("--sweep-seeds", type=_int_in(1), default=None, metavar="K",
                         help="tune, then confirm: the lr sweep runs the first K seeds, the "
                              "other seeds run only at each optimizer's best lr (default: all)")
    compare.add_argument("--preset", default="full", choices=list(PRESETS),
                         help="lens preset of every run (default: full, every estimator)")
    compare.add_argument("--threads", type=_int_in(1), default=None,
                         help="torch CPU threads (default: torch's)")
    compare.add_argument("--quiet", action="store_true")
    compare.set_defaults(func=_compare)

    report = sub.add_parser("report", help="write the layer-wise report of one or more runs")
    report.add_argument("runs", nargs="+", help="run directories written by the lens")
    report.add_argument("-o", "--out", required=True, help="output directory")
    report.add_argument("--title", default=None)
    report.add_argument("--quiet", action="store_true")
    report.set_defaults(func=_report)

    export = sub.add_parser("export", help="write a run's table in another format (CSV)")
    export.add_argument("run", help="a run directory written by the lens")
    export.add_argument("--csv", action="store_true", required=True,
                        help="write CSV (step,layer,role,stat,value; the only export format)")
    export.add_argument("-o", "--out", default=None,
                        help="output file (default: <run>.csv beside the run directory)")
    export.set_defaults(func=_export)

    dash = sub.add_parser("dashboard", help="serve a run directory with TensorBoard")
    dash.add_argument("run_dir")
    dash.add_argument("--port", type=_int_in(1, 65535), default=None)
    dash.set_defaults(func=_dashboard)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"gradlens {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
