"""Host time of the file sinks per logged step, against the straightforward encodings.

The rows are one real ``standard`` step of the benchmark LLaMA (``build_llama("small")``, 2
micro-batches; about 830 values). Each round writes them as a new step, then flushes, with
(the sinks get the rows as the collector hands them over: columns, ``StatRows``):

- ``TensorBoardSink`` (scalars and per-group aggregates from a cached tag template,
  :mod:`gradlens.tensorboard._scalar_events`, and numpy) against one protobuf ``Summary.Value`` per
  value and Python sums per group, serialized, with the same CRC and framing;
- ``TableSink`` (CSV from cached quoted fragments) against ``csv.writer`` on every row, written
  to a file of its own.

Rounds alternate the order of the pair; the figure is the median of the per-round ratios.

    python benchmarks/bench_sinks.py [--rounds 200] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from gradlens import GradLens
from gradlens.data import build_llama
from gradlens.schema import GLOBAL, tb_group_tag, tb_tag
from gradlens.sinks import MemorySink, StatRows, TableSink, TensorBoardSink
from gradlens.sinks import _crc32c as crc


def standard_rows(quick: bool) -> tuple[list, dict]:
    """One logged step's rows of the ``standard`` preset, and the lens's metadata."""
    torch.manual_seed(0)
    model = build_llama("tiny" if quick else "small")
    vocab, seq = model.config.vocab_size, (16 if quick else 128)
    mem = MemorySink()
    lens = GradLens(model, preset="standard", sinks=[mem])
    for _ in range(2):
        for micro in torch.randint(0, vocab, (2, 8, seq)):  # 2 micro-batches of 8
            model(input_ids=micro, labels=micro).loss.backward()
        lens.step()
        model.zero_grad()
    lens.flush()
    last = mem.rows[-1][0]
    rows = [r for r in mem.rows if r[0] == last]
    meta = dict(mem.meta)
    lens.close()
    return rows, meta


def protobuf_scalars(sink: TensorBoardSink, path: Path, rows: Sequence, step: int) -> None:
    """One ``Summary.Value`` per row and per group aggregate (Python sums), serialized and
    framed as the sink frames them."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.proto.summary_pb2 import Summary

    values, groups = [], defaultdict(list)
    for _, layer, role, stat, v in rows:
        values.append(Summary.Value(tag=tb_tag(stat, layer), simple_value=float(v)))
        if layer != GLOBAL and math.isfinite(v):
            groups[(stat, sink._group(layer, role))].append(float(v))
    for (stat, group), vs in groups.items():
        for agg, v in (("mean", math.fsum(vs) / len(vs)), ("min", min(vs)), ("max", max(vs))):
            values.append(Summary.Value(tag=tb_group_tag(stat, group, agg), simple_value=v))
    ev = event_pb2.Event(wall_time=time.time(), step=step)
    ev.summary.CopyFrom(Summary(value=values))
    with open(path, "ab") as f:
        f.write(crc.record(ev.SerializeToString()))


def csv_rows(path: Path, rows: Sequence, step: int) -> None:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(
        (step, layer, role, stat, float(v)) for _, layer, role, stat, v in rows)
    with open(path, "a") as f:
        f.write(buf.getvalue())


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="tiny model, 10 rounds")
    args = p.parse_args(argv)
    rounds = 10 if args.quick else args.rounds
    torch.set_num_threads(1)
    rows, meta = standard_rows(args.quick)
    root = Path(tempfile.mkdtemp(prefix="gradlens-bench-sinks-"))
    tb = TensorBoardSink(root / "tb", per_layer=True)  # the per-layer encoding is timed
    tb.open(meta)
    table = TableSink(root / "table", "csv", fsync=False)
    table.open(meta)
    times: dict[str, list[float]] = {k: [] for k in ("tb", "tb_ref", "csv", "csv_ref")}

    def timed(key: str, fn, step: int) -> None:
        t = time.perf_counter()
        fn(step)
        times[key].append(time.perf_counter() - t)

    def at(step: int) -> list:
        return [(step, *r[1:]) for r in rows]

    cols = StatRows.of(rows)

    def columns_at(step: int) -> StatRows:  # as the collector hands them over
        return StatRows(np.full(len(cols), step), cols.labels, cols.label_ids, cols.stats,
                        cols.stat_ids, cols.values)

    pairs = {
        "tb": lambda s: (tb.write_stats(columns_at(s)), tb.flush()),
        "tb_ref": lambda s: protobuf_scalars(tb, root / "ref.tfevents", at(s), s),
        "csv": lambda s: (table.write_stats(columns_at(s)), table.flush()),
        "csv_ref": lambda s: csv_rows(root / "ref.csv", at(s), s),
    }
    for r in range(rounds + 1):
        for a, b in (("tb", "tb_ref"), ("csv", "csv_ref")):
            first, second = (a, b) if r % 2 else (b, a)
            timed(first, pairs[first], 10 + r)
            timed(second, pairs[second], 10 + r)
    tb.close()
    table.close()
    out = {}
    print(f"{len(rows)} values per step, {rounds} rounds (median per-round ratio; ms: median)")
    for new, ref, label in (("tb", "tb_ref", "TensorBoard scalars"), ("csv", "csv_ref", "CSV")):
        ratio = statistics.median(x / y for x, y in zip(times[new][1:], times[ref][1:],
                                                        strict=True))
        out[new] = ratio
        print(f"{label:20s} template/reference {ratio:6.3f}   "
              f"{1e3 * statistics.median(times[new][1:]):6.2f} ms vs "
              f"{1e3 * statistics.median(times[ref][1:]):6.2f} ms")
    return out


if __name__ == "__main__":
    main()
