"""The momentum advisor's study: where should SCALE keep a momentum buffer?

Three SCALE configurations at SCALE's tuned lr, each over the same seeds, in the directory of a
finished ``gradlens compare`` (whose table then has them beside the other optimizers):

- ``scale``: the published choice, momentum on the output layer only (from the comparison);
- ``scale_advised``: momentum exactly on the matrices :func:`gradlens.advise.advise_momentum` picks
  from a probe run (SCALE at the same lr, seed ``--seed``, the ``standard`` lens plus
  :class:`gradlens.families.lag.GradLag` on every step);
- ``scale_budget``: the advised matrices that fit in the published choice's buffer bytes (the
  output layer's), largest expected gain per byte first (:func:`gradlens.advise.within_budget`);
- ``colnorm_sgd_momentum_all``: momentum on every matrix.

Usage (after ``gradlens compare --out OUT --seeds 3 ...``, whose model, data, steps and
schedule it reuses)::

    python scripts/advisor_study.py --out OUT --seeds 3

Writes ``OUT/advisor/advice.csv`` (per layer: advised or not, noise-to-signal ratio, lag
correlation, squared-error ratio, buffer bytes) and refreshes ``OUT/comparison.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="a finished gradlens compare directory (its "
                    "model, data and schedule are reused)")
    ap.add_argument("--steps", type=int, default=None,
                    help="a check: the comparison's steps (an error if they differ)")
    ap.add_argument("--seed", type=int, default=0, help="the first seed, and the probe's")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--preset", default="full")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from gradlens import GradLens, scale_param_groups
    from gradlens.advise import advise_momentum, momentum_table, within_budget
    from gradlens.compare import comparison_rows, run_compare
    from gradlens.experiment import RunConfig, run_experiment
    from gradlens.families.lag import GradLag
    from gradlens.optim import OPTIMIZERS, SCALE, OptimizerSpec, register_optimizer

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows = {row["optimizer"]: row for row in comparison_rows(out)}
    if "scale" not in rows:
        raise SystemExit(f"{out} has no finished SCALE run: run gradlens compare first")
    lr = float(rows["scale"]["best_lr"])
    config = json.loads((Path(rows["scale"]["run_dir"]) / "result.json").read_text())
    config = {k: v for k, v in config["info"]["config"].items()
              if k not in ("optimizers", "lrs", "optimizer_kwargs", "seed", "out_dir")}
    if args.steps is not None and args.steps != config["steps"]:
        raise SystemExit(f"--steps {args.steps}: the comparison in {out} ran {config['steps']}")

    probe = out / "advisor" / "probe"
    run = probe / "run.json"
    if not run.is_file() or not json.loads(run.read_text()).get("ended"):
        cfg = RunConfig(**config, seed=args.seed, lrs={"scale": lr})
        run_experiment(cfg, "scale", progress=not args.quiet, lens_factory=lambda m, o: GradLens(
            m, o, logdir=probe, preset="standard", statistics=[GradLag], log_every=1,
            name="scale-probe"))
    advice = advise_momentum(probe)
    table = momentum_table(advice)
    table.to_csv(out / "advisor" / "advice.csv", index=False)
    # 1-D tensors are AdamW's in SCALE (betas[0] is their momentum): matrices only
    layers = [a.layer for a in advice if a.momentum and a.matrix]
    if not args.quiet:
        print(table.to_string(index=False))
        print(f"advised momentum on {len(layers)} layers: {layers}")

    output_bytes = sum(a.buffer_bytes for a in advice if a.role == "output")
    budget = within_budget(advice, output_bytes)
    if not args.quiet:
        print(f"within the output layer's {output_bytes} bytes: {budget}")

    def build(model, lr, *, momentum_layers, **kw):
        groups = scale_param_groups(model, lr=lr, lr_1d=kw.pop("lr_1d", 20.0 * lr),
                                    momentum_roles=(), momentum_layers=momentum_layers)
        return SCALE(groups)

    added = ("scale_advised", "scale_budget")  # momentum_layers: optimizer_kwargs below
    for name in added:
        OPTIMIZERS.pop(name, None)
        register_optimizer(OptimizerSpec(name, "SCALE with momentum on the given layers", lr,
                                         False, "the comparison's best SCALE lr", build))
    names = ["adamw", "scale", "scale_advised", "scale_budget", "colnorm_sgd_momentum_all"]
    size, steps = config.pop("size"), config.pop("steps")
    try:
        run_compare(out, optimizers=names, lr_factors=[1.0], steps=steps, size=size,
                    seed=args.seed, seeds=args.seeds, preset=args.preset,
                    progress=not args.quiet,
                    lrs={"adamw": float(rows["adamw"]["best_lr"]), "scale": lr,
                         "scale_advised": lr, "scale_budget": lr,
                         "colnorm_sgd_momentum_all": lr},
                    optimizer_kwargs={"scale_advised": {"momentum_layers": layers},
                                      "scale_budget": {"momentum_layers": budget}},
                    **config)
    finally:  # the registry is the package's: leave it as it was
        for name in added:
            OPTIMIZERS.pop(name, None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
