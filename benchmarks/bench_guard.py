"""Cost of the spike guard when nothing fires: training steps with and without it.

One model (SCALE, a ``minimal`` lens, a fixed batch) per guard mode; within a mode the guard
is switched on and off between consecutive training steps (it is taken out of and put back
into the lens's families), so both sides of a pair run the same model, optimizer, lens and
memory. Pairs alternate their order (on/off, off/on), one thread; the median of the
per-pair time ratios is reported, after ``--warmup`` steps (past the detectors' warm-up).

- ``skip``: ``SpikeGuard("skip")``; the optimizer keeps the guard's gate in both halves, so
  the ratio is the guard's own work (flags, forecast, the gate's fill; the gate's snapshot and
  select belong to the optimizer: ``bench_gated_step.py``);
- ``damp``: ``SpikeGuard("damp", nonfinite="none")`` on an ungated optimizer: the per-layer
  factors and one in-place multiply of every tracked gradient.

    .venv/bin/python benchmarks/bench_guard.py [--size small] [--rounds 40] [--batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gradlens import GradLens, SpikeGuard
from gradlens.data import build_llama
from gradlens.optim import SCALE, scale_param_groups


def measure(size: str, mode: str, batch: torch.Tensor, rounds: int, warmup: int
            ) -> tuple[float, float, float, int]:
    """(median ratio on/off, median ms off, median ms on, guarded steps)."""
    model = build_llama(size, seed=0)
    opt = SCALE(scale_param_groups(model, lr=1e-4, lr_1d=1e-4))
    guard = SpikeGuard("skip") if mode == "skip" else SpikeGuard("damp", nonfinite="none")
    lens = GradLens(model, opt, preset="minimal", log_every=1000, tensorboard=False,
                    guard=guard)
    with_guard = list(lens.families)
    without = [f for f in with_guard if f is not guard]

    def step(on: bool) -> float:
        lens.families = with_guard if on else without
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    for _ in range(warmup):
        step(True)
    on_t, off_t = [], []
    for r in range(rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        times = {o: step(o) for o in order}
        on_t.append(times[True])
        off_t.append(times[False])
    lens.families = with_guard
    lens.close()
    fired = sum(e.kind == "guarded_step" for e in lens.memory.events)
    ratio = statistics.median(a / b for a, b in zip(on_t, off_t, strict=True))
    return ratio, statistics.median(off_t) * 1e3, statistics.median(on_t) * 1e3, fired


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    vocab = build_llama(args.size, device="meta").config.vocab_size
    batch = torch.randint(0, vocab, (args.batch, args.seq),
                          generator=torch.Generator().manual_seed(0))
    print(f"model {args.size}, batch {args.batch}x{args.seq}, {args.rounds} pairs after "
          f"{args.warmup} steps, 1 thread")
    for mode in ("skip", "damp"):
        ratio, off, on, fired = measure(args.size, mode, batch, args.rounds, args.warmup)
        print(f"  {mode}: off {off:8.2f} ms  on {on:8.2f} ms  ratio {ratio:.4f}  "
              f"(guarded steps: {fired})")


if __name__ == "__main__":
    main()
