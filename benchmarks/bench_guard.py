"""Cost of the spike guard when nothing fires: training steps with and without it.

Each configuration is its own copy of the model (same initialization), its optimizer (SCALE)
and a ``minimal`` lens, trained on the same fixed batch. The configurations are stepped in
paired, interleaved rounds (the order alternates), one thread, and the median of the
per-round time ratios is reported:

- ``skip / gate``: ``SpikeGuard("skip")`` against the same lens with a constant ``step_gate``
  of 1 (the guard's own decision: flags, forecast, the gate's fill; the gate's snapshot and
  select are the optimizer's and are measured by ``bench_gated_step.py``);
- ``damp / plain``: ``SpikeGuard("damp")`` (the per-layer factor and one in-place multiply
  of every tracked gradient) against the lens alone, ungated;
- ``skip / plain``: everything a skip guard costs, the gate included.

    .venv/bin/python benchmarks/bench_guard.py [--size small] [--rounds 20] [--batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from gradlens import GradLens, SpikeGuard
from gradlens.data import build_llama
from gradlens.optim import SCALE, scale_param_groups


def make(size: str, mode: str, batch: torch.Tensor) -> tuple[Callable[[], None], GradLens]:
    model = build_llama(size, seed=0)
    opt = SCALE(scale_param_groups(model, lr=1e-4, lr_1d=1e-4))
    if mode == "gate":
        gate = torch.ones(())
        for g in opt.param_groups:
            g["step_gate"] = gate
    guard = {"skip": SpikeGuard("skip"), "damp": SpikeGuard("damp", nonfinite="none")}.get(mode)
    lens = GradLens(model, opt, preset="minimal", log_every=1000, tensorboard=False,
                    guard=guard)

    def step() -> None:
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, lens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=30)  # past the detectors' warm-up
    args = parser.parse_args()
    torch.set_num_threads(1)
    vocab = build_llama(args.size, device="meta").config.vocab_size
    batch = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator()
                          .manual_seed(0))
    modes = ("plain", "gate", "skip", "damp")
    steps, lenses = zip(*(make(args.size, m, batch) for m in modes), strict=True)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.warmup + args.rounds):
        order = list(range(len(modes))) if r % 2 == 0 else list(reversed(range(len(modes))))
        for i in order:
            start = time.perf_counter()
            steps[i]()
            if r >= args.warmup:
                times[modes[i]].append(time.perf_counter() - start)
    fired = 0
    for lens in lenses:
        lens.close()
        fired += sum(e.kind == "guarded_step" for e in lens.memory.events)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    print(f"model {args.size}, batch {args.batch}x{args.seq}, {args.rounds} paired rounds "
          f"after {args.warmup}, 1 thread; guarded steps: {fired}")
    for m in modes:
        print(f"  {m:6s} median step {statistics.median(times[m]) * 1e3:8.2f} ms")
    print(f"  skip / gate  {ratio('skip', 'gate'):.4f}")
    print(f"  damp / plain {ratio('damp', 'plain'):.4f}")
    print(f"  skip / plain {ratio('skip', 'plain'):.4f}")


if __name__ == "__main__":
    main()
