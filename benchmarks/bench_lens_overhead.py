"""Step-time overhead and extra memory of the lens on a small LLaMA.

Trains ``build_llama("small")`` (hidden 256, 4 layers, vocabulary 4096) on random tokens,
batch 16 x 128, with AdamW, and times steps without the lens and with each preset, the
configurations interleaved round by round so that machine noise hits all of them alike.
Prints median step times and their ratios to the bare step, and the memory the lens keeps.

    python benchmarks/bench_lens_overhead.py [--rounds 6] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gradlens import GradLens
from gradlens.data import build_llama

CONFIGS = [
    ("bare", None, 1),
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

    for attr in ("_state", "_consts", "_temporal", "_mb_sq", "_mb_unit", "_pe_sq"):
        visit(getattr(lens, attr))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per config per round")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: no spinning threads skewing the CPU time)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_llama("small")
    vocab = model.config.vocab_size
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    data = torch.randint(0, vocab, (8, args.batch, args.seq))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def step(i: int, lens: GradLens | None) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        ids = data[i % len(data)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if lens is not None:
            lens.observe_loss(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, time.process_time() - c0

    for i in range(2):
        step(i, None)  # warm-up
    times: dict[str, list[float]] = {name: [] for name, _, _ in CONFIGS}
    cpu: dict[str, list[float]] = {name: [] for name, _, _ in CONFIGS}
    memory: dict[str, int] = {}
    for r in range(args.rounds):
        for name, preset, log_every in CONFIGS:
            lens = None
            if preset is not None:
                lens = GradLens(model, opt, preset=preset, log_every=log_every,
                                sinks=[_NullSink()])
                step(0, lens)  # first step allocates the lens's state
            for s in range(args.steps):
                wall, used = step(r * args.steps + s, lens)
                times[name].append(wall)
                cpu[name].append(used)
            if lens is not None:
                memory[name] = lens_bytes(lens)
                lens.close()
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    base = statistics.median(times["bare"])
    base_cpu = statistics.median(cpu["bare"])
    print(f"\nsmall LLaMA, batch {args.batch} x {args.seq}, {args.threads} threads, "
          f"{args.rounds} rounds x {args.steps} steps, medians. CPU time (this process only) "
          "is the robust measure on a shared machine; wall time is shown beside it.")
    print(f"{'config':26s} {'wall ms':>9s} {'ratio':>7s} {'CPU ms':>9s} {'ratio':>7s} "
          f"{'lens memory':>18s}")
    for name, _, _ in CONFIGS:
        med = statistics.median(times[name])
        med_cpu = statistics.median(cpu[name])
        mem = memory.get(name, 0)
        mem_txt = f"{mem / 1e6:.2f} MB ({100 * mem / param_bytes:.2f}%)" if name != "bare" else "-"
        print(f"{name:26s} {1e3 * med:9.1f} {med / base:7.3f} {1e3 * med_cpu:9.1f} "
              f"{med_cpu / base_cpu:7.3f} {mem_txt:>18s}")
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
