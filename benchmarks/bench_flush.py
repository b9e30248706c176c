"""Host time of a logged step's flush: its records and the default sinks' writing, per tensor.

The narrow LLaMA of ``bench_lens_user.py --narrow`` (hidden 64, 32 decoder layers, 291 tracked
tensors), AdamW, a step of 2 micro-batches of 4 x 32 tokens, a lens with the default sinks (the
parquet table and TensorBoard, in a temporary run directory) and ``background_io=False``. After
3 logged steps (the first writes import their modules), one logged step's pending statistics are
kept and its flush is replayed ``--rounds`` times as new steps: the one transfer, the records
(:mod:`gradlens.core.records`) and each sink's writing (``core.run.write_sink``), timed apart in
CPU time of the process (every thread: pyarrow's included) and wall time. The parquet table
merges its parts every 64 flushes (with the range's summary): the mean over the rounds carries
that cost at its rate, the median does not.

Unlike the pair ratios of ``bench_lens_user.py`` this times the flush alone, with no model
around it, so it moves less with the machine's load.

    python benchmarks/bench_flush.py [--presets minimal standard] [--rounds 128] [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from gradlens import GradLens
from gradlens.core import run as R
from gradlens.data import build_llama


def _clock() -> tuple[float, float]:
    return time.process_time(), time.perf_counter()


def run(preset: str, rounds: int, quick: bool) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_llama("tiny") if quick else build_llama(
        "small", hidden_size=64, num_hidden_layers=32, intermediate_size=172)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    root = Path(tempfile.mkdtemp(prefix="gradlens-flush-"))
    lens = GradLens(model, opt, preset=preset, log_every=1, logdir=root, background_io=False)
    kept: list = []
    original = lens.flush

    def keep(wait: bool = False) -> None:
        kept[:] = list(lens._pending)
        original(wait)

    lens.flush = keep  # type: ignore[method-assign]
    for ids in torch.randint(0, model.config.vocab_size, (3, 8, 32)):
        for micro in ids.chunk(2):
            (model(input_ids=micro, labels=micro).loss / 2).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    lens.flush = original  # type: ignore[method-assign]
    parts: dict[str, list[float]] = defaultdict(list)
    write_sink = R.write_sink
    rows_per_step = 0

    def timed_write(sink, rows, hists, events) -> None:
        nonlocal rows_per_step
        rows_per_step = len(rows)
        c, w = _clock()
        write_sink(sink, rows, hists, events)
        c2, w2 = _clock()
        parts[f"cpu {type(sink).__name__}"][-1] += c2 - c
        parts[f"wall {type(sink).__name__}"][-1] += w2 - w

    R.write_sink = timed_write
    try:
        names = [type(s).__name__ for s in lens.sinks]
        for r in range(rounds):
            step = lens.step_count + 1 + r
            lens._pending = [(step, kind, payload) for _, kind, payload in kept]
            for n in names:
                parts[f"cpu {n}"].append(0.0)
                parts[f"wall {n}"].append(0.0)
            c, w = _clock()
            lens.flush()
            c2, w2 = _clock()
            parts["cpu flush"].append(c2 - c)
            parts["wall flush"].append(w2 - w)
    finally:
        R.write_sink = write_sink
        lens.close()
        shutil.rmtree(root, ignore_errors=True)
    n = len(lens.layers)
    for clock in ("cpu", "wall"):  # the records: the flush less the sinks' writing
        parts[f"{clock} records"] = [
            t - sum(parts[f"{clock} {s}"][i] for s in names)
            for i, t in enumerate(parts[f"{clock} flush"])]
    out: dict[str, float] = {"tensors": n, "rows": rows_per_step}
    for key, ts in parts.items():
        out[f"{key} mean"] = 1e6 * statistics.fmean(ts) / n
        out[f"{key} median"] = 1e6 * statistics.median(ts) / n
    return out


def main(argv: Sequence[str] | None = None) -> list[dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["minimal", "standard"])
    p.add_argument("--rounds", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="tiny model, 8 rounds")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rounds = 8 if args.quick else args.rounds
    print(f"microseconds per tracked tensor per logged step, {rounds} rounds: mean (median)",
          flush=True)
    results = []
    for preset in args.presets:
        r = run(preset, rounds, args.quick)
        results.append(r)
        print(f"{preset}: {r['tensors']:.0f} tensors, {r['rows']:.0f} rows per step", flush=True)
        for part in ("flush", "records", "TableSink", "TensorBoardSink"):
            if f"cpu {part} mean" in r:
                print(f"  {part:16s} cpu {r[f'cpu {part} mean']:7.2f} "
                      f"({r[f'cpu {part} median']:7.2f})   wall {r[f'wall {part} mean']:7.2f} "
                      f"({r[f'wall {part} median']:7.2f})", flush=True)
    return results


if __name__ == "__main__":
    main()
