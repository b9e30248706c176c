"""Step-time overhead and extra memory of the lens on a small LLaMA.

Trains ``build_llama("small")`` (hidden 256, 4 layers, vocabulary 4096) on random tokens,
batch 16 x 128, with AdamW, without the lens and with each preset. Every configuration has
its own copy of the model, optimizer and lens, and the configurations take turns one step at
a time (in a random order each round), so that the machine's drifts in speed hit all of them alike;
each round gives one ratio per configuration to the bare step of the same round, and the
median of those paired ratios is the figure (medians of the raw times are shown beside it).
Prints the memory the lens keeps between steps, too.

    python benchmarks/bench_lens_overhead.py [--rounds 12] [--threads 1] [--presets standard]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch

from gradlens import GradLens
from gradlens.data import build_llama

CONFIGS = [
    ("bare", None, 1),
    ("bare (a second copy)", None, 1),  # its ratio is the noise floor of the measurement
    ("minimal", "minimal", 1),
    ("standard", "standard", 1),
    ("standard, log_every=10", "standard", 10),
    ("full", "full", 1),
    ("full, log_every=10", "full", 10),
]


def lens_bytes(lens: GradLens) -> int:
    """Bytes of every tensor the lens holds between steps (state, constants, buffers)."""
    seen: set[int] = set()
    total = 0

    def visit(obj) -> None:
        nonlocal total
        if torch.is_tensor(obj):
            if id(obj) not in seen:
                seen.add(id(obj))
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)

    visit(lens._consts)
    for family in lens.families:  # each family's state (the lens itself is not counted)
        visit({k: v for k, v in vars(family).items() if k != "lens"})
    return total


class _Run:
    """One configuration: its own model copy, AdamW and (optionally) lens."""

    def __init__(self, model: torch.nn.Module, preset: str | None, log_every: int) -> None:
        self.model = copy.deepcopy(model)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, foreach=True)
        self.lens = None if preset is None else GradLens(
            self.model, self.opt, preset=preset, log_every=log_every, sinks=[_NullSink()])

    def step(self, ids: torch.Tensor) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        if self.lens is not None:
            self.lens.observe_loss(loss)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=12,
                        help="timed steps per configuration (one per round)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: no spinning threads skewing the CPU time)")
    parser.add_argument("--presets", nargs="+", default=None,
                        choices=sorted({p for _, p, _ in CONFIGS if p}),
                        help="time only these presets (and the bare step), for more rounds in "
                             "the same time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_llama("small")
    vocab = model.config.vocab_size
    data = torch.randint(0, vocab, (8, args.batch, args.seq))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    configs = [c for c in CONFIGS if c[1] is None or args.presets is None or c[1] in args.presets]
    runs = {name: _Run(model, preset, every) for name, preset, every in configs}
    names = list(runs)
    for i in range(args.warmup):
        for run in runs.values():
            run.step(data[i % len(data)])  # the first step allocates the lens's state

    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = random.Random(r).sample(names, len(names))  # no fixed predecessor either
        ids = data[r % len(data)]
        for name in order:
            w, c = runs[name].step(ids)
            wall[name].append(w)
            cpu[name].append(c)
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    def paired(times: dict[str, list[float]], name: str) -> float:
        return statistics.median(t / b for t, b in zip(times[name], times["bare"], strict=True))

    print(f"\nsmall LLaMA, batch {args.batch} x {args.seq}, {args.threads} threads, "
          f"{args.rounds} rounds of one step per configuration. Ratios: median over rounds "
          "of (step / bare step of the same round); CPU time (this process only) is the "
          "robust measure on a shared machine, wall time is shown beside it.")
    print(f"{'config':26s} {'wall ms':>9s} {'ratio':>7s} {'CPU ms':>9s} {'ratio':>7s} "
          f"{'lens memory':>18s}")
    for name in names:
        lens = runs[name].lens
        mem_txt = "-"
        if lens is not None:
            mem = lens_bytes(lens)
            mem_txt = f"{mem / 1e6:.2f} MB ({100 * mem / param_bytes:.2f}%)"
        print(f"{name:26s} {1e3 * statistics.median(wall[name]):9.1f} "
              f"{paired(wall, name):7.3f} {1e3 * statistics.median(cpu[name]):9.1f} "
              f"{paired(cpu, name):7.3f} {mem_txt:>18s}")
    print(f"parameter bytes: {param_bytes / 1e6:.1f} MB")


class _NullSink:
    """Discards records: the benchmark times the collector, not disk writes."""

    def open(self, meta):
        pass

    def write_stats(self, rows):
        pass

    def write_histograms(self, hists):
        pass

    def write_events(self, events):
        pass

    def flush(self):
        pass

    def close(self):
        pass


if __name__ == "__main__":
    main()
