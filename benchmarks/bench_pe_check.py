"""Cost of the per-example decomposition self-check: a ``full`` training step with
``per_example_check`` on vs off.

Three copies of one LLaMA model, each with its own ``full`` lens (every step logged: the
check's worst case) and AdamW: ``off``, ``on`` and ``off2`` (a second copy with the check off:
the noise floor). They are timed in paired, interleaved rounds (the order rotates each
round), one thread; each step is zero_grad, forward and backward of ``--micro`` micro-batches,
and the optimizer step (the lens's work runs in its step hook). Reported: the medians and
quartiles of the per-round ratios on/off and off2/off, and the check's own share of the
``on`` step (on the checked steps, one logged step in ``EVERY``, on the others, and the mean
over all steps), timed inside it: the thread CPU time of its calls (hooks and the step's
comparison) over the step's thread CPU time (on the CPU every operation runs synchronously in
this thread, so this is its cost, free of the waits a loaded machine adds to wall times).

    .venv/bin/python benchmarks/bench_pe_check.py [--size small] [--batch 8] [--seq 128]
        [--micro 2] [--rounds 20] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import gradlens
from gradlens.data import build_llama


def _copy(size: str, check: bool, vocab: int | None):
    overrides = {"vocab_size": vocab} if vocab else {}
    model = build_llama(size, seed=0, **overrides)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lens = gradlens.GradLens(model, opt, preset="full", per_example_check=check)
    return model, opt, lens


def _timed(check) -> list[float]:
    """Wrap the check's two entry points with a wall clock; returns the running total."""
    total = [0.0]
    for name in ("add", "on_grad", "ok"):
        fn = getattr(check, name)

        def timed(*a, fn=fn):
            start = time.thread_time()
            out = fn(*a)
            total[0] += time.thread_time() - start
            return out

        setattr(check, name, timed)
    return total


def _step(model, opt, batches) -> None:
    opt.zero_grad(set_to_none=True)
    for ids in batches:
        (model(input_ids=ids, labels=ids).loss / len(batches)).backward()
    opt.step()


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny model, 4 rounds")
    args = parser.parse_args()
    if args.quick:
        args.size, args.batch, args.seq, args.rounds, args.warmup = "tiny", 4, 16, 4, 1
    torch.set_num_threads(1)
    copies = {"off": _copy(args.size, False, None), "on": _copy(args.size, True, None),
              "off2": _copy(args.size, False, None)}
    vocab = copies["off"][0].config.vocab_size
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=g)
               for _ in range(args.micro)]
    names = list(copies)
    times: dict[str, list[float]] = {n: [] for n in names}
    check = copies["on"][2].family("per_example").check
    inside = _timed(check)
    shares: dict[bool, list[float]] = {True: [], False: []}  # checked steps, the others
    for r in range(args.warmup + args.rounds):
        order = names[r % 3:] + names[:r % 3]
        for name in order:
            model, opt, _ = copies[name]
            active = check.active
            before, cpu = inside[0], time.thread_time()
            start = time.perf_counter()
            _step(model, opt, batches)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - start)
                if name == "on":
                    shares[active].append((inside[0] - before) / (time.thread_time() - cpu))
    for _, _, lens in copies.values():
        lens.close()
    on = [a / b for a, b in zip(times["on"], times["off"], strict=True)]
    floor = [a / b for a, b in zip(times["off2"], times["off"], strict=True)]
    print(f"model {args.size}, {args.micro} micro-batches of {args.batch}x{args.seq}, "
          f"{args.rounds} rounds, full preset, every step logged")
    print(f"step off: median {statistics.median(times['off']) * 1e3:.1f} ms")
    for label, xs in (("check on / off", on), ("noise floor off2 / off", floor)):
        q1, med, q3 = _quartiles(xs)
        print(f"{label:24s} median {med:.4f}  quartiles {q1:.4f} {q3:.4f}")
    every = shares[True] + shares[False]
    print(f"check CPU share, checked steps (1 in {check.every} logged): "
          + ", ".join(f"{x:.2%}" for x in shares[True]))
    print(f"check CPU share, other steps: median {statistics.median(shares[False]):.3%}")
    print(f"check CPU share, all steps (amortized): mean {statistics.fmean(every):.3%}")


if __name__ == "__main__":
    main()
