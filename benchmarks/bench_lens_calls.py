"""The lens's Python calls per training step: a count, not a timing (it does not move with the
machine's load). Per-tensor Python work shows as calls that grow with the tracked tensors.

The narrow LLaMA of ``bench_lens_user.py --narrow`` (hidden 64, 32 decoder layers, 291 tracked
tensors), AdamW, steps of 2 micro-batches of 4 x 32 tokens. For each preset, ``--steps`` steps
at ``log_every=10`` after 2 untimed ones; every call of a Python function of the ``gradlens``
package during a step is counted (``sys.setprofile``: hooks, the step hook, what they call;
the writer thread is not followed). Printed: the median calls per step over unlogged and over
logged steps, and per tracked tensor.

    python benchmarks/bench_lens_calls.py [--presets minimal standard full] [--steps 20] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

import gradlens
from gradlens import GradLens
from gradlens.data import build_llama

PACKAGE = str(Path(gradlens.__file__).resolve().parent)


class Counter:
    """Counts calls of functions defined in the gradlens package while installed."""

    def __init__(self) -> None:
        self.calls = 0
        self._ours: dict[object, bool] = {}

    def __call__(self, frame, event: str, arg: object) -> None:
        if event != "call":
            return
        code = frame.f_code
        ours = self._ours.get(code)
        if ours is None:
            ours = self._ours[code] = code.co_filename.startswith(PACKAGE)
        self.calls += ours


def run(preset: str, steps: int, quick: bool) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_llama("tiny") if quick else build_llama(
        "small", hidden_size=64, num_hidden_layers=32, intermediate_size=172)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lens = GradLens(model, opt, preset=preset, log_every=10)
    data = torch.randint(0, model.config.vocab_size, (steps + 2, 8, 32))
    counts: dict[bool, list[int]] = {False: [], True: []}
    counter = Counter()
    for i, ids in enumerate(data):
        logged = (i + 1) % 10 == 0
        counter.calls = 0
        sys.setprofile(counter)
        try:
            for micro in ids.chunk(2):
                (model(input_ids=micro, labels=micro).loss / 2).backward()
            opt.step()
        finally:
            sys.setprofile(None)
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            counts[logged].append(counter.calls)
    lens.close()
    n = len(lens.layers)
    unlogged = statistics.median(counts[False])
    logged = statistics.median(counts[True]) if counts[True] else float("nan")
    return {"tensors": n, "unlogged": unlogged, "logged": logged,
            "unlogged_per_tensor": unlogged / n, "logged_per_tensor": logged / n}


def main(argv: Sequence[str] | None = None) -> list[dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["minimal", "standard", "full"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="tiny model, 10 steps")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    steps = 10 if args.quick else args.steps
    print(f"{'preset':9s} {'tensors':>7s} {'calls/step unlogged':>20s} {'logged':>8s} "
          f"{'per tensor unlogged':>20s} {'logged':>8s}", flush=True)
    rows = []
    for preset in args.presets:
        r = run(preset, steps, args.quick)
        rows.append(r)
        print(f"{preset:9s} {r['tensors']:7d} {r['unlogged']:20.0f} {r['logged']:8.0f} "
              f"{r['unlogged_per_tensor']:20.2f} {r['logged_per_tensor']:8.2f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
