"""Optimizer step time: SCALE (both kernel paths) vs torch.optim.AdamW(foreach=True).

Fixed random gradients on ``build_llama("small")`` (hidden 256, 4 layers, vocabulary 4096);
the optimizers are timed interleaved (A, B, C, A, B, C, ... with the order rotated each
round) so that machine noise hits all of them alike. Reports medians and ratios to AdamW,
then the per-unit RMS formulations that were considered for the kernel.

    .venv/bin/python benchmarks/bench_scale_step.py [--reps 60] [--size small]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

from gradlens.data import build_llama
from gradlens.optim import SCALE, scale_param_groups


def interleaved_medians(fns: dict[str, Callable[[], object]], reps: int,
                        warmup: int = 5) -> dict[str, float]:
    """Median wall time (s) of each callable, timed round-robin with a rotating order."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(warmup + reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fns[name]()
            elapsed = time.perf_counter() - start
            if rep >= warmup:
                times[name].append(elapsed)
    return {n: statistics.median(t) for n, t in times.items()}


def rms_alternatives(grads: list[torch.Tensor], params: list[torch.Tensor],
                     reps: int) -> dict[str, float]:
    """Time the normalized update of the hidden matrices written three ways."""

    @torch.no_grad()
    def norm_addcdiv() -> None:  # the kernel's choice: no temporary the size of G
        for p, g in zip(params, grads, strict=True):
            r = torch.linalg.vector_norm(g, dim=1, keepdim=True)
            p.addcdiv_(g, r.div_(math.sqrt(g.shape[1])).clamp_min_(1e-8), value=-1e-6)

    @torch.no_grad()
    def mean_square() -> None:  # the formula as written: G**2 is a full-size temporary
        for p, g in zip(params, grads, strict=True):
            r = g.square().mean(dim=1, keepdim=True).sqrt_().clamp_min_(1e-8)
            p.addcdiv_(g, r, value=-1e-6)

    @torch.no_grad()
    def reciprocal_addcmul() -> None:  # multiply by a precomputed -lr / r
        for p, g in zip(params, grads, strict=True):
            n = math.sqrt(g.shape[1])
            r = torch.linalg.vector_norm(g, dim=1, keepdim=True).clamp_min_(1e-8 * n)
            p.addcmul_(g, r.reciprocal_().mul_(-1e-6 * n))

    return interleaved_medians(
        {"vector_norm + addcdiv_": norm_addcdiv, "mean(G**2) + addcdiv_": mean_square,
         "vector_norm + reciprocal + addcmul_": reciprocal_addcmul},
        reps,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--reps", type=int, default=60)
    args = parser.parse_args()

    model = build_llama(args.size, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    optimizers = {
        "AdamW(foreach=True)": torch.optim.AdamW(params, lr=1e-3, foreach=True),
        "SCALE(foreach=False)": SCALE(scale_param_groups(model, lr=1e-3, lr_1d=2e-2),
                                      foreach=False),
        "SCALE(foreach=True)": SCALE(scale_param_groups(model, lr=1e-3, lr_1d=2e-2),
                                     foreach=True),
    }
    n = sum(p.numel() for p in params)
    print(f"model: llama-{args.size}, {n / 1e6:.2f}M parameters in {len(params)} tensors; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.reps} reps")
    med = interleaved_medians({k: o.step for k, o in optimizers.items()}, args.reps)
    base = med["AdamW(foreach=True)"]
    print(f"{'optimizer':<24}{'median ms':>10}{'vs AdamW':>10}")
    for name, t in med.items():
        print(f"{name:<24}{t * 1e3:>10.2f}{t / base:>9.2f}x")

    hidden = [p for p in params if p.ndim == 2 and p.shape[0] != model.config.vocab_size]
    print("\nnormalized update of the hidden matrices (one scale per row), alternatives:")
    alt = rms_alternatives([p.grad for p in hidden], hidden, args.reps)
    first = next(iter(alt.values()))
    for name, t in alt.items():
        print(f"  {name:<38}{t * 1e3:>8.2f} ms{t / first:>7.2f}x")


if __name__ == "__main__":
    main()
