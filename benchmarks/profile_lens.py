"""Where the lens's time goes: its share of the training step, by function (cProfile).

The benchmark LLaMA (``build_llama("small")``, 2 micro-batches of 8 x 128 tokens per step,
AdamW, 1 thread) with a lens and the default sinks in a temporary run directory. After 3
untimed steps, ``--steps`` steps run under cProfile. The lens's share is the cumulative time
of its entry points (functions of ``gradlens`` called from outside it: the backward and
forward hooks, the optimizer-step hook, ``observe_loss``) over the total; the writer
thread is not profiled (cProfile follows one thread) unless ``--io inline``
(``background_io=False``: the sinks write on the training thread, inside the step hook, and
their share is printed apart). The profiler's per-call cost weighs on
Python-heavy code, the lens's more than the model's (its time is in a few large kernels), so
the share is an upper bound. Unlike a wall-clock ratio it does not move with the machine's
speed, which on a shared machine drifts by more than the overheads measured.

    python benchmarks/profile_lens.py [--preset standard] [--log-every 1] [--steps 20]
        [--vocab 4096] [--top 12] [--narrow] [--io thread|inline]

``--narrow``: hidden 64, 32 decoder layers (291 tensors), where per-tensor host work shows.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import gradlens
from gradlens import GradLens
from gradlens.data import build_llama

PACKAGE = str(Path(gradlens.__file__).resolve().parent)


def _ours(key: tuple) -> bool:
    return str(key[0]).startswith(PACKAGE)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="standard")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--top", type=int, default=12, help="functions listed")
    p.add_argument("--narrow", action="store_true", help="hidden 64, 32 layers (291 tensors)")
    p.add_argument("--quick", action="store_true", help="tiny model, 3 steps")
    p.add_argument("--io", choices=("thread", "inline"), default="thread",
                   help="inline: the sinks write on the training thread (profiled)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.quick:
        model = build_llama("tiny")
    elif args.narrow:
        model = build_llama("small", vocab_size=args.vocab, hidden_size=64,
                            num_hidden_layers=32, intermediate_size=172)
    else:
        model = build_llama("small", vocab_size=args.vocab)
    steps, seq = (3, 16) if args.quick else (args.steps, 128)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    root = Path(tempfile.mkdtemp(prefix="gradlens-profile-"))
    lens = GradLens(model, opt, logdir=root, preset=args.preset, log_every=args.log_every,
                    background_io=args.io == "thread")
    data = torch.randint(0, model.config.vocab_size, (3 + steps, 16, seq))

    def run(batches: torch.Tensor) -> None:
        for ids in batches:
            for micro in ids.chunk(2):
                loss = model(input_ids=micro, labels=micro).loss / 2
                loss.backward()
                lens.observe_loss(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)

    try:
        run(data[:3])
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        run(data[3:])
        prof.disable()
        total = time.perf_counter() - t0
        lens.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    ours = {k: v for k, v in stats.items() if _ours(k)}
    entry = {k: v for k, v in ours.items() if not any(_ours(c) for c in v[4])}
    share = sum(v[3] for v in entry.values()) / total
    writes = sum(v[3] for k, v in ours.items() if k[2] == "write_sink") / total
    print(f"{args.preset}, log_every={args.log_every}, io={args.io}: {steps} steps, "
          f"{1e3 * total / steps:.0f} ms per step under the profiler; the lens "
          f"{100 * share:.1f}% of it" + (f", the sinks' writes {100 * writes:.1f}%"
                                         if args.io == "inline" else ""))
    print(f"{'share':>7s} {'calls':>7s}  function (cumulative time)")
    for key, v in sorted(ours.items(), key=lambda kv: -kv[1][3])[:args.top]:
        name = f"{Path(key[0]).relative_to(PACKAGE).as_posix()}:{key[1]}({key[2]})"
        print(f"{100 * v[3] / total:6.2f}% {v[1]:7d}  {name}")
    return {"share": share, "writes": writes}


if __name__ == "__main__":
    main()
