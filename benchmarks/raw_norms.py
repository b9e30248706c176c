"""Detectors and estimators under clipping: the figures of the raw-norm change.

Three loops, each clipping between backward and step:

- ``plain``: a tiny LLaMA, AdamW, ``clip_grad_norm_(1.0)``, a 100x gradient spike (the loss
  times 100) at step ``SPIKE``; per preset the global ``grad_norm_z`` at that step and whether
  a ``grad_norm_global`` event fired there.
- ``hf``: the same spike in the HF Trainer at its defaults (``max_grad_norm=1.0``).
- ``ddp``: 2 gloo ranks, ``no_sync`` accumulation of 2 micro-batches, ``clip_grad_norm_(0.1)``
  (active: the tiny model's global norm is ~1), preset ``full``: the relative error of ``twobatch_trace``, ``twobatch_signal`` and
  ``pe_noise_scale`` against float64 references from exact per-(rank, micro-batch) and
  per-example gradients (median and max over layers; ``nan`` counts NaN cells, which must
  come with a validity event).

Run: ``python benchmarks/raw_norms.py [plain] [hf] [ddp]`` (all by default). Prints figures,
asserts nothing.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch

STEPS, SPIKE = 40, 35
PRESETS = ("minimal", "standard", "full")


def _spike_figures(rows, events) -> tuple[float, bool, bool]:
    z = next((v for s, layer, _, stat, v in rows
              if s == SPIKE and layer == "global" and stat == "grad_norm_z"), math.nan)
    fired = any(e.step == SPIKE and e.layer == "global" and e.kind == "grad_norm_global"
                for e in events)
    steps = {s for s, *_ in rows}
    pre = {s for s, layer, _, stat, _ in rows if layer == "global" and stat == "grad_norm_preclip"}
    return z, fired, steps <= pre


def plain(preset: str) -> tuple[float, bool, bool]:
    from gradlens import GradLens
    from gradlens.data import build_llama

    model = build_llama("tiny", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lens = GradLens(model, opt, preset=preset)
    g = torch.Generator().manual_seed(0)
    for s in range(1, STEPS + 1):
        ids = torch.randint(0, 128, (4, 12), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        (loss * (100.0 if s == SPIKE else 1.0)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    lens.flush()
    out = _spike_figures(lens.memory.rows, lens.memory.events)
    lens.close()
    return out


def hf(preset: str) -> tuple[float, bool, bool]:
    from transformers import Trainer, TrainingArguments

    from gradlens.data import build_llama
    from gradlens.integrations.hf import GradLensCallback
    from gradlens.sinks.memory import MemorySink

    class Rows(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.ids = torch.randint(0, 128, (4 * STEPS, 12),
                                     generator=torch.Generator().manual_seed(0))

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    class Spiky(Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            return loss * (100.0 if self.state.global_step == SPIKE - 1 else 1.0)

    memory = MemorySink()
    cb = GradLensCallback(preset=preset, sinks=[memory], tensorboard=False)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=STEPS, per_device_train_batch_size=4,
                                 logging_steps=1, learning_rate=1e-3, report_to=[],
                                 save_strategy="no", use_cpu=True, disable_tqdm=True)
        with contextlib.redirect_stdout(None):  # the Trainer prints its logs
            Spiky(model=build_llama("tiny", seed=0), args=args, train_dataset=Rows(),
                  callbacks=[cb]).train()
    return _spike_figures(memory.rows, memory.events)


# ----------------------------------------------------------------------------- DDP

WORLD, PER_RANK, MICRO = 2, 2, 2
DDP_CLIP = 0.1


def _batches():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 128, (WORLD * PER_RANK, 12), generator=g) for _ in range(MICRO)]


def _ddp_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gradlens import GradLens
    from gradlens.data import build_llama

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    model = DDP(build_llama("tiny", seed=0).double())
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    lens = GradLens(model, opt, preset="full", noise_ema=0.0)
    for k, ids in enumerate(_batches()):
        x = ids[rank * PER_RANK:(rank + 1) * PER_RANK]
        with model.no_sync() if k < MICRO - 1 else contextlib.nullcontext():
            (model(input_ids=x, labels=x).loss / MICRO).backward()
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), DDP_CLIP)
    opt.step()
    lens.flush()
    if rank == 0:
        torch.save({"rows": list(lens.memory.rows), "total": float(total),
                    "events": [(e.kind, e.layer, e.family, e.reason) for e in lens.memory.events
                               if e.kind == "validity"]}, Path(out) / "ddp.pt")
    lens.close()
    dist.destroy_process_group()


def _ddp_reference() -> dict[str, dict[str, float]]:
    """Exact float64 estimators from each (rank, micro-batch) and each example's gradient."""
    from gradlens.data import build_llama

    model = build_llama("tiny", seed=0).double()
    params = dict(model.named_parameters())

    def grad(x):
        gs = torch.autograd.grad(model(input_ids=x, labels=x).loss, list(params.values()))
        return dict(zip(params, gs, strict=True))

    small, examples = [], []
    for ids in _batches():
        small += [grad(ids[r * PER_RANK:(r + 1) * PER_RANK]) for r in range(WORLD)]
        examples += [grad(ids[i:i + 1]) for i in range(ids.shape[0])]
    b, B = PER_RANK, PER_RANK * WORLD * MICRO
    out = {}
    for name in params:
        big = torch.stack([m[name] for m in small]).mean(0)
        y = float(big.pow(2).sum())
        s = sum(float(m[name].pow(2).sum()) for m in small) / len(small)
        tr = (s - y) / (1 / b - 1 / B)
        m = sum(float(e[name].pow(2).sum()) for e in examples) / B
        pe_tr = (m - y) * B / (B - 1)
        out[name] = {"twobatch_trace": tr, "twobatch_signal": y - tr / B,
                     "pe_noise_scale": pe_tr / (y - pe_tr / B)}
    return out


def ddp() -> dict[str, tuple[float, float, int]]:
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_ddp_rank, args=(port, tmp), nprocs=WORLD, start_method="spawn")
        got = torch.load(Path(tmp) / "ddp.pt", weights_only=False)
    ref = _ddp_reference()
    rows = {(layer, stat): v for _, layer, _, stat, v in got["rows"]}
    figures = {}
    for stat in ("twobatch_trace", "twobatch_signal", "pe_noise_scale"):
        errs, nan = [], 0
        for name, r in ref.items():
            v = rows.get((name, stat), math.nan)
            if math.isnan(v):
                nan += 1
            else:
                errs.append(abs(v - r[stat]) / abs(r[stat]))
        errs.sort()
        figures[stat] = (errs[len(errs) // 2] if errs else math.nan,
                         errs[-1] if errs else math.nan, nan)
    figures["validity"] = got["events"]
    figures["total"] = got["total"]
    return figures


def main(which: list[str]) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    import warnings

    warnings.simplefilter("ignore")
    print(f"100x spike at step {SPIKE} of {STEPS}, clip 1.0; threshold 9")
    for loop in ("plain", "hf"):
        if loop not in which:
            continue
        for preset in PRESETS:
            z, fired, pre = (plain if loop == "plain" else hf)(preset)
            print(f"{loop:6s} {preset:9s} global z {z:8.2f}  event {fired!s:5s}  "
                  f"grad_norm_preclip on every step {pre}")
    if "ddp" in which:
        figs = ddp()
        events = figs.pop("validity")
        print(f"ddp+clip: global norm {figs.pop('total'):.3f} clipped to {DDP_CLIP}")
        for stat, (med, worst, nan) in figs.items():
            print(f"ddp+clip {stat:16s} rel err median {med:.2e} max {worst:.2e}  NaN {nan}")
        print(f"ddp+clip validity events: {events}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["plain", "hf", "ddp"])
