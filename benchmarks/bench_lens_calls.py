"""The lens's Python calls per training step: a count, not a timing (it does not move with the
machine's load). Per-tensor Python work shows as calls that grow with the tracked tensors.

The narrow LLaMA of ``bench_lens_user.py --narrow`` (hidden 64, 32 decoder layers, 291 tracked
tensors), AdamW, steps of 2 micro-batches of 4 x 32 tokens. For each preset, ``--steps`` steps
at ``log_every=10`` after 10 untimed ones (the first logged step among them); every call of a Python function of the ``gradlens``
package during a step is counted (``sys.setprofile``: hooks, the step hook, what they call).
Printed: the median calls per step over unlogged and over logged steps, and per tracked
tensor.

``--sinks memory`` (default) writes to the in-memory sink, on the training thread.
``--sinks files`` writes the default sinks (the parquet table and TensorBoard, in a temporary
run directory) with ``background_io=False``, so that the writer's work runs on the training
thread and is followed; its calls (inside ``write_sink``) are counted apart, every Python
function's (pyarrow's, numpy's, protobuf's included), and the lens's column excludes them.

    python benchmarks/bench_lens_calls.py [--presets minimal standard full] [--steps 20]
        [--sinks memory|files] [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

import gradlens
from gradlens import GradLens
from gradlens.core.run import write_sink
from gradlens.data import build_llama

PACKAGE = str(Path(gradlens.__file__).resolve().parent)
WRITE_SINK = write_sink.__code__
WARMUP = 10  # untimed steps, the first logged one included (its first writes import modules)


class Counter:
    """Counts calls of functions defined in the gradlens package while installed; inside
    ``core.run.write_sink`` (the sinks' writing) every Python function's call, apart."""

    def __init__(self) -> None:
        self.calls = 0
        self.writer = 0
        self._ours: dict[object, bool] = {}
        self._inside: object = None

    def __call__(self, frame, event: str, arg: object) -> None:
        if self._inside is not None:
            if event == "call":
                self.writer += 1
            elif event == "return" and frame is self._inside:
                self._inside = None
            return
        if event != "call":
            return
        code = frame.f_code
        if code is WRITE_SINK:
            self._inside = frame
            self.writer += 1
            return
        ours = self._ours.get(code)
        if ours is None:
            ours = self._ours[code] = code.co_filename.startswith(PACKAGE)
        self.calls += ours


def run(preset: str, steps: int, quick: bool, sinks: str = "memory") -> dict[str, float]:
    torch.manual_seed(0)
    model = build_llama("tiny") if quick else build_llama(
        "small", hidden_size=64, num_hidden_layers=32, intermediate_size=172)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    root = Path(tempfile.mkdtemp(prefix="gradlens-calls-")) if sinks == "files" else None
    lens = GradLens(model, opt, preset=preset, log_every=10, logdir=root,
                    background_io=False)
    data = torch.randint(0, model.config.vocab_size, (steps + WARMUP, 8, 32))
    counts: dict[bool, list[int]] = {False: [], True: []}
    writer: list[int] = []
    counter = Counter()
    for i, ids in enumerate(data):
        logged = (i + 1) % 10 == 0
        counter.calls = counter.writer = 0
        sys.setprofile(counter)
        try:
            for micro in ids.chunk(2):
                (model(input_ids=micro, labels=micro).loss / 2).backward()
            opt.step()
        finally:
            sys.setprofile(None)
        opt.zero_grad(set_to_none=True)
        if i >= WARMUP:
            counts[logged].append(counter.calls)
            if logged:
                writer.append(counter.writer)
    lens.close()
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)
    n = len(lens.layers)
    unlogged = statistics.median(counts[False])
    logged = statistics.median(counts[True]) if counts[True] else float("nan")
    written = statistics.median(writer) if writer else float("nan")
    return {"tensors": n, "unlogged": unlogged, "logged": logged, "writer": written,
            "unlogged_per_tensor": unlogged / n, "logged_per_tensor": logged / n,
            "writer_per_tensor": written / n}


def main(argv: Sequence[str] | None = None) -> list[dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["minimal", "standard", "full"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sinks", choices=("memory", "files"), default="memory",
                   help="files: the default sinks in a temporary directory")
    p.add_argument("--quick", action="store_true", help="tiny model, 10 steps")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    steps = 10 if args.quick else args.steps
    print(f"sinks: {args.sinks}; calls per step (per tracked tensor), the sinks' writing "
          "apart", flush=True)
    print(f"{'preset':9s} {'tensors':>7s} {'unlogged':>9s} {'logged':>8s} {'writing':>8s}"
          f" {'per tensor: unlogged':>21s} {'logged':>7s} {'writing':>8s}", flush=True)
    rows = []
    for preset in args.presets:
        r = run(preset, steps, args.quick, args.sinks)
        rows.append(r)
        print(f"{preset:9s} {r['tensors']:7d} {r['unlogged']:9.0f} {r['logged']:8.0f} "
              f"{r['writer']:8.0f} {r['unlogged_per_tensor']:21.2f} "
              f"{r['logged_per_tensor']:7.2f} {r['writer_per_tensor']:8.2f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
