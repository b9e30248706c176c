"""The step's gradient summaries at a real tensor count: per tensor against batched per shape.

The gradients of a narrow LLaMA (hidden 64, 32 decoder layers, vocabulary 4096: 291
tensors, as LLaMA-7B; random values), 1 thread. Each round times, in turn, the per-tensor
reference (``grad_summaries(foreach=False)``; ``summary_and_axis_sq_norms`` per matrix) and
the batched default (``grad_summaries``; ``grad_summaries_with_axes``, one-off and with a
collector's kept plans), for the unlogged step
(norms and non-finite counts) and the logged one (with the column and fan norms). Printed:
microseconds per tensor per call, median over rounds with quartiles and minimum. The
interleaving keeps the machine's drift out of the comparison.

    python benchmarks/bench_summaries.py [--rounds 15] [--rows 1]

``--rows 8`` divides every matrix's rows by 8: the launches, not the bytes, dominate there.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch

from gradlens import stats as S
from gradlens.data import build_llama


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--rows", type=int, default=1, help="divide every matrix's rows by this")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = build_llama("small", hidden_size=64, num_hidden_layers=32, intermediate_size=172,
                        vocab_size=4096, device="meta")
    shapes = [(max(1, s[0] // args.rows), *s[1:]) if len(s) == 2 else s
              for s in (tuple(p.shape) for p in model.parameters())]
    gs = [torch.randn(s) for s in shapes]
    vocab_rows = max(1, 4096 // args.rows)
    lay = [None if g.ndim == 1 else ("embedding" if g.shape[0] == vocab_rows else "linear")
           for g in gs]
    plans = S.SummaryPlans()  # a collector's, kept between calls
    fns = {
        "unlogged, per tensor": lambda: S.grad_summaries(gs, foreach=False, max_abs=False),
        "unlogged, batched": lambda: S.grad_summaries(gs, max_abs=False),
        "logged with axes, per tensor": lambda: [
            S.summary_and_axis_sq_norms(g, k) if k else S.grad_summary(g)
            for g, k in zip(gs, lay, strict=True)],
        "logged with axes, batched": lambda: S.grad_summaries_with_axes(gs, lay),
        "logged with axes, kept plan": lambda: S.grad_summaries_with_axes(gs, lay,
                                                                          plans=plans),
    }
    res: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(args.rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            res[k].append(1e6 * (time.perf_counter() - t0) / len(gs))
    print(f"{len(gs)} tensors, {sum(g.numel() for g in gs) / 1e6:.2f}M entries, "
          f"{args.rounds} rounds; microseconds per tensor per call")
    out = {}
    for k, v in res.items():
        q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
        out[k] = statistics.median(v)
        print(f"{k:30s} {out[k]:7.1f}  (quartiles {q[0]:.1f}-{q[2]:.1f}, min {min(v):.1f})")
    return out


if __name__ == "__main__":
    main()
