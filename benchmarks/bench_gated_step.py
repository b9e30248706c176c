"""Cost of the device-side step gate: gated vs ungated optimizer step time.

For each optimizer, two copies on the same model size with the same fixed gradients: one
ungated, one gated (gate = 1, so both do the same work plus the gate's snapshot and select).
They are timed in paired, interleaved rounds (ungated, gated, then gated, ungated, ...), one
thread, and the median of the per-round ratios gated / ungated is reported.

    .venv/bin/python benchmarks/bench_gated_step.py [--size small] [--rounds 30]
        [--optimizers adamw scale stable_spam swan]

``adamw`` is ``torch.optim.AdamW(foreach=True)`` wrapped in ``GatedOptimizer``; the others use
their ``step_gate`` group option.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from gradlens.data import build_llama
from gradlens.optim import GatedOptimizer, StableSPAM, make_optimizer


def _build(name: str, model: nn.Module, gate: torch.Tensor | None) -> object:
    if name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        return GatedOptimizer(opt, gate) if gate is not None else opt
    opt = (StableSPAM(model.parameters(), lr=1e-3) if name == "stable_spam"
           else make_optimizer(name, model))
    for group in opt.param_groups:
        group["step_gate"] = gate
    return opt


def paired_ratio(step_a: Callable[[], object], step_b: Callable[[], object],
                 rounds: int, warmup: int = 3) -> tuple[float, float, float]:
    """Median of per-round ``time(b) / time(a)``, and the medians of a and b (s)."""
    ta: list[float] = []
    tb: list[float] = []
    for r in range(warmup + rounds):
        order = [(step_a, ta), (step_b, tb)] if r % 2 == 0 else [(step_b, tb), (step_a, ta)]
        for fn, out in order:
            start = time.perf_counter()
            fn()
            if r >= warmup:
                out.append(time.perf_counter() - start)
    ratios = [b / a for a, b in zip(ta, tb, strict=True)]
    return statistics.median(ratios), statistics.median(ta), statistics.median(tb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "scale", "stable_spam"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    print(f"model {args.size}, {args.rounds} paired rounds, 1 thread, {device}")
    for name in args.optimizers:
        models = [build_llama(args.size, seed=0).to(device) for _ in range(2)]
        n = sum(p.numel() for p in models[0].parameters())
        gen = torch.Generator().manual_seed(0)
        for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
            g = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
            p.grad, q.grad = g, g.clone()
        gate = torch.ones((), device=device)
        plain, gated = _build(name, models[0], None), _build(name, models[1], gate)

        def step(opt: object = plain) -> None:
            opt.step()  # type: ignore[attr-defined]
            if device.type == "cuda":
                torch.cuda.synchronize()

        def step_gated(opt: object = gated) -> None:
            opt.step()  # type: ignore[attr-defined]
            if device.type == "cuda":
                torch.cuda.synchronize()

        ratio, ta, tb = paired_ratio(step, step_gated, args.rounds)
        print(f"{name:12s} params {n / 1e6:.1f}M  ungated {ta * 1e3:8.2f} ms  "
              f"gated {tb * 1e3:8.2f} ms  ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
