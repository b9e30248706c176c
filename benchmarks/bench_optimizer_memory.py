"""Optimizer memory: SCALE vs AdamW, measured and as in the SCALE paper's table.

(1) Exact optimizer-state element counts read from the live state of both optimizers after one
    step on ``build_llama("small")``.
(2) The paper's accounting (weights + optimizer state, both bf16, no grads or activations:
    Adam = 3P, SCALE = P + |lm_head| + 2|1-D|) for the 60M..1B configs, built on the ``meta``
    device and counted by role.

    .venv/bin/python benchmarks/bench_optimizer_memory.py
"""

from __future__ import annotations

import torch

from gradlens.data import build_llama
from gradlens.optim import (
    SCALE,
    optimizer_state_numel,
    predicted_state_bytes,
    role_numels,
    scale_param_groups,
    weights_plus_state_ratio,
)

PAPER_PERCENT = {"60m": 42.7, "130m": 39.5, "350m": 36.3, "1b": 35.0}


def live_counts(size: str = "small") -> None:
    model = build_llama(size, seed=0)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    scale = SCALE(scale_param_groups(model))
    adamw = torch.optim.AdamW(params, foreach=True)
    scale.step()
    adamw.step()
    n = sum(p.numel() for p in params)
    s, a = optimizer_state_numel(scale), optimizer_state_numel(adamw)
    numels = role_numels(model)
    print(f"(1) live optimizer state after one step, llama-{size} ({n:,} parameters)")
    print(f"    AdamW: {a:>12,} elements ({a / n:.3f} P)")
    print(f"    SCALE: {s:>12,} elements ({s / n:.3f} P) = |lm_head| {numels['output']:,} "
          f"+ 2 x |1-D| {numels['vector']:,}")
    print(f"    SCALE / AdamW state: {s / a:.3f}; "
          f"weights + state: {(n + s) / (n + a):.3f} ({100 * weights_plus_state_ratio(numels):.1f}%)")


def paper_table() -> None:
    print("\n(2) weights + optimizer state, bf16 (the paper's accounting)")
    header = (f"{'model':<6}{'P (M)':>9}{'lm_head':>9}{'1-D':>8}{'Adam GB':>9}"
              f"{'SCALE GB':>10}{'SCALE/Adam':>12}{'paper':>7}")
    print(header)
    for size, paper in PAPER_PERCENT.items():
        numels = role_numels(build_llama(size, device="meta"))
        total = sum(numels.values())
        adam = 2 * total + predicted_state_bytes(numels, "adam")
        scale = 2 * total + predicted_state_bytes(numels, "scale")
        print(f"{size:<6}{total / 1e6:>9.1f}{numels['output'] / total:>8.0%} "
              f"{numels['vector']:>8,}{adam / 1e9:>9.3f}{scale / 1e9:>10.3f}"
              f"{100 * weights_plus_state_ratio(numels):>11.1f}%{paper:>6.1f}%")


if __name__ == "__main__":
    live_counts()
    paper_table()
