"""Lens overhead as a user meets it: default sinks, gradient accumulation, two optimizers.

One copy of a LLaMA (``build_llama("small")``: hidden 256, 4 layers, vocabulary 4096,
unless changed) per optimizer (AdamW, and SCALE with its published groups). A step is 2
micro-batches of 8 x 128 random tokens (``loss / 2`` each). Every round visits each
configuration (a preset and ``log_every``) in a random order and times a pair of adjacent
blocks of ``--block`` steps on that optimizer's model, in a random order: one bare, one with a
new lens attached (the default sinks, ``stats.csv`` and a TensorBoard event file, in a
temporary run directory; untimed steps first, up to the lens's first logged step and its
flush (``log_every`` steps, one for ``never``: what a run pays once, such as its plans, the
sinks' files and the first walk of the model, stays out of the block), then the block, its
last flush's writing included; then the lens is closed, leaving no hook). The block is a multiple of every
``log_every``, so flushes are counted at their real rate. The figure is the median over rounds
of the pair's time ratio, with its quartiles; ``bare (again)`` (two bare blocks) is the noise
floor. Why pairs of adjacent blocks on one model copy: two copies of the same model differed
by up to 6% here (memory placement), and the machine's speed drifts over minutes, both more
than the overheads measured. Wall time and CPU time (this process, every thread) are both
shown, and the memory the lens keeps between steps, relative to the parameter bytes.

    python benchmarks/bench_lens_user.py [--threads 1] [--rounds 15] [--vocab 4096]
        [--layers 4] [--presets minimal standard full] [--log-every 1 10 never]
        [--optimizers adamw scale] [--io thread inline] [--narrow] [--quick]

``--narrow`` is the real-tensor-count model: hidden 64, 32 decoder layers (291 tensors, as
LLaMA-7B), where the step's compute is small and the lens's per-tensor host work shows. Each
row also gives the lens's host time per tracked tensor per step: the median over rounds of
(lens block - adjacent bare block) / (steps x tracked tensors), in microseconds: of wall
time, of the process's CPU time (every thread, the sinks' writer thread included) and of the
training thread's CPU time (``time.thread_time``: the host work the step itself waits for;
the writer thread runs beside it, on another core where the machine has one).

``--pe-sample 2`` adds ``full`` with ``per_example_sample=2`` (2 examples of each micro-batch
read for the per-example estimators: unbiased, noisier), shown as ``full:pe2``.

``--log-every never`` times unlogged steps alone (``log_every`` beyond the run: the block
holds no logged step, and its last flush writes only the spike detectors' events), the row
the target on unlogged steps' host time per tensor is read from.

``--io inline`` adds each preset with ``background_io=False`` (the sinks write on the
training thread), shown as ``<preset>:inline``.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from gradlens import GradLens
from gradlens.data import build_llama
from gradlens.optim import SCALE, scale_param_groups

PRESETS = ("minimal", "standard", "gns", "full")
NEVER = 0  # --log-every never: no logged step in any block
#: ``log_every`` given to the lens for ``never``: beyond any benchmark's run
NEVER_EVERY = 10**9


def every_arg(text: str) -> int:
    """``--log-every`` value: a positive int, or ``never`` (:data:`NEVER`)."""
    if text == "never":
        return NEVER
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"--log-every takes positive ints or 'never', got {text}")
    return value


def every_name(every: int) -> str:
    return "never" if every == NEVER else str(every)


def make_optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (foreach) or SCALE with its published parameter groups."""
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    if name == "scale":
        return SCALE(scale_param_groups(model, lr=1e-4, lr_1d=1e-3))
    raise ValueError(f"unknown optimizer {name!r}; choose adamw or scale")


def tensor_bytes(obj: object, seen: set | None = None, depth: int = 0) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj`` through dicts, lists,
    tuples and the attributes of the lens's own objects (views of one storage, such as the
    rows of stacked temporal states, count once)."""
    seen = set() if seen is None else seen
    if depth > 6 or id(obj) in seen:
        return 0
    seen.add(id(obj))
    if torch.is_tensor(obj):
        storage = obj.untyped_storage()
        key = ("storage", obj.device, storage.data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen, depth + 1) for v in obj)
    if type(obj).__module__.startswith("gradlens.") and hasattr(obj, "__dict__"):
        return sum(tensor_bytes(v, seen, depth + 1) for k, v in vars(obj).items()
                   if k not in ("lens", "model", "optimizer", "layers", "scaler"))
    return 0


def lens_bytes(lens: GradLens) -> int:
    """Bytes of every tensor the lens keeps between steps (family state, constants)."""
    seen: set = {id(i.param) for i in lens.layers}  # the parameters are the model's
    seen |= {("storage", i.param.device, i.param.untyped_storage().data_ptr())
             for i in lens.layers}
    return (tensor_bytes(lens._consts, seen) + tensor_bytes(lens.summary_plans, seen)
            + sum(tensor_bytes(f, seen) for f in lens.families))


class Arm:
    """One optimizer's model copy and optimizer. Every configuration of that optimizer runs
    on it, a lens being attached for a block and closed after it, so that no ratio carries
    the difference between two copies of the model (their memory placement alone moved the
    bare step by up to 6% here)."""

    def __init__(self, model: torch.nn.Module, optimizer: str) -> None:
        self.model = copy.deepcopy(model)
        self.opt = make_optimizer(optimizer, self.model)

    def steps(self, batches: Sequence[torch.Tensor], lens: GradLens | None = None
              ) -> tuple[float, float, float]:
        """Wall, CPU (every thread) and training-thread CPU seconds of one optimizer step per
        batch (2 micro-batches each), and with a lens, of writing its last flush
        (``flush(wait=True)``)."""
        t0, c0, h0 = time.perf_counter(), time.process_time(), time.thread_time()
        for ids in batches:
            for micro in ids.chunk(2):
                loss = self.model(input_ids=micro, labels=micro).loss / 2
                loss.backward()
                if lens is not None:
                    lens.observe_loss(loss)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        if lens is not None:
            lens.flush(wait=True)
        return time.perf_counter() - t0, time.process_time() - c0, time.thread_time() - h0

    def hooked(self) -> bool:
        """Whether any module or parameter hook is still installed (a closed lens leaves none)."""
        return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                   or m._backward_pre_hooks for m in self.model.modules()) or any(
            getattr(p, "_post_accumulate_grad_hooks", None) for p in self.model.parameters())


def sample_of(name: str) -> int:
    """``per_example_sample`` of a configuration named ``<opt>/full:pe<m>/<every>`` (else 0)."""
    return int(name.split(":pe")[1].split("/")[0]) if ":pe" in name else 0


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15, help="timed blocks per configuration")
    p.add_argument("--block", type=int, default=10,
                   help="steps per timed block (a multiple of every --log-every)")
    p.add_argument("--warmup", type=int, default=1, help="untimed blocks per configuration")
    p.add_argument("--threads", type=int, choices=(1, 2), default=1, help="torch threads")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary (4096, 32000, 50257)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (4 or 8)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=16, help="examples per step (2 micro-batches)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS))
    p.add_argument("--log-every", nargs="+", type=every_arg, default=[1, 10],
                   help="log_every values; 'never': unlogged steps only")
    p.add_argument("--optimizers", nargs="+", choices=("adamw", "scale"),
                   default=["adamw", "scale"])
    p.add_argument("--io", nargs="+", choices=("thread", "inline"), default=["thread"],
                   help="where the sinks write: the writer thread (default) and/or the "
                        "training thread (background_io=False)")
    p.add_argument("--pe-sample", nargs="*", type=int, default=[], metavar="M",
                   help="also `full` reading M examples per micro-batch (per_example_sample)")
    p.add_argument("--narrow", action="store_true",
                   help="hidden 64, 32 layers (291 tensors): the per-tensor cost at a real "
                        "tensor count")
    p.add_argument("--quick", action="store_true",
                   help="tiny model, 2 rounds of 2-step blocks: proves the script runs")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.block, args.warmup, args.log_every = 2, 2, 1, [1, 2]
    if args.narrow:
        args.hidden, args.layers = 64, 32
    bad = [e for e in args.log_every if e != NEVER and args.block % e]
    if bad:
        p.error(f"--block {args.block} must be a multiple of every --log-every (not {bad})")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, object]]:
    """Run the benchmark, print the table and return its rows."""
    args = parse(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.quick:
        model = build_llama("tiny")
        args.batch, args.seq = 4, 16
    else:
        model = build_llama("small", hidden_size=args.hidden, vocab_size=args.vocab,
                            num_hidden_layers=args.layers,
                            intermediate_size=int(args.hidden * 688 / 256))
    vocab = model.config.vocab_size
    n_batches = max(args.block, 4)
    data = torch.randint(0, vocab, (n_batches, args.batch, args.seq))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    root = Path(tempfile.mkdtemp(prefix="gradlens-bench-"))
    configs: list[tuple[str, str, str | None, int]] = []  # (name, optimizer, preset, every)
    for opt in args.optimizers:
        configs.append((f"{opt}/bare (again)", opt, None, 1))
        configs += [(f"{opt}/{preset}{'' if io == 'thread' else ':' + io}/"
                      f"{every_name(every)}", opt, preset, every)
                     for io in args.io for preset in args.presets for every in args.log_every]
        configs += [(f"{opt}/full:pe{m}/{every_name(every)}", opt, "full", every)
                    for m in args.pe_sample for every in args.log_every]
    arms = {opt: Arm(model, opt) for opt in args.optimizers}
    wall: dict[str, list[float]] = {c[0]: [] for c in configs}  # per-round ratios
    cpu: dict[str, list[float]] = {c[0]: [] for c in configs}
    per_tensor: dict[str, list[float]] = {c[0]: [] for c in configs}  # us per tensor per step
    per_tensor_cpu: dict[str, list[float]] = {c[0]: [] for c in configs}
    per_tensor_thread: dict[str, list[float]] = {c[0]: [] for c in configs}
    tensors = sum(1 for p in model.parameters() if p.requires_grad)
    bare_ms: dict[str, list[float]] = {opt: [] for opt in args.optimizers}
    mem: dict[str, int] = {}
    rng = random.Random(0)
    try:
        for r in range(-args.warmup, args.rounds):
            start = (r * args.block) % n_batches
            batches = [data[(start + i) % n_batches] for i in range(args.block + 1)]
            for name, opt, preset, every in rng.sample(configs, len(configs)):
                arm = arms[opt]
                timed: dict[bool, tuple[float, float, float]] = {}
                for with_lens in rng.sample([False, True], 2):  # the pair, in a random order
                    lens = None
                    if with_lens and preset is not None:
                        lens = GradLens(arm.model, arm.opt, logdir=root / f"{r + args.warmup}-"
                                        f"{name.replace('/', '_')}", preset=preset,
                                        log_every=every or NEVER_EVERY,
                                        background_io=":inline" not in name,
                                        per_example_sample=sample_of(name))
                        # untimed, up to its first logged step: the lens's once-per-run work
                        arm.steps(batches[:1] * (every or 1), lens)
                    timed[with_lens] = arm.steps(batches[1:], lens)
                    if lens is not None:
                        mem[name] = lens_bytes(lens)
                        tensors = len(lens.layers)
                        lens.close()
                        if arm.hooked():
                            raise RuntimeError(f"{name}: the closed lens left hooks installed")
                if r >= 0:
                    wall[name].append(timed[True][0] / timed[False][0])
                    cpu[name].append(timed[True][1] / timed[False][1])
                    bare_ms[opt].append(1e3 * timed[False][0] / args.block)
                    per_tensor[name].append(1e6 * (timed[True][0] - timed[False][0])
                                            / (args.block * tensors))
                    per_tensor_cpu[name].append(1e6 * (timed[True][1] - timed[False][1])
                                                / (args.block * tensors))
                    per_tensor_thread[name].append(1e6 * (timed[True][2] - timed[False][2])
                                                   / (args.block * tensors))
            if not args.quick:
                print(f"{'warm-up' if r < 0 else 'round'} {r + 1 if r >= 0 else r + 1 + args.warmup}"
                      f"/{args.rounds if r >= 0 else args.warmup} done "
                      f"({len(configs)} configurations)", flush=True)
        rows = []
        for name, opt, preset, every in configs:
            q = statistics.quantiles(wall[name], n=4) if len(wall[name]) > 1 else [math.nan] * 3
            rows.append(dict(config=name, optimizer=opt,
                             preset=name.split("/")[1] if preset else "bare (again)",
                             log_every=every_name(every) if preset else "-",
                             wall=statistics.median(wall[name]), cpu=statistics.median(cpu[name]),
                             q1=q[0], q3=q[2], ms=statistics.median(bare_ms[opt]),
                             us_tensor=statistics.median(per_tensor[name]),
                             us_tensor_cpu=statistics.median(per_tensor_cpu[name]),
                             us_tensor_thread=statistics.median(per_tensor_thread[name]),
                             mem=100 * mem.get(name, 0) / param_bytes))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    shape = ("tiny" if args.quick else
             f"hidden {args.hidden}, {args.layers} layers, vocabulary {vocab}")
    print(f"\nLLaMA ({shape}; {param_bytes / 1e6:.1f} MB of parameters), steps of 2 x "
          f"{args.batch // 2} x {args.seq} tokens, {tensors} tracked tensors, "
          f"{args.threads} thread(s), default sinks "
          f"(Parquet table + TensorBoard); {args.rounds} rounds of {args.block}-step blocks. Ratio: "
          "median over rounds of (block time / the adjacent bare block's time, same model "
          "copy); IQR: quartiles of those ratios. 'bare (again)': the noise floor. "
          "us/tensor: median of (lens block - bare block) per step per tracked tensor, in "
          "wall, in CPU time (this process, every thread: the sinks' writer included) and in "
          "the training thread's CPU time (what the step waits for: the writer thread runs "
          "beside it).")
    print(f"{'optimizer':9s} {'preset':15s} {'log_every':>9s} {'wall':>7s} {'CPU':>7s} "
          f"{'wall IQR':>13s} {'us/tensor':>9s} {'(CPU)':>7s} {'(thread)':>8s} "
          f"{'lens memory':>11s}")
    for opt in args.optimizers:
        print(f"{opt:9s} {'bare':15s} {'-':>9s} {'1':>7s} {'1':>7s} {'':13s} {'-':>9s} {'-':>7s} "
              f"{'-':>8s} {'-':>11s}   "
              f"({statistics.median(bare_ms[opt]):.1f} ms/step)")
        for row in rows:
            if row["optimizer"] == opt:
                print(f"{opt:9s} {row['preset']:15s} {row['log_every']!s:>9s} "
                      f"{row['wall']:7.3f} {row['cpu']:7.3f} "
                      f"{row['q1']:6.3f}-{row['q3']:6.3f} {row['us_tensor']:9.1f} "
                      f"{row['us_tensor_cpu']:7.1f} {row['us_tensor_thread']:8.1f} "
                      + (f"{row['mem']:10.2f}%" if row["mem"] else f"{'-':>11s}"))
    b = args.batch // 2  # examples per micro-batch
    for m in args.pe_sample:
        if 0 < m < b:
            print(f"full:pe{m}: {m} of {b} examples of each micro-batch read, scaled by "
                  f"{b / m:g}; unbiased, with the extra variance b^2 (1 - m/b) s^2 / m = "
                  f"{b * b * (1 - m / b) / m:g} s^2 on each micro-batch's sum of squared "
                  "per-example norms (s^2: their variance over the micro-batch's examples; "
                  "docs/api.md)")
    return rows


if __name__ == "__main__":
    main()
