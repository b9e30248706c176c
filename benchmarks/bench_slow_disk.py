"""Step time of a training run whose disk is slow, against the same run on a fast disk.

Three copies of the benchmark LLaMA train side by side, each with its own lens writing a
table (``stats.csv``, ``spikes.jsonl``) into its own run directory, every step logged:

- ``fast``: the disk as it is;
- ``fast copy``: the same again (the noise floor of the ratios);
- ``slow``: every write of the table's files takes ``--delay`` seconds (a busy network
  filesystem), injected at the sink's file seam (``AppendFiles.write_bytes``).

Rounds run ``--steps`` steps of each copy, in an order that rotates; a step's time is
``forward + backward + optimizer.step()`` (the lens finalizes and flushes in the step's
pre-hook). The figure is the median of the per-round ratios of median step times.

``--stall S`` then measures a disk that stalls once for ``S`` seconds: the first write blocks
until the stall ends while training goes on for ``S + 2`` seconds; it prints the longest
``optimizer.step()`` during the stall against the longest of a fast run of as many steps, and
the longest hand-over of a flush to the writer thread (the only place a step could wait for
the disk).

    python benchmarks/bench_slow_disk.py [--rounds 5] [--steps 10] [--delay 1] [--stall 60]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from gradlens import GradLens
from gradlens.data import build_llama


class Copy:
    """One model copy, its optimizer and its lens; ``block`` is called before every write."""

    def __init__(self, logdir: Path, block=None, seq: int = 64) -> None:
        self.model = build_llama("tiny", seed=0)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.lens = GradLens(self.model, self.opt, logdir=logdir, preset="standard",
                             tensorboard=False)
        self.vocab, self.seq = self.model.config.vocab_size, seq
        if block is not None:
            files = self.lens.sinks[0].files
            write = files.write_bytes

            def slow_write(fh, data):
                block()
                write(fh, data)

            files.write_bytes = slow_write

    def step(self) -> tuple[float, float]:
        """(seconds of the whole step, seconds of ``optimizer.step()``)."""
        batch = torch.randint(0, self.vocab, (4, self.seq))
        t0 = time.perf_counter()
        loss = self.model(input_ids=batch, labels=batch).loss
        loss.backward()
        t1 = time.perf_counter()
        self.opt.step()
        t2 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        return t2 - t0, t2 - t1

    def close(self) -> dict:
        self.lens.close()
        return json.loads((self.lens.logdir / "run.json").read_text())


def slow_rounds(root: Path, rounds: int, steps: int, delay: float) -> None:
    copies = {"fast": Copy(root / "fast"), "fast copy": Copy(root / "fast2"),
              "slow": Copy(root / "slow", block=lambda: time.sleep(delay))}
    for c in copies.values():  # warm-up (allocator, first flush, the writer thread)
        for _ in range(2):
            c.step()
    names = list(copies)
    med: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % 3:] + names[:r % 3]
        for n in order:
            med[n].append(statistics.median(copies[n].step()[0] for _ in range(steps)))
    ratio = {n: statistics.median(a / b for a, b in zip(med[n], med["fast"], strict=True))
             for n in names}
    print(f"slow disk: every table write takes {delay:g} s; {rounds} rounds x {steps} steps")
    for n in names:
        print(f"  {n:<10} median step {1e3 * statistics.median(med[n]):8.1f} ms   "
              f"{n}/fast {ratio[n]:.3f}")
    for n, c in copies.items():
        meta = c.close()
        print(f"  {n:<10} run.json rows_written {meta.get('rows_written')} rows_dropped "
              f"{meta.get('rows_dropped')} flushes_coalesced {meta.get('flushes_coalesced')}")


def stall(root: Path, seconds: float) -> None:
    released = threading.Event()
    first = [True]

    def block() -> None:
        if first[0]:
            first[0] = False
            released.wait(seconds)

    slow = Copy(root / "stall", block=block)
    fast = Copy(root / "stall_fast")
    waits = [0.0]  # the hand-over to the writer thread: where a step could wait for the disk
    writer = slow.lens._writer
    submit = writer.submit

    def timed_submit(*args):
        t0 = time.perf_counter()
        submit(*args)
        waits[0] = max(waits[0], time.perf_counter() - t0)

    writer.submit = timed_submit
    for c in (slow, fast):
        c.step()
    opt_times, step_times = [], []
    t_end = time.perf_counter() + seconds + 2
    while time.perf_counter() < t_end:
        whole, opt = slow.step()
        step_times.append(whole)
        opt_times.append(opt)
    released.set()
    fast_opt = [fast.step()[1] for _ in range(len(opt_times))]
    print(f"stall: the first table write blocks {seconds:g} s; {len(opt_times)} steps ran in "
          f"{seconds + 2:g} s")
    print(f"  longest optimizer.step(): stalled {1e3 * max(opt_times):.1f} ms, fast disk "
          f"{1e3 * max(fast_opt):.1f} ms; longest whole step {1e3 * max(step_times):.1f} ms; "
          f"median whole step {1e3 * statistics.median(step_times):.1f} ms")
    print(f"  longest hand-over to the writer (the step's wait for the disk): "
          f"{1e3 * waits[0]:.2f} ms")
    meta = slow.close()
    fast.close()
    print(f"  run.json rows_written {meta.get('rows_written')} rows_dropped "
          f"{meta.get('rows_dropped')} flushes_coalesced {meta.get('flushes_coalesced')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--delay", type=float, default=1.0)
    ap.add_argument("--stall", type=float, default=0.0, help="seconds (0: skip)")
    ap.add_argument("--quick", action="store_true", help="2 rounds x 3 steps, 0.2 s writes")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.steps, args.delay = 2, 3, 0.2
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        slow_rounds(Path(tmp), args.rounds, args.steps, args.delay)
        if args.stall > 0:
            stall(Path(tmp), args.stall)


if __name__ == "__main__":
    main()
