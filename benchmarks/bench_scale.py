"""Runs at pretraining scale: bytes per logged step, and what reading a large run costs.

1. **Bytes per logged step.** A model with LLaMA-7B's layer list (32 decoder layers, 291
   tracked tensors; width 64 so that it runs on a CPU; ``--layers 80``: LLaMA-70B's, 723
   tensors), preset ``standard``, 2 micro-batches per step, trained under a
   :class:`~gradlens.GradLens` with its default sinks (table and TensorBoard) for ``--steps``
   logged steps (126 after 2 warm-up steps: the table's first 128 flushes merged into two range
   files with their summaries): the growth of the run directory per step, per file kind, and
   the rows per step.
2. **Large runs.** For each ``--rows`` size, a run of ``rows / rows-per-step`` logged steps is
   written through the real :class:`~gradlens.sinks.TableSink` (default format, one flush per
   step) with the rows of one real step of part 1 and synthetic log-normal values (sizes above
   ``--direct-above``: generated with the sink's own writer functions, range files and their
   summaries, then parts), then each reader runs in a fresh process: ``load_run`` (the whole
   table), ``load_run`` of one statistic, ``gradlens report``, and the plugin's routes on a
   fresh :class:`~gradlens.tensorboard.plugin.data.RunStore` (first request ``/runs``, then the heatmap
   and role summary of a statistic, then the same heatmap again and another statistic's
   heatmap: the "later" requests).

Prints one table. Times exclude importing what the reader needs (the plugin: gradlens's tab
with TensorBoard's plugin base; the report: matplotlib and the rest). Peak RSS is the reader
process's own high-water mark (``VmHWM``; ``ru_maxrss`` would include the benchmark process
it was forked from), shown with its value after the imports. A reader that runs past
``--timeout`` seconds is reported as ``>T``.

    python benchmarks/bench_scale.py [--steps 126] [--layers 32] [--rows 1e6,1e7,1e8]
        [--timeout 900]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gradlens.table_summary import SUMMARY_SUFFIX

ROOT = Path(__file__).resolve().parents[1]


def narrow_llama(layers: int = 32):  # type: ignore[no-untyped-def]
    """LLaMA-7B's layer list (32 layers, untied head: 291 tensors; 80 layers: 723 tensors,
    LLaMA-70B's), 64 wide."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=512,
                      max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def dir_bytes(d: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in d.rglob("*"):
        if f.is_file():
            kind = ("tensorboard" if f.name.startswith("events.out") else
                    "summaries" if f.name.endswith(SUMMARY_SUFFIX) else
                    "table" if f.name.startswith("stats") else "other")
            out[kind] = out.get(kind, 0) + f.stat().st_size
    return out


def bytes_per_step(steps: int, work: Path, layers: int = 32
                   ) -> tuple[dict[str, float], list, dict]:
    """Per-step bytes of each file kind, one step's rows, and the run metadata. TensorBoard's
    events (and other files): their growth over ``steps`` steps after two warm-up steps. The
    table and its summaries: those of the merged range files per step they hold (a long run's
    rate: the last < 64 flushes stay as parts until merged); ``steps >= 126`` gives two (one
    flush per step, written before ``step`` returns)."""
    import torch

    from gradlens import GradLens
    from gradlens.sinks import MemorySink

    torch.manual_seed(0)
    model = narrow_llama(layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    logdir = work / "bytes"
    mem = MemorySink()
    lens = GradLens(model, opt, logdir=logdir, preset="standard", sinks=[mem],
                    background_io=False)

    def step() -> None:
        for micro in torch.randint(0, 512, (2, 2, 32)):  # 2 micro-batches
            model(input_ids=micro, labels=micro).loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(2):  # warm-up: the metadata, the dashboard layout, the first flushes
        step()
    lens.flush()
    before = dir_bytes(logdir)
    for _ in range(steps):
        step()
    lens.close()
    after = dir_bytes(logdir)
    per = {k: (after.get(k, 0) - before.get(k, 0)) / steps for k in after
           if k not in ("table", "summaries")}
    per.update(_merged_per_step(logdir))
    last = mem.rows[-1][0]
    rows = [tuple(r) for r in mem.rows if r[0] == last]
    meta = json.loads((logdir / "run.json").read_text())
    return per, rows, meta


def _merged_per_step(logdir: Path) -> dict[str, float]:
    """Bytes of the range files and of their summaries per logged step they hold."""
    import pyarrow.parquet as pq

    from gradlens.table_parts import list_parts

    ranges = [f for first, last, f in list_parts(logdir) if first < last]
    if not ranges:
        raise SystemExit("no merged range file: run more --steps (>= 126)")
    steps = sum(len(json.loads(pq.ParquetFile(f).schema_arrow.metadata[b"gradlens"])["steps"])
                for f in ranges)
    summaries = [f.with_name(f.name.removesuffix(".parquet") + SUMMARY_SUFFIX) for f in ranges]
    return {"table": sum(f.stat().st_size for f in ranges) / steps,
            "summaries": sum(f.stat().st_size for f in summaries if f.exists()) / steps}


def write_direct(run: Path, rows: list, meta: dict, n_rows: int) -> tuple[int, float]:
    """The store the sink would write (range files of 64 flushes, then parts), generated with
    pyarrow from numpy (the sink's writer functions, not its per-row Python): for sizes where
    writing through the sink takes too long here."""
    import pyarrow as pa

    from gradlens.sinks._parquet import MERGE_EVERY, write_part, write_range
    from gradlens.sinks.table import TableSink

    rng = np.random.default_rng(0)
    n_steps = -(-n_rows // len(rows))
    t0 = time.perf_counter()
    sink = TableSink(run)
    sink.open(_meta(meta))
    sink.close("finished")
    keys = [r[1:4] for r in rows]
    cols = [pa.array([k[i] for k in keys]).dictionary_encode() for i in range(3)]
    k = len(keys)
    for first in range(1, n_steps + 1, MERGE_EVERY):
        last = min(first + MERGE_EVERY - 1, n_steps)
        n = last - first + 1
        table = pa.table({
            "step": pa.array(np.repeat(np.arange(first - 1, last), k), pa.int64()),
            **{c: pa.DictionaryArray.from_arrays(
                pa.array(np.tile(cols[i].indices.to_numpy(), n)), cols[i].dictionary
            ).cast(pa.string()) for i, c in enumerate(("layer", "role", "stat"))},
            "value": pa.array(rng.lognormal(0.0, 1.0, n * k)),
        })
        if n == MERGE_EVERY:
            write_range(run, first, last, table, fsync=False)
        else:
            for j in range(n):
                write_part(run, first + j, table.slice(j * k, k), fsync=False,
                           opener=lambda p: open(p, "wb"))  # noqa: SIM115
    return n_steps, time.perf_counter() - t0


def _meta(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k not in (
        "schema_version", "table_format", "started", "finished", "ended", "last_step")}


def write_large(run: Path, rows: list, meta: dict, n_rows: int) -> tuple[int, float]:
    """``n_rows`` (rounded up to whole steps) through the default TableSink; (steps, s)."""
    from gradlens.sinks import TableSink

    rng = np.random.default_rng(0)
    n_steps = -(-n_rows // len(rows))
    t0 = time.perf_counter()
    sink = TableSink(run)
    sink.open(_meta(meta))
    keys = [r[1:4] for r in rows]
    for s in range(n_steps):
        vals = rng.lognormal(0.0, 1.0, len(keys)).tolist()
        sink.write_stats([(s, la, ro, st, v) for (la, ro, st), v in zip(keys, vals, strict=True)])
        sink.flush()
    sink.close("finished")
    return n_steps, time.perf_counter() - t0


_PROBE = r"""
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")


def peak_mb():  # VmHWM: this process's own peak (ru_maxrss keeps the forking parent's)
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024



what, run, arg = sys.argv[1], sys.argv[2], sys.argv[3]
out = {}
if what == "plugin":  # what TensorBoard loads with the plugin
    import gradlens.tensorboard.plugin.plugin  # noqa
elif what == "report":
    import gradlens.cli, gradlens.report.build  # noqa
else:
    import gradlens.report  # noqa
out["import_mb"] = peak_mb()
t0 = time.perf_counter()
if what == "load_run":
    from gradlens.report import load_run
    df = load_run(run)
    out["rows"] = len(df)
elif what == "load_cat":
    from gradlens.report import load_run
    df = load_run(run, categorical=True)
    out["rows"] = len(df)
elif what == "load_stat":
    from gradlens.report import load_run
    try:
        df = load_run(run, stats=[arg])
    except TypeError:  # a version without filters: the whole table, then the filter
        df = load_run(run)
        df = df[df["stat"] == arg]
    out["rows"] = len(df)
elif what == "report":
    from gradlens.cli import main
    main(["report", run, "-o", arg])
elif what == "plugin":
    from gradlens.tensorboard.plugin.data import RunStore
    store = RunStore(run)
    stat, other = arg.split(",")
    t = time.perf_counter(); store.list_runs(); out["runs"] = time.perf_counter() - t
    t = time.perf_counter(); store.heatmap(".", stat); out["heatmap"] = time.perf_counter() - t
    t = time.perf_counter(); store.role_summary(".", stat); out["roles"] = time.perf_counter() - t
    t = time.perf_counter(); store.events("."); out["events"] = time.perf_counter() - t
    t = time.perf_counter(); store.verdicts("."); out["verdicts"] = time.perf_counter() - t
    t = time.perf_counter(); store.list_runs(); store.heatmap(".", stat)
    out["again"] = time.perf_counter() - t
    t = time.perf_counter(); store.heatmap(".", other); out["other"] = time.perf_counter() - t
out["s"] = time.perf_counter() - t0
out["rss_mb"] = peak_mb()
print("RESULT", json.dumps(out))
"""


def probe(what: str, run: Path, arg: str, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    try:
        p = subprocess.run([sys.executable, "-c", _PROBE, what, str(run), arg], env=env,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"timeout": timeout}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:]}


def _rss(r: dict) -> str:
    if "rss_mb" not in r:
        return "-"
    return f"peak RSS {r['rss_mb']:,.0f} MB (after imports {r['import_mb']:,.0f} MB)"


def fmt(r: dict, key: str = "s") -> str:
    if "timeout" in r:
        return f">{r['timeout']:.0f} s"
    if "error" in r:
        return f"error {r['error']}"
    v = r[key]
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.1f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=126, help="logged steps of the bytes run")
    ap.add_argument("--layers", type=int, default=32,
                    help="decoder layers of the bytes run (80: LLaMA-70B's 723 tensors)")
    ap.add_argument("--rows", default="1e6,1e7,1e8", help="comma-separated run sizes, in rows")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per reader")
    ap.add_argument("--skip-report", action="store_true")
    ap.add_argument("--direct-above", type=float, default=2e6,
                    help="sizes above this many rows are generated directly (write_direct)")
    ap.add_argument("--keep", type=Path, default=None, help="write the runs here and keep them")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    work = args.keep or Path(tempfile.mkdtemp(prefix="gradlens-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    per, rows, meta = bytes_per_step(args.steps, work, args.layers)
    total = sum(per.values())
    lines = ["| measure | value |", "|---|---|",
             f"| tracked tensors ({args.layers} decoder layers) | {len(meta['layers']):,} |",
             f"| rows per logged step | {len(rows):,} |",
             f"| bytes per logged step (all sinks; the table merged) | {total / 1e3:,.1f} KB ("
             + ", ".join(f"{k} {v / 1e3:,.1f} KB" for k, v in sorted(per.items())) + ") |",
             f"| a 100k-step run, log_every=1 / 10 | {total * 1e5 / 1e9:,.2f} GB / "
             f"{total * 1e4 / 1e9:,.2f} GB |"]
    stats = sorted({r[3] for r in rows if r[1] != "global"})
    stat = "grad_norm" if "grad_norm" in stats else stats[0]
    other = next(s for s in stats if s != stat)
    for n in [int(float(x)) for x in args.rows.split(",") if x]:
        run = work / f"run-{n}"
        shutil.rmtree(run, ignore_errors=True)
        direct = n > args.direct_above
        steps, secs = (write_direct if direct else write_large)(run, rows, meta, n)
        size = sum(f.stat().st_size for f in run.rglob("*") if f.is_file())
        label = f"{n / 1e6:g}M rows"
        how = "generated directly" if direct else "written through TableSink"
        lines.append(f"| {label}: {how} ({steps:,} steps) | {secs:.0f} s, "
                     f"{size / 1e9:.2f} GB on disk |")
        probes = [("load_cat", "", "load_run, whole table, categorical=True"),
                  ("load_stat", stat, f"load_run, one statistic ({stat})")]
        if not direct:
            probes.insert(0, ("load_run", "", "load_run, whole table"))
        for what, arg, name in probes:
            r = probe(what, run, arg, args.timeout)
            lines.append(f"| {label}: {name} | {fmt(r)}, {_rss(r)} |")
        r = probe("plugin", run, f"{stat},{other}", args.timeout)
        if "s" in r:
            lines.append(
                f"| {label}: plugin first request (/runs) | {fmt(r, 'runs')} |")
            lines.append(
                f"| {label}: plugin heatmap / roles / events / verdicts | {fmt(r, 'heatmap')} / "
                f"{fmt(r, 'roles')} / {fmt(r, 'events')} / {fmt(r, 'verdicts')} |")
            lines.append(
                f"| {label}: plugin later: same heatmap / another statistic | "
                f"{fmt(r, 'again')} / {fmt(r, 'other')}; {_rss(r)} |")
        else:
            lines.append(f"| {label}: plugin | {fmt(r)} |")
        if not args.skip_report:
            r = probe("report", run, str(work / f"report-{n}"), args.timeout)
            lines.append(f"| {label}: gradlens report | {fmt(r)}, {_rss(r)} |")
        print(lines[-1], file=sys.stderr, flush=True)
        print(f"[{label} done]", file=sys.stderr, flush=True)
        if args.keep is None:
            shutil.rmtree(run, ignore_errors=True)
    print("\n".join(lines))
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
