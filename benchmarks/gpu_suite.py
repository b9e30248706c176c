"""The checks that need a GPU, in one command (under 8 minutes on one GPU), one table out.

1. the ``gpu``-marked tests (``pytest -m gpu``);
2. no host sync: whole training steps (forward, backward, lens hooks, optimizer step with
   the lens's pre-hook) under ``torch.cuda.set_sync_debug_mode("error")``, flush steps
   excepted, for every preset;
3. lens overhead on LLaMA-130M in bf16, per preset, with AdamW and with SCALE: paired
   rounds in a random order, a second bare model as the noise floor, median of per-round
   ratios to the bare step;
4. SCALE against AdamW at 130M and 350M: step time and peak memory;
5. the lens's host cost per tracked tensor at a real tensor count: a narrow LLaMA (hidden 64,
   32 layers, 291 tensors, as LLaMA-7B) per preset at ``log_every`` 1, 10 and never, paired
   adjacent blocks (bare, lens attached for the block) on one model copy in a random order,
   ``bare (again)`` the noise floor; every step that does not flush runs under
   ``set_sync_debug_mode("error")`` (in both blocks of a pair);

    python benchmarks/gpu_suite.py                   # on a CUDA device
    python benchmarks/gpu_suite.py --device cpu --tiny   # the same code paths, in seconds

On the CPU the sync check runs the steps without the debug mode (there is nothing to sync
with) and the memory column is the optimizer state's bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from gradlens import GradLens
from gradlens.data import build_llama
from gradlens.optim import SCALE, scale_param_groups

NEVER = 10**9  # a log_every beyond the run: the timed blocks hold unlogged steps only

PRESETS = ("minimal", "standard", "full")
ROOT = Path(__file__).resolve().parent.parent


def make_optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    return SCALE(scale_param_groups(model, lr=1e-4, lr_1d=1e-3))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def sync_debug(device: torch.device, on: bool) -> Iterator[None]:
    """``set_sync_debug_mode("error")`` on CUDA while ``on`` (a sync raises), else nothing."""
    if device.type != "cuda" or not on:
        yield
        return
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


class Job:
    """A model, its optimizer and maybe a lens; ``step`` runs 2 micro-batches."""

    def __init__(self, model: torch.nn.Module, optimizer: str, preset: str | None,
                 log_every: int = 1) -> None:
        self.model = model
        self.opt = make_optimizer(optimizer, model)
        self.lens = None if preset is None else GradLens(
            model, self.opt, preset=preset, log_every=log_every)  # in memory: no disk

    def step(self, ids: torch.Tensor) -> None:
        for micro in ids.chunk(2):
            loss = self.model(input_ids=micro, labels=micro).loss / 2
            loss.backward()
            if self.lens is not None:
                self.lens.observe_loss(loss)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def close(self) -> None:
        if self.lens is not None:
            self.lens.close()


def build(size: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    return build_llama(size).to(device=device, dtype=dtype)


def run_gpu_tests() -> str:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"],
                          cwd=ROOT, capture_output=True, text=True)
    tail = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    return f"{'ok' if proc.returncode in (0, 5) else 'FAILED'}: {tail}"


def no_sync(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[str]:
    out = []
    for preset in PRESETS:
        torch.manual_seed(0)
        model = build(args.size, device, dtype)
        job = Job(model, "adamw", preset, log_every=4)
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
        checked = 0
        try:
            for step in range(1, 9):
                flush = step % 4 == 0
                with sync_debug(device, not flush and step > 1):  # step 1 allocates state
                    job.step(ids)
                checked += not flush and step > 1
            out.append(f"{preset}: {checked} steps without a sync"
                       + ("" if device.type == "cuda" else " (cpu: not enforced)"))
        except RuntimeError as err:
            out.append(f"{preset}: FAILED ({str(err).splitlines()[0][:80]})")
        finally:
            job.close()
    return out


def overhead(args: argparse.Namespace, device: torch.device,
             dtype: torch.dtype) -> list[tuple[str, str, float, float]]:
    """``(optimizer, preset, median ratio, noise floor)`` per optimizer and preset."""
    torch.manual_seed(0)
    base = build(args.size, device, dtype)
    ids_all = torch.randint(0, base.config.vocab_size, (4, args.batch, args.seq), device=device)
    rows = []
    for opt in ("adamw", "scale"):
        names = ["bare", "bare (copy)", *PRESETS]
        jobs = {n: Job(copy.deepcopy(base), opt, None if n.startswith("bare") else n)
                for n in names}
        times: dict[str, list[float]] = {n: [] for n in names}
        try:
            for n in names:
                for i in range(2):
                    jobs[n].step(ids_all[i])
            rng = random.Random(0)
            for r in range(args.rounds):
                for n in rng.sample(names, len(names)):
                    sync(device)
                    t0 = time.perf_counter()
                    for i in range(args.block):
                        jobs[n].step(ids_all[(r + i) % len(ids_all)])
                    sync(device)
                    times[n].append(time.perf_counter() - t0)
        finally:
            for job in jobs.values():
                job.close()
            del jobs

        def ratio(n: str, times=times) -> float:
            return statistics.median(a / b for a, b in zip(times[n], times["bare"], strict=True))

        rows += [(opt, p, ratio(p), ratio("bare (copy)")) for p in PRESETS]
    return rows


def scale_vs_adamw(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                   size: str) -> list[tuple[str, float, float]]:
    """``(optimizer, median step ms, peak MB)``; on the CPU, MB of optimizer state."""
    out = []
    for opt in ("adamw", "scale"):
        torch.manual_seed(0)
        model = build(size, device, dtype)
        job = Job(model, opt, None)
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
        job.step(ids)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ts = []
        for _ in range(args.block):
            sync(device)
            t0 = time.perf_counter()
            job.step(ids)
            sync(device)
            ts.append(time.perf_counter() - t0)
        if device.type == "cuda":
            mem = torch.cuda.max_memory_allocated(device) / 1e6
        else:
            mem = sum(t.numel() * t.element_size() for s in job.opt.state.values()
                      for t in s.values() if torch.is_tensor(t)) / 1e6
        out.append((opt, 1e3 * statistics.median(ts), mem))
        del job, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def narrow(args: argparse.Namespace, device: torch.device,
           dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    if args.tiny:
        return build(args.size, device, dtype)
    return build_llama("small", hidden_size=64, num_hidden_layers=32,
                       intermediate_size=172).to(device=device, dtype=dtype)


def per_tensor(args: argparse.Namespace, device: torch.device,
               dtype: torch.dtype) -> tuple[int, list[tuple[str, int, float, float, str]]]:
    """``(tensors, rows)``, a row ``(preset, log_every, us per tensor per step, ratio, sync)``:
    medians over rounds of the pair's time difference per step per tracked tensor and of its
    ratio; ``sync`` says whether the unflushed steps ran without a host sync."""
    model = narrow(args, device, dtype)
    opt = make_optimizer("adamw", model)
    ids_all = torch.randint(0, model.config.vocab_size, (4, args.batch, args.seq), device=device)
    everys = (1, 2, NEVER) if args.tiny else (1, 10, NEVER)  # NEVER: unlogged steps alone
    block = 2 if args.tiny else 10
    configs: list[tuple[str, str | None, int]] = [("bare (again)", None, 1)] + [
        (p, p, e) for p in PRESETS for e in everys]
    diff: dict[tuple[str, int], list[float]] = {(n, e): [] for n, _, e in configs}
    ratio: dict[tuple[str, int], list[float]] = {(n, e): [] for n, _, e in configs}
    synced: dict[tuple[str, int], str] = {(n, e): "no sync" for n, _, e in configs}
    tensors = sum(1 for p in model.parameters() if p.requires_grad)

    def run(lens: GradLens | None, r: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        for i in range(block):
            flush = lens is not None and lens.logging_step()
            with sync_debug(device, not flush):
                for micro in ids_all[(r + i) % len(ids_all)].chunk(2):
                    loss = model(input_ids=micro, labels=micro).loss / 2
                    loss.backward()
                    if lens is not None:
                        lens.observe_loss(loss)
                opt.step()
                opt.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - t0

    rng = random.Random(0)
    for _ in range(2):
        run(None, 0)
    for r in range(args.rounds):
        for name, preset, every in rng.sample(configs, len(configs)):
            timed: dict[bool, float] = {}
            for with_lens in rng.sample([False, True], 2):
                lens = None
                if with_lens and preset is not None:
                    lens = GradLens(model, opt, preset=preset, log_every=every)
                    run(lens, r)  # untimed: the lens allocates its state
                    tensors = len(lens.layers)
                try:
                    timed[with_lens] = run(lens, r)
                except RuntimeError as err:  # a sync under the debug mode
                    synced[(name, every)] = f"FAILED ({str(err).splitlines()[0][:60]})"
                    timed[with_lens] = float("nan")
                finally:
                    if lens is not None:
                        lens.close()
            diff[(name, every)].append(1e6 * (timed[True] - timed[False]) / (block * tensors))
            ratio[(name, every)].append(timed[True] / timed[False])
        print(f"per-tensor round {r + 1}/{args.rounds} done", flush=True)
    rows = [(n, e, statistics.median(diff[(n, e)]), statistics.median(ratio[(n, e)]),
             synced[(n, e)] + ("" if device.type == "cuda" else " (cpu: not enforced)"))
            for n, _, e in configs]
    return tensors, rows


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny model, few steps (a smoke run)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--block", type=int, default=5, help="steps per timed block")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (2 micro-batches)")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--no-tests", action="store_true", help="skip the gpu-marked tests")
    args = p.parse_args(argv)
    args.size, args.sizes = "130m", ["130m", "350m"]
    if args.tiny:
        args.size, args.sizes = "tiny", ["tiny"]
        args.rounds, args.block, args.batch, args.seq = 2, 2, 4, 16
    return args


def main(argv: Sequence[str] | None = None) -> list[tuple[str, str, str]]:
    """Run every check; print the table and return its rows ``(check, setting, result)``."""
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu --tiny")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    start = time.perf_counter()
    table: list[tuple[str, str, str]] = []
    if args.no_tests or device.type != "cuda":
        table.append(("gpu tests", "-m gpu", "skipped" + (" (cpu)" if device.type != "cuda"
                                                           else "")))
    else:
        table.append(("gpu tests", "-m gpu", run_gpu_tests()))
    table += [("no host sync", "log_every=4, flushes excepted", r)
              for r in no_sync(args, device, dtype)]
    for opt, preset, ratio, floor in overhead(args, device, dtype):
        table.append((f"lens overhead {args.size} {str(dtype)[6:]}", f"{opt} {preset}",
                      f"{ratio:.3f}x (noise floor {floor:.3f}x)"))
    tensors, rows = per_tensor(args, device, dtype)
    shape = "tiny" if args.tiny else "narrow"
    for preset, every, us, ratio, synced in rows:
        table.append((f"us/tensor/step {shape} ({tensors} tensors)",
                      f"{preset} log_every={'never' if every == NEVER else every}",
                      f"{us:8.1f} us, {ratio:.3f}x; {synced}"))
    mem_kind = "peak MB" if device.type == "cuda" else "state MB"
    for size in args.sizes:
        (_, a_ms, a_mem), (_, s_ms, s_mem) = scale_vs_adamw(args, device, dtype, size)
        table.append((f"scale vs adamw {size}", "step ms", f"{s_ms:.1f} vs {a_ms:.1f} "
                      f"({s_ms / a_ms:.2f}x)"))
        table.append((f"scale vs adamw {size}", mem_kind, f"{s_mem:.1f} vs {a_mem:.1f} "
                      f"({s_mem / max(a_mem, 1e-9):.2f}x)"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\ngradlens GPU suite on {name}, {time.perf_counter() - start:.0f} s; steps of 2 x "
          f"{args.batch // 2} x {args.seq} tokens")
    width = max(len(c) for c, _, _ in table)
    for check, setting, result in table:
        print(f"{check:{width}s}  {setting:30s}  {result}")
    return table


if __name__ == "__main__":
    main()
