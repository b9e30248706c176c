"""What runs inside the 2-process gloo group of ``tests/distributed``, and the single-process
runs on the same global batches that the tests compare it with.

Every rank gets ``PER_RANK`` rows of each global micro-batch of ``WORLD * PER_RANK`` rows; the
LLaMA loss is a token mean over equal-length rows, so the mean of the ranks' losses is the loss
of the global micro-batch and DDP's / FSDP2's averaged gradient is its gradient.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

WORLD = 2
PER_RANK = 2
SEQ = 12
VOCAB = 128
LR = 1e-2
CLIP = 0.1  # below the tiny model's global norm (~1): the clipping is active
SPIKE, SPIKE_STEPS = 30, 31  # a 100x gradient spike after the detectors' warm-up (25)


def global_batches(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (WORLD * PER_RANK, SEQ), generator=g) for _ in range(n)]


def rank_rows(ids: torch.Tensor, rank: int) -> torch.Tensor:
    return ids[rank * PER_RANK:(rank + 1) * PER_RANK]


def make_model(dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    from gradlens.data import build_llama

    return build_llama("tiny", seed=seed).to(dtype)


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    from gradlens.optim import SCALE, scale_param_groups

    return SCALE(scale_param_groups(model, lr=LR, lr_1d=LR))


def rows_of(lens: Any) -> dict[tuple[int, str, str], float]:
    lens.flush()
    return {(int(s), layer, stat): float(v) for s, layer, _, stat, v in lens.memory.rows}


def events_of(lens: Any) -> list[tuple]:
    lens.flush()
    return [(e.step, e.layer, e.kind, e.family, e.reason) for e in lens.memory.events]


def histograms_of(lens: Any) -> dict[tuple[int, str], tuple[list[float], list[float]]]:
    return {(h.step, h.layer): (list(h.edges), list(h.counts)) for h in lens.memory.histograms}


class CollectiveCounter:
    """Counts ``torch.distributed.all_reduce`` calls by the file that made them."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        original = dist.all_reduce

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(Path(sys._getframe(1).f_code.co_filename).name)
            return original(*args, **kwargs)

        dist.all_reduce = counted
        try:
            yield
        finally:
            dist.all_reduce = original

    def take(self) -> dict[str, int]:
        out = {"lens": self.calls.count("distributed.py"),
               "scale": self.calls.count("functional.py")}
        self.calls = []
        return out


# ----------------------------------------------------------------------------- one process


def reference_run(batches: list[torch.Tensor], *, micro: int, steps: int, log_every: int,
                  preset: str, dtype: torch.dtype = torch.float64, clip: float | None = None,
                  **options: Any) -> dict[str, Any]:
    """The run a distributed one must reproduce: one process, the global micro-batches, plus
    the exact per-(rank, micro-batch) and per-example gradients of every step (``clip``: a
    ``clip_grad_norm_`` before each step, so that the weights follow the clipped run)."""
    from gradlens import GradLens

    model = make_model(dtype)
    shadow = make_model(dtype)  # the exact gradients, away from the lens's hooks
    opt = make_optimizer(model)
    lens = GradLens(model, opt, preset=preset, log_every=log_every, noise_ema=0.0, **options)
    names = [i.name for i in lens.layers]
    params = dict(shadow.named_parameters())
    small: list[list[dict[str, torch.Tensor]]] = []
    per_example: list[list[dict[str, torch.Tensor]]] = []
    for s in range(steps):
        shadow.load_state_dict(model.state_dict())
        step_small, step_pe = [], []
        for k in range(micro):
            ids = batches[s * micro + k]
            for r in range(WORLD):  # each rank's micro-batch mean gradient
                x = rank_rows(ids, r)
                grads = torch.autograd.grad(shadow(input_ids=x, labels=x).loss,
                                            [params[n] for n in names])
                step_small.append(dict(zip(names, grads, strict=True)))
            for b in range(ids.shape[0]):  # each example's own-loss gradient
                x = ids[b:b + 1]
                grads = torch.autograd.grad(shadow(input_ids=x, labels=x).loss,
                                            [params[n] for n in names])
                step_pe.append(dict(zip(names, grads, strict=True)))
        small.append(step_small)
        per_example.append(step_pe)
        for k in range(micro):
            ids = batches[s * micro + k]
            loss = model(input_ids=ids, labels=ids).loss / micro
            loss.backward()
            lens.observe_loss(loss)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    out = {"rows": rows_of(lens), "hists": histograms_of(lens), "small": small,
           "per_example": per_example,
           "params": {n: p.detach().clone() for n, p in model.named_parameters()},
           "layers": [(i.name, i.layout, i.numel) for i in lens.layers]}
    lens.close()
    return out


# ----------------------------------------------------------------------------- the 2-rank group


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, lens: Any, rank: int,
           batches: list[torch.Tensor], micro: int, steps: int,
           sync: Callable[[int], Any], counter: CollectiveCounter, clip: float | None = None,
           value_clip: float | None = None, spike: int | None = None) -> list[dict[str, int]]:
    """``clip`` / ``value_clip``: ``clip_grad_norm_`` / ``clip_grad_value_`` before each step;
    ``spike``: the step (1-based) whose loss is multiplied by 100 (a 100x raw gradient)."""
    counts = []
    for s in range(steps):
        for k in range(micro):
            x = rank_rows(batches[s * micro + k], rank)
            with sync(k):
                loss = model(input_ids=x, labels=x).loss / micro
                (loss * (100.0 if s + 1 == spike else 1.0)).backward()
            lens.observe_loss(loss)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if value_clip is not None:
            torch.nn.utils.clip_grad_value_(model.parameters(), value_clip)
        with counter():
            opt.step()  # the lens finalizes in the step pre-hook
        counts.append(counter.take())
        opt.zero_grad(set_to_none=True)
    return counts


def ddp_scenario(rank: int, *, micro: int, steps: int, log_every: int, preset: str,
                 seed: int, edits: dict[str, Any] | None = None,
                 **options: Any) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gradlens import GradLens

    model = DDP(make_model())
    opt = make_optimizer(model.module)
    lens = GradLens(model, opt, preset=preset, log_every=log_every, noise_ema=0.0, **options)
    seen: list[torch.Tensor] = []  # what a parameter hook sees, next to DDP's reducer
    q = model.module.model.layers[0].self_attn.q_proj.weight
    handle = q.register_hook(lambda g: seen.append(g.detach().clone()))

    def sync(k: int) -> Any:
        return model.no_sync() if k < micro - 1 else contextlib.nullcontext()

    counts = _train(model, opt, lens, rank, global_batches(steps * micro, seed), micro, steps,
                    sync, CollectiveCounter(), **(edits or {}))
    handle.remove()
    out = {"rows": rows_of(lens) if rank == 0 else None,
           "hists": histograms_of(lens) if rank == 0 else None, "counts": counts,
           "events": events_of(lens) if rank == 0 else None,
           "params": {n: p.detach().clone() for n, p in model.module.named_parameters()},
           "hook_seen": seen}
    lens.close()
    return out


def fsdp_scenario(rank: int, *, micro: int, steps: int, log_every: int, preset: str,
                  seed: int, edits: dict[str, Any] | None = None,
                  **options: Any) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    from gradlens import GradLens

    model = make_model()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = make_optimizer(model)
    lens = GradLens(model, opt, preset=preset, log_every=log_every, noise_ema=0.0, **options)

    def sync(k: int) -> Any:
        model.set_requires_gradient_sync(k == micro - 1)
        return contextlib.nullcontext()

    counts = _train(model, opt, lens, rank, global_batches(steps * micro, seed), micro, steps,
                    sync, CollectiveCounter(), **(edits or {}))
    placements = {n: str(tuple(p.placements)) for n, p in model.named_parameters()}
    params = {n: p.detach().full_tensor() for n, p in model.named_parameters()}  # collective
    out = {"rows": rows_of(lens) if rank == 0 else None,
           "hists": histograms_of(lens) if rank == 0 else None, "counts": counts,
           "events": events_of(lens) if rank == 0 else None,
           "params": params, "placements": placements}
    lens.close()
    return out


def _user_families() -> list[Any]:
    """Three user families whose per-rank values differ under FSDP2 (each sees its shards):
    a ``sum`` and a ``mean`` :class:`LayerStatistic`, and a family declaring a ``max``
    partial; each keeps what it computed on this rank, per logged step."""
    from gradlens import LayerStatistic, Statistic
    from gradlens.catalog import Partial

    class Recorded:
        def observe(self, ctx: Any) -> None:
            super().observe(ctx)  # type: ignore[misc]
            if ctx.logging:
                self.seen[ctx.step] = ctx.data[self.name].clone()  # type: ignore[attr-defined]

    class ShardSq(Recorded, LayerStatistic):
        """Squared norm of the rank's shard (summed: the layer's squared norm)."""

        name, emits, reduce = "test_shard_sq", ("test_shard_sq",), "sum"

        def compute(self, grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
            return grad.pow(2).sum()

    class ShardMean(Recorded, LayerStatistic):
        """Mean |g| of the rank's shard (averaged over ranks)."""

        name, emits, reduce = "test_shard_mean", ("test_shard_mean",), "mean"

        def compute(self, grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
            return grad.abs().mean() if grad.numel() else grad.new_zeros(())

    class ShardMax(Recorded, Statistic):
        """Largest |g| of the rank's shards, through a declared ``max`` partial."""

        name, emits = "test_shard_max", ("test_shard_max",)
        needs = frozenset({"step_grad"})
        partial_specs = (Partial("max_abs", "max", doc="largest |g| of the rank's shards"),)

        def observe(self, ctx: Any) -> None:
            if ctx.logging:
                ctx.data[self.name] = torch.stack([
                    g.abs().max() if g.numel() else g.new_zeros(()) for g in ctx.grads
                ]).to(self.lens.dtype)
            super().observe(ctx)

        def partials(self, ctx: Any) -> dict[str, torch.Tensor]:
            return {"max_abs": ctx.data[self.name]}

        def emit(self, ctx: Any, red: Any, out: dict[str, torch.Tensor]) -> None:
            out[self.emits[0]] = red["max_abs"]

    families = [ShardSq(), ShardMean(), ShardMax()]
    for f in families:
        f.seen = {}
    return families


def user_partials_scenario(rank: int) -> dict[str, Any]:
    """FSDP2 with user families: what each rank computed, and the reduced rows."""
    from torch.distributed.fsdp import fully_shard

    from gradlens import GradLens

    model = make_model()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = make_optimizer(model)
    families = _user_families()
    lens = GradLens(model, opt, preset="minimal", log_every=1, noise_ema=0.0,
                    statistics=families)
    counts = _train(model, opt, lens, rank, global_batches(2, 8), 1, 2,
                    lambda k: contextlib.nullcontext(), CollectiveCounter())
    local = {f.name: {s: v.tolist() for s, v in f.seen.items()} for f in families}
    ranks: list[Any] = [None] * WORLD
    dist.all_gather_object(ranks, local)
    out = {"rows": rows_of(lens) if rank == 0 else None, "counts": counts, "ranks": ranks,
           "layers": [i.name for i in lens.layers]}
    lens.close()
    return out


def bf16_scenario(rank: int) -> dict[str, Any]:
    """bf16 gradients under DDP: the lens accumulates in float32."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gradlens import GradLens

    model = DDP(make_model(torch.bfloat16))
    lens = GradLens(model, preset="standard")
    x = rank_rows(global_batches(1, 5)[0], rank)
    model(input_ids=x, labels=x).loss.backward()
    lens.step()
    exact = {n: float(p.grad.float().norm()) for n, p in model.module.named_parameters()}
    low = {n: float(p.grad.norm()) for n, p in model.module.named_parameters()}
    out = {"rows": rows_of(lens) if rank == 0 else None, "exact": exact, "bf16": low}
    lens.close()
    return out


def kernel_checks(rank: int) -> dict[str, float]:
    """SCALE's RMS on DTensors (both axes, uneven shards, ndim 3) against whole tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from gradlens.optim.functional import _rms_for, clamped_unit_rms, scale_update

    mesh = init_device_mesh("cpu", (WORLD,))
    g = torch.Generator().manual_seed(3)
    errors: dict[str, float] = {}
    cases = [((7, 5), 0, 0), ((7, 5), 0, 1), ((6, 5), 1, 1), ((6, 5), 1, 0), ((3, 4, 5), 0, 0),
             ((3, 4, 5), 2, 1), ((1, 6), 0, 0)]  # (shape, shard dim, norm_dim); 1 row: empty
    for shape, dim, norm_dim in cases:
        full = torch.randn(shape, generator=g, dtype=torch.float64)
        dt = distribute_tensor(full, mesh, [Shard(dim)])
        want = distribute_tensor(full / _rms_for(full, norm_dim), mesh, [Shard(dim)]).to_local()
        if len(shape) == 2:
            got = dt.to_local() / clamped_unit_rms(dt, norm_dim)
        else:
            got = dt.to_local() / _rms_for(dt.to_local(), norm_dim, dt)
        errors[f"rms{shape}/shard{dim}/norm{norm_dim}"] = float((got - want).abs().max()) \
            if got.numel() else 0.0
    # the lens's placement of shards: uneven and empty shards, both axes, one Pack
    from gradlens import stats as S
    from gradlens.core import distributed as D

    pack = D.Pack(WORLD, rank)
    wanted = {}
    cases2 = [((7, 5), 0, "linear"), ((7, 5), 1, "linear"), ((9, 4), 0, "embedding"),
              ((1, 3), 0, "linear"), ((6,), 0, "vector")]
    for j, (shape, dim, layout) in enumerate(cases2):
        full = torch.randn(shape, generator=g, dtype=torch.float64)
        if layout == "embedding":
            full[3, 1] = float("nan")  # excluded from sums, counted out of its fan's count
        dt = distribute_tensor(full, mesh, [Shard(dim)])
        (local,), (s,) = D.localize([dt], [layout], WORLD)
        summary = S.grad_summaries([local])[0]
        pack.sum(f"sq{j}", summary[0])
        pack.max(f"max{j}", summary[1])
        wanted[f"sq{j}"] = S.finite_sq_norm(full)
        wanted[f"max{j}"] = S.finite_max_abs(full)
        if layout != "vector":
            pack.sum(f"unit{j}", D.place(S.unit_sq_norms(local, layout), s.units))
            pack.sum(f"fan{j}", D.place(S.fan_sq_norms(local, layout), s.fan))
            pack.sum(f"cnt{j}", D.place(D.fan_finite_counts(local, layout), s.fan))
            wanted[f"unit{j}"] = S.unit_sq_norms(full, layout)
            wanted[f"fan{j}"] = S.fan_sq_norms(full, layout)
            wanted[f"cnt{j}"] = D.fan_finite_counts(full, layout)
    red = pack.reduce()
    for key, want in wanted.items():
        errors[f"lens/{key}"] = float((red[key] - want).abs().max())
    # the kernel itself: loop and foreach paths on DTensors equal the whole-tensor update
    for foreach in (False, True):
        ps = [torch.randn(s, generator=g, dtype=torch.float64) for s in ((8, 4), (5, 6))]
        gs = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in ps]
        ms = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in ps]
        dps = [distribute_tensor(p, mesh, [Shard(0)]) for p in ps]
        dgs = [distribute_tensor(x, mesh, [Shard(0)]) for x in gs]
        dms = [distribute_tensor(m, mesh, [Shard(0)]) for m in ms]
        for norm_dim in (0, 1):
            kw = dict(lr=0.1, weight_decay=0.01, momentum=0.5, norm_dim=norm_dim, foreach=foreach)
            scale_update(ps, gs, ms, **kw)
            scale_update(dps, dgs, dms, **kw)
        errors[f"scale_update/foreach={foreach}"] = max(
            float((d.full_tensor() - p).abs().max()) for d, p in zip(dps, ps, strict=True))
    return errors


def run(rank: int, port: int, outdir: str) -> None:
    """Entry point of each spawned rank: every scenario in one process group."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        results = {
            "kernels": kernel_checks(rank),
            # no accumulation: each rank's gradient is the small batch
            "ddp": ddp_scenario(rank, micro=1, steps=2, log_every=1, preset="standard", seed=1),
            # no_sync() accumulation, a non-logged step in between, per-example and temporal
            "ddp_accum": ddp_scenario(rank, micro=2, steps=2, log_every=2, preset="full",
                                      seed=2),
            "fsdp": fsdp_scenario(rank, micro=2, steps=2, log_every=2, preset="full", seed=3,
                                  temporal=False),
            "bf16": bf16_scenario(rank),
            # user families' declared partials (sum, mean, max) on FSDP2 shards
            "user_partials": user_partials_scenario(rank),
            # clipping between the no_sync accumulation and the step: corrected exactly
            "ddp_clip": ddp_scenario(rank, micro=2, steps=2, log_every=1, preset="full",
                                     seed=4, edits={"clip": CLIP}),
            # value clipping: not one common factor, NaN with a validity event
            "ddp_value_clip": ddp_scenario(rank, micro=2, steps=1, log_every=1,
                                           preset="standard", seed=5,
                                           edits={"value_clip": 1e-3}),
            "fsdp_clip": fsdp_scenario(rank, micro=2, steps=2, log_every=1, preset="full",
                                       seed=6, temporal=False, edits={"clip": CLIP}),
            **{f"ddp_spike_{preset}": ddp_scenario(
                rank, micro=2, steps=SPIKE_STEPS, log_every=1, preset=preset, seed=7,
                edits={"clip": 1.0, "spike": SPIKE}) for preset in ("minimal", "standard",
                                                                    "full")},
        }
        if rank == 0:
            torch.save(results, Path(outdir) / "results.pt")
    finally:
        dist.destroy_process_group()
