"""The collector: hooks on a model, statistics on device, one transfer per flush.

Event flow of one optimizer step::

    forward            model pre-hook records the micro-batch size (a shape: no sync)
                       [full] module hooks keep each tracked layer's input
    loss.backward()    parameter hooks see this micro-batch's gradient h_k: its squared norm
                       (and per-unit squared norms) are accumulated on device (logged steps)
                       [full] output-gradient hooks turn (input, output grad) into per-example
                       squared norms without materializing per-example gradients
    optimizer.step()   step pre-hook: p.grad is final (after clipping, after AMP unscaling):
                       norms, non-finite counts and spike detectors (every step); column spread,
                       variance estimators, histograms (logged steps); all stay on device
    every log_every    ONE device->host transfer (and one all-reduce under torch.distributed),
                       rows and events to the sinks

Scaling conventions (``loss_reduction``): with ``mean`` (default) the loss of a micro-batch is
its mean over examples divided by the number K of micro-batches, so a hook sees ``h_k = G_k/K``
and the small-batch gradient is ``K h_k``; with ``sum`` it is ``h_k / B``. The noise scales do
not depend on this choice; the raw traces do.

Data parallelism (DDP, FSDP2; details in :mod:`gradlens.core.distributed`). Create the lens
after wrapping the model (a DDP wrapper is unwrapped; FSDP2 shards in place), on every rank.
A hook sees the rank-local micro-batch gradient before the all-reduce / reduce-scatter, and
``p.grad`` at the step is the mean over ranks (DDP: whole; FSDP2: this rank's shard of it).
With W ranks of K micro-batches of B examples, the small batch is one rank's micro-batch
(``B_small = B``, gradient ``K h_k`` under ``mean``, ``h_k / B`` under ``sum``) and the big one
the global step (``B_big = K W B``, gradient ``p.grad``, or ``p.grad / (K B)`` under ``sum``,
since DDP divides the summed gradients by W): so a multi-rank run has noise scales without
gradient accumulation, and ``_scale_factors`` holds under DDP's averaging. Ranks must have
equal micro-batch sizes. Everything rank-local (micro-batch and per-example sums, the loss,
FSDP2's partial norms and per-unit vectors) is reduced with ONE all-reduce per flush; the
detectors of the steps in between run after it, in step order. So ``flush()`` and ``close()``
are collective under torch.distributed (every rank calls them; the training loop does), and
``state_dict()`` holds the detectors up to the last flush. Only rank 0 writes.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradlens import stats as S
from gradlens.core import distributed as D
from gradlens.core.config import LensConfig
from gradlens.core.selection import select_layers
from gradlens.roles import LayerInfo, Role, discover_layers
from gradlens.schema import GLOBAL, SpikeEvent
from gradlens.sinks.base import Histogram, Sink

__all__ = ["GradLens"]

_PER_EXAMPLE_MODULES = ("Linear", "Conv1D", "Embedding")


class GradLens:
    """Per-layer gradient statistics of a training run.

    Args:
        model: any ``nn.Module`` (HF causal LMs get their roles from their embeddings).
        optimizer: the optimizer whose ``step()`` consumes the gradients; the lens finalizes
            each step in a step pre-hook. Without one, call :meth:`step` after each backward.
        logdir: run directory (TensorBoard events, the long table, spikes.jsonl, run.json).
            ``None`` keeps everything in memory (``lens.memory``).
        preset: ``minimal`` | ``standard`` | ``full`` (see :mod:`gradlens.core.config`).
        log_every: record statistics every this many steps.
        include, exclude: fnmatch patterns on parameter names; roles: roles to track.
        overrides, output: role overrides, passed to :func:`gradlens.roles.discover_layers`.
        sinks: extra sinks (or instead of the default ones when ``logdir`` is None).
        table_format: ``csv`` | ``jsonl`` | ``parquet``.
        tensorboard: write TensorBoard events too.
        scaler: a ``torch.amp.GradScaler``: micro-batch statistics are unscaled with its scale,
            and a step it skips (inf/NaN) becomes a ``skipped_step`` event.
        name: run name stored in run.json (default: the logdir's name).
        meta: extra JSON-able entries for run.json (framework, run config, ...).
        **options: any :class:`~gradlens.core.config.LensConfig` field.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        logdir: str | Path | None = None,
        preset: str = "standard",
        log_every: int = 1,
        *,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        roles: Sequence[Role | str] | None = None,
        overrides: Mapping[str, Role | str] | None = None,
        output: str | None = None,
        sinks: Iterable[Sink] | None = None,
        table_format: str = "csv",
        tensorboard: bool = True,
        scaler: Any = None,
        name: str | None = None,
        meta: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        self.config = LensConfig.from_preset(preset, log_every=log_every, **options)
        model = D.unwrap_model(model)  # DDP: the inner module, same names as one process
        self.model = model
        self._world = D.world_size()
        self._deferred: list[_StepRecord] = []  # steps awaiting the reduction (distributed)
        self._unsharded: dict[int, Any] = {}  # FSDP2: id -> weakref of hooked unsharded params
        self._temporal_off = False  # warned that sharded gradients turn temporal stats off
        self.optimizer = optimizer
        self.scaler = scaler
        infos = discover_layers(model, overrides=overrides, output=output)
        self.layers: list[LayerInfo] = select_layers(infos, include, exclude, roles)
        self._index = {id(i.param): k for k, i in enumerate(self.layers)}
        self._matrix = [i.layout != "vector" for i in self.layers]
        self._numel = [i.numel for i in self.layers]
        self.logdir = Path(logdir) if logdir is not None else None
        self.sinks: list[Sink] = list(sinks or [])
        self.memory = None
        self._make_default_sinks(table_format, tensorboard)
        self.step_count = 0
        self._closed = False
        self._handles: list[Any] = []
        self._pending: list[tuple[int, str, Any]] = []  # (step, kind, payload) until a flush
        self._device: torch.device | None = None
        self._dtype = torch.float32  # accumulation dtype: float64 for a float64 model
        self._state: dict[str, torch.Tensor] = {}
        self._consts: dict[str, torch.Tensor] = {}
        self._temporal: dict[int, dict[str, Any]] = {}
        self._reset_step_accumulators()
        self._install_hooks()
        self._open_sinks(name, meta)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> GradLens:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None and self._world > 1:
            self._deferred.clear()  # no collective while one rank unwinds: it could hang
        self.close()

    def close(self) -> None:
        """Flush what is pending, remove every hook, close the sinks. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.scaler is not None and "update" in vars(self.scaler):
            del self.scaler.update  # restore the class method
        self.flush()
        for sink in self.sinks:
            sink.close()

    def state_dict(self) -> dict[str, Any]:
        """Running statistics and detectors, to resume a run with identical detection."""
        return {
            "step_count": self.step_count,
            "state": {k: v.detach().clone() for k, v in self._state.items()},
            "temporal": {
                self.layers[k].name: {kk: (vv.clone() if torch.is_tensor(vv) else vv)
                                      for kk, vv in st.items()}
                for k, st in self._temporal.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self._state = {k: v.clone() for k, v in state["state"].items()}
        names = {i.name: k for k, i in enumerate(self.layers)}
        self._temporal = {}
        for name, st in state.get("temporal", {}).items():
            if name in names:
                self._temporal[names[name]] = {
                    k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()
                }

    # ------------------------------------------------------------------ user calls

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Hand over the loss you call ``backward()`` on (a tensor; no sync). The losses of the
        step's micro-batches are summed (with the usual ``loss / K`` that is the step's mean
        loss) and reported as ``loss`` at layer ``global``, with a spike detector."""
        value = loss.detach().float().reshape(())
        self._loss = value if self._loss is None else self._loss + value

    def log_scalars(self, values: Mapping[str, float], step: int | None = None) -> None:
        """Record host-side scalars (already Python numbers) as ``global`` rows, e.g. the
        pre-clip norm a trainer reports. They go out with the next flush."""
        step = self.step_count if step is None else int(step)
        for stat, value in values.items():
            self._pending.append((step, "row", (GLOBAL, GLOBAL, stat, float(value))))

    def step(self) -> None:
        """Finalize the current step. Called by the optimizer's step pre-hook; call it yourself
        (after the backward passes, before zeroing the grads) when the lens has no optimizer."""
        if self._closed:
            raise RuntimeError("this GradLens is closed")
        self._finalize(skipped=False)

    # ------------------------------------------------------------------ setup

    def _make_default_sinks(self, table_format: str, tensorboard: bool) -> None:
        if not D.is_writer_rank():
            self.sinks = []  # under torch.distributed only rank 0 writes
            return
        if self.logdir is not None:
            from gradlens.sinks.table import TableSink

            self.sinks.insert(0, TableSink(self.logdir, format=table_format))
            if tensorboard:
                from gradlens.sinks.tensorboard import TensorBoardSink

                self.sinks.append(TensorBoardSink(self.logdir))
        elif not self.sinks:
            from gradlens.sinks.memory import MemorySink

            self.memory = MemorySink()
            self.sinks.append(self.memory)

    def _open_sinks(self, name: str | None, meta: Mapping[str, Any] | None) -> None:
        if not self.sinks:
            return
        from gradlens import __version__
        from gradlens.sinks.base import layer_group

        run_meta: dict[str, Any] = {
            "name": name or (self.logdir.name if self.logdir is not None else "run"),
            "gradlens_version": __version__,
            "model": type(self.model).__name__,
            "num_parameters": sum(p.numel() for p in self.model.parameters()),
            "optimizer": type(self.optimizer).__name__ if self.optimizer is not None else None,
            "preset": self.config.preset,
            "log_every": self.config.log_every,
            "loss_reduction": self.config.loss_reduction,
            "world_size": self._world,
            "stats": self.config.stat_names(),
            "layers": [
                {
                    "name": i.name,
                    "role": i.role.value,
                    "layout": i.layout,
                    "shape": list(i.param.shape),
                    "numel": i.numel,
                    "group": layer_group(i.name, i.role.value),
                    "aliases": list(i.aliases),
                }
                for i in self.layers
            ],
        }
        if meta:
            run_meta.update(meta)
        for sink in self.sinks:
            sink.open(run_meta)

    def _install_hooks(self) -> None:
        cfg = self.config
        self._handles.append(self.model.register_forward_pre_hook(self._on_forward,
                                                                  with_kwargs=True))
        if cfg.microbatch:
            for k, info in enumerate(self.layers):
                if not D.is_dtensor(info.param):  # FSDP2 shards: see _install_unsharded_hooks
                    self._handles.append(info.param.register_hook(self._micro_hook(k)))
            self._install_unsharded_hooks()
        if cfg.per_example:
            self._install_per_example_hooks()
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._on_optimizer_step))
        if self.scaler is not None:
            self._wrap_scaler(self.scaler)

    def _install_unsharded_hooks(self) -> None:
        """FSDP2: a hook on a sharded (``DTensor``) parameter never fires, because forward and
        backward use an unsharded ``nn.Parameter`` that FSDP2 creates once and reuses. A
        forward pre-hook of the owning module (it runs after FSDP2's unshard) finds that
        parameter under the same attribute and hooks it once: the hook then sees the
        rank-local micro-batch gradient before the reduce-scatter, as under DDP."""
        by_module: dict[str, list[tuple[int, str]]] = {}
        for k, info in enumerate(self.layers):
            if D.is_dtensor(info.param) and not info.aliases:
                leaf = info.name[len(info.module_name) + 1:] if info.module_name else info.name
                by_module.setdefault(info.module_name, []).append((k, leaf))
        modules = dict(self.model.named_modules())
        for module_name, items in by_module.items():
            module = modules.get(module_name)
            if module is None:
                continue

            def pre_hook(mod: nn.Module, args: tuple, items=items) -> None:
                for k, leaf in items:
                    p = getattr(mod, leaf, None)
                    if not torch.is_tensor(p) or D.is_dtensor(p) or not p.requires_grad:
                        continue  # still sharded (lens created before fully_shard?)
                    ref = self._unsharded.get(id(p))
                    if ref is not None and ref() is p:
                        continue
                    self._unsharded[id(p)] = weakref.ref(p)
                    self._handles.append(p.register_hook(self._micro_hook(k)))

            self._handles.append(module.register_forward_pre_hook(pre_hook))

    def _install_per_example_hooks(self) -> None:
        owners: dict[int, tuple[nn.Module, int]] = {}
        modules = dict(self.model.named_modules())
        for k, info in enumerate(self.layers):
            if info.aliases or info.layout == "vector":
                continue  # a tied tensor mixes two uses; per-example norms would be wrong
            module = modules.get(info.module_name)
            if module is None or type(module).__name__ not in _PER_EXAMPLE_MODULES:
                continue
            if getattr(module, "weight", None) is not info.param:
                continue
            owners[id(module)] = (module, k)
        for module, k in owners.values():
            self._handles.append(module.register_forward_hook(self._per_example_hook(k)))

    def _wrap_scaler(self, scaler: Any) -> None:
        lens_ref = weakref.ref(self)
        original = type(scaler).update

        def update(new_scale: Any = None) -> None:
            lens = lens_ref()
            if lens is not None and not lens._closed and lens._step_open():
                lens._finalize(skipped=True)  # optimizer.step() never ran: the step was skipped
            original(scaler, new_scale)

        scaler.update = update  # instance attribute; removed by close()

    # ------------------------------------------------------------------ hooks (hot path)

    def _reset_step_accumulators(self) -> None:
        self._micro_seen = [0] * len(self.layers)
        self._mb_sq: list[torch.Tensor | None] = [None] * len(self.layers)
        self._mb_unit: list[torch.Tensor | None] = [None] * len(self.layers)
        self._pe_sq: list[torch.Tensor | None] = [None] * len(self.layers)
        self._pe_count = [0] * len(self.layers)
        self._grams: list[tuple[torch.Tensor, torch.Tensor]] = []  # see _input_gram
        self._batch_size: int | None = None
        self._loss: torch.Tensor | None = None

    def _step_open(self) -> bool:
        return any(self._micro_seen) or self._loss is not None

    def _logging_step(self) -> bool:
        return (self.step_count + 1) % self.config.log_every == 0

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._batch_size is None and torch.is_grad_enabled():
            for value in (*args, *kwargs.values()):
                if torch.is_tensor(value) and value.ndim >= 1:
                    self._batch_size = int(value.shape[0])  # a shape, not a sync
                    break

    def _micro_hook(self, k: int):
        layout = self.layers[k].layout

        param = self.layers[k].param

        def accumulate(g: torch.Tensor) -> None:
            if layout == "vector":
                sq = S.finite_sq_norm(g)
                unit = None
            else:
                unit = S.unit_sq_norms(g, layout)
                sq = unit.sum()
            self._mb_sq[k] = sq if self._mb_sq[k] is None else self._mb_sq[k] + sq
            if unit is not None:
                self._mb_unit[k] = unit if self._mb_unit[k] is None else self._mb_unit[k] + unit

        def hook(grad: torch.Tensor) -> None:
            self._micro_seen[k] += 1
            if not self._logging_step():
                return
            if self._world == 1:
                # One process: a single micro-batch gives no two-batch estimate, so the first
                # one costs nothing. At the second, p.grad still holds exactly the first (this
                # hook runs before autograd accumulates into p.grad; grads are zeroed between
                # steps), and it is measured then.
                if self._micro_seen[k] == 1:
                    return
                if self._micro_seen[k] == 2 and param.grad is not None:
                    accumulate(param.grad.detach())
            accumulate(grad.detach())

        return hook

    def _per_example_hook(self, k: int):
        kind = self.layers[k].layout

        def forward_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not (torch.is_grad_enabled() and torch.is_tensor(output) and output.requires_grad):
                return
            if not self._logging_step():
                return
            source = inputs[0]
            a = source.detach()

            def grad_hook(d: torch.Tensor) -> None:
                if kind == "embedding":
                    sq = S.per_example_sq_norms_embedding(a, d.detach())
                else:
                    sq = S.per_example_sq_norms_linear(a, d.detach(),
                                                       a_gram=self._input_gram(source, a, d))
                total = S.finite_sum(sq)
                self._pe_sq[k] = total if self._pe_sq[k] is None else self._pe_sq[k] + total
                self._pe_count[k] += int(sq.shape[0])

            output.register_hook(grad_hook)

        return forward_hook

    def _input_gram(self, source: torch.Tensor, a: torch.Tensor,
                    d: torch.Tensor) -> torch.Tensor | None:
        """The token Gram matrices of a layer input (``S.token_grams``), shared by the layers
        that read the same tensor (query/key/value, gate/up): computed by the first of them
        whose own cheaper method is Gram, kept for the next ones. The last two inputs are
        kept (siblings' gradients arrive close together in backward); none above the
        per-example kernels' chunk budget."""
        for src, gram in self._grams:
            if src is source:
                return gram
        B, fin, fout = a.shape[0], a.shape[-1], d.shape[-1]
        T = a.numel() // max(B * fin, 1)
        if B * T * T > S.DEFAULT_CHUNK_ELEMS or S.choose_per_example_method(T, fin, fout) != "gram":
            return None
        gram = S.token_grams(a)
        self._grams = [*self._grams[-1:], (source, gram)]
        return gram

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer, args: tuple,
                           kwargs: dict) -> None:
        self._finalize(skipped=False)

    # ------------------------------------------------------------------ the step (on device)

    def _finalize(self, skipped: bool) -> None:
        grads = [i.param.grad for i in self.layers]
        present = [g is not None for g in grads]
        if not any(present):
            self._reset_step_accumulators()
            self.step_count += 1
            return
        ref = next(g for g in grads if g is not None)
        if self._device is None:
            self._device = D.local_tensor(ref).device
            self._dtype = S.accumulation_dtype(ref.dtype)
        self.step_count += 1
        step = self.step_count
        logging = step % self.config.log_every == 0
        micro = max(self._micro_seen)
        g_list = [g.detach() if g is not None else self._const("zero") for g in grads]
        # FSDP2: local shards (partial sums below) and how each relates to the global gradient
        g_list, shards = D.localize(g_list, [i.layout for i in self.layers], self._world)

        summary = S.grad_summaries(g_list)  # (L, 4): finite sq norm, max |g|, non-finite count, numel
        sq, max_abs, nonfinite = summary[:, 0], summary[:, 1], summary[:, 2]
        if shards is not None:  # what this rank adds to the sums (see gradlens.core.distributed)
            mask = self._contrib_mask(shards)
            sq = torch.where(mask, sq, 0.0)
            nonfinite = torch.where(mask, nonfinite, 0.0)
        self._deferred.append(_StepRecord(step, skipped, present, micro, logging, sq, max_abs,
                                          nonfinite, self._loss, shards is not None))
        if self.config.temporal and shards is None:
            self._update_temporal(g_list, present)
        elif self.config.temporal and not self._temporal_off:
            self._temporal_off = True
            warnings.warn(
                "gradlens: temporal variance is off for sharded (FSDP2) gradients: its G/r "
                "buffers would need the per-unit RMS reduced across shards at every step (one "
                "collective per step), against the lens's one collective per flush",
                RuntimeWarning, stacklevel=2)
        if logging or self._world == 1:
            self._complete(g_list if logging else None, shards)
        self._reset_step_accumulators()
        if logging:
            self.flush()

    def _complete(self, g_list: list[torch.Tensor] | None = None,
                  shards: list[D.Sharding] | None = None) -> None:
        """Statistics and detectors of the deferred steps, in step order, after ONE reduction
        of everything rank-local (none with a single process). ``g_list``: the gradients of the
        last deferred step when it is a logged one."""
        records, self._deferred = self._deferred, []
        if not records:
            return
        world = self._world
        pack = D.Pack(world, D.rank())
        for j, rec in enumerate(records):
            if rec.sharded:
                pack.sum(f"sq{j}", rec.sq)
                pack.sum(f"nonfinite{j}", rec.nonfinite)
            if rec.loss is not None and world > 1:
                pack.sum(f"loss{j}", rec.loss)
        if g_list is not None:
            self._pack_logged(pack, g_list, shards, records[-1])
        red = pack.reduce()  # the one collective under torch.distributed
        for j, rec in enumerate(records):
            sq = red.get(f"sq{j}", rec.sq)
            nonfinite = red.get(f"nonfinite{j}", rec.nonfinite)
            loss = red[f"loss{j}"] / world if f"loss{j}" in red and world > 1 else rec.loss
            if not all(rec.present):  # absent layers: NaN, so no detector or average sees them
                sq = torch.where(self._present_mask(rec.present), sq, self._const("nan_vec"))
            norms = sq.sqrt()
            global_norm = torch.nansum(sq).sqrt().reshape(1)
            all_norms = torch.cat([norms, global_norm])
            z, flags, ratio = self._update_detectors("grad", all_norms)
            per_step: dict[str, torch.Tensor] = {
                "grad_norm": all_norms,
                "nonfinite_count": torch.cat([nonfinite, nonfinite.sum().reshape(1)]),
                "grad_norm_z": z,
                "flags": flags.float(),
            }
            if loss is not None:
                loss_z, loss_flag, _ = self._update_detectors("loss", loss.reshape(1))
                per_step["loss"] = loss.reshape(1)
                per_step["loss_z"] = loss_z
                per_step["loss_flag"] = loss_flag.float()
            if g_list is not None and j == len(records) - 1:
                max_abs = red.get("max_abs", rec.max_abs)
                per_step.update(self._logged_stats(g_list, rec.present, sq, norms, max_abs,
                                                   ratio, red, shards))
            self._pending.append((rec.step, "skipped" if rec.skipped else "step",
                                  (per_step, rec.present, rec.micro, rec.logging)))
            if rec.skipped:
                self._pending.append((rec.step, "event", SpikeEvent(rec.step, GLOBAL,
                                                                    "skipped_step", 1.0, 1.0)))

    def _pack_logged(self, pack: D.Pack, g_list: list[torch.Tensor],
                     shards: list[D.Sharding] | None, rec: _StepRecord) -> None:
        """Add a logged step's rank-local inputs to ``pack``: with FSDP2 shards, the max-abs
        values, per-unit and per-fan vectors and SPAM counts of the sharded layers; under any
        torch.distributed run, the micro-batch and per-example sums (each rank's own data)."""
        cfg = self.config
        world = self._world
        if shards is not None:
            pack.max("max_abs", rec.max_abs)
            for k, info in enumerate(self.layers):
                s = shards[k]
                if not (self._matrix[k] and rec.present[k] and s.sharded):
                    continue
                if cfg.columns or cfg.histograms or cfg.microbatch:
                    pack.sum(f"unit{k}", D.place(S.unit_sq_norms(g_list[k], info.layout),
                                                 s.units, s.contributes))
                if cfg.columns:
                    pack.sum(f"fan{k}", D.place(S.fan_sq_norms(g_list[k], info.layout),
                                                s.fan, s.contributes))
                    pack.sum(f"fan_count{k}", D.place(D.fan_finite_counts(g_list[k],
                                                                          info.layout),
                                                      s.fan, s.contributes))
            spam = self._spam_counts(g_list, rec.present, shards) if cfg.spam else None
            if spam is not None:
                pack.sum("spam_hits", spam[0])
                pack.sum("spam_ok", spam[1])
        if world == 1:
            return
        if cfg.microbatch:
            zero = self._const("zero")
            pack.sum("mb_sq", torch.stack([v if v is not None else zero for v in self._mb_sq]))
            pack.sum("mb_ranks", self._const_flags(tuple(v is not None for v in self._mb_sq)))
            for k, info in enumerate(self.layers):
                if self._matrix[k]:
                    v = self._mb_unit[k]
                    if v is None:
                        v = torch.zeros(D.unit_count(info.param.shape, info.layout),
                                        device=self._device, dtype=self._dtype)
                    pack.sum(f"mb_unit{k}", v)
        if cfg.per_example:
            pack.sum("pe_sq", torch.stack([self._pe_scaled(k) for k in range(len(self.layers))]))

    def _pe_scaled(self, k: int) -> torch.Tensor:
        """This rank's per-example squared norms of layer k, summed and rescaled to per-example
        loss gradients (``alpha**2``, see :meth:`_per_example_stats`); 0 when none."""
        n, v = self._pe_count[k], self._pe_sq[k]
        if v is None or n == 0:
            return self._const("zero")
        alpha = self._pe_alpha(n)
        return v * alpha * alpha

    def _pe_alpha(self, n: int) -> float:
        micro = max(max(self._micro_seen), 1)
        return float(micro * (n // micro)) if self.config.loss_reduction == "mean" else 1.0

    def _contrib_mask(self, shards: list[D.Sharding]) -> torch.Tensor:
        flags = tuple(s.contributes for s in shards)
        key = "contrib:" + "".join("1" if f else "0" for f in flags)
        if key not in self._consts:
            self._consts[key] = self._const_flags(flags).bool()
        return self._consts[key]

    def _const_flags(self, flags: tuple[bool, ...]) -> torch.Tensor:
        """A device vector of 0/1 (accumulation dtype), made once per pattern."""
        key = "flags:" + "".join("1" if f else "0" for f in flags)
        if key not in self._consts:
            self._consts[key] = torch.tensor(flags, device=self._device, dtype=self._dtype)
        return self._consts[key]

    def _const(self, key: str) -> torch.Tensor:
        """Device constants, made once (creating them from Python data each step would be a
        host-to-device copy in the hot path)."""
        t = self._consts.get(key)
        if t is None:
            L, kw = len(self.layers), {"device": self._device, "dtype": self._dtype}
            t = {
                "zero": lambda: torch.zeros((), **kw),
                "nan": lambda: torch.full((), math.nan, **kw),
                "nan_vec": lambda: torch.full((L,), math.nan, **kw),
                "numel": lambda: torch.tensor(self._numel, **kw),
            }[key]()
            self._consts[key] = t
        return t

    def _present_mask(self, present: list[bool]) -> torch.Tensor:
        key = "mask:" + "".join("1" if p else "0" for p in present)
        if key not in self._consts:
            self._consts[key] = torch.tensor(present, device=self._device)
        return self._consts[key]

    def _update_detectors(self, key: str, x: torch.Tensor):
        """z-score (on log values for norms) and ratio to the running maximum, on device."""
        st = self._state
        if f"{key}_mean" not in st:
            st[f"{key}_mean"], st[f"{key}_var"], st[f"{key}_count"] = S.zscore_init(x)
            st[f"{key}_max"] = S.max_ratio_init(x)
        tracked = torch.log(x.clamp_min(1e-30)) if key == "grad" else x
        z, flags, st[f"{key}_mean"], st[f"{key}_var"], st[f"{key}_count"] = S.zscore_update(
            tracked, st[f"{key}_mean"], st[f"{key}_var"], st[f"{key}_count"],
            self.config.spikes,
        )
        ratio, st[f"{key}_max"] = S.max_ratio_update(x, st[f"{key}_max"])
        return z, flags, ratio

    def _logged_stats(self, g_list, present, sq, norms, max_abs, ratio,
                      red: Mapping[str, torch.Tensor] | None = None,
                      shards: list[D.Sharding] | None = None) -> dict[str, torch.Tensor]:
        """Statistics of a logged step. ``red``: the reduced rank-local inputs
        (:meth:`_pack_logged`); under FSDP2 ``g_list`` holds local shards, and every quantity
        of a sharded layer comes from ``red``, never from its shard."""
        red = red or {}
        cfg = self.config
        L = len(self.layers)
        numel = self._const("numel")
        nan = self._const("nan_vec")
        out: dict[str, torch.Tensor] = {
            "grad_rms": norms / numel.sqrt(),
            "grad_max_abs": max_abs,
            "grad_norm_ratio_max": ratio[:L],
        }
        unit_sq_big: list[torch.Tensor | None] = [None] * L
        self._fan_sq: dict[int, torch.Tensor] = {}
        if cfg.columns or cfg.histograms or cfg.microbatch:
            for k, info in enumerate(self.layers):
                if not (self._matrix[k] and present[k]):
                    continue
                if f"unit{k}" in red:
                    unit_sq_big[k] = red[f"unit{k}"]
                elif cfg.columns:  # both axes from one squared copy
                    unit_sq_big[k], self._fan_sq[k] = S.unit_fan_sq_norms(g_list[k],
                                                                         info.layout)
                else:
                    unit_sq_big[k] = S.unit_sq_norms(g_list[k], info.layout)
        if cfg.columns:
            matrices = [k for k in range(L) if unit_sq_big[k] is not None]
            if matrices:
                unit_r = [self._unit_rms(k, g_list, unit_sq_big) for k in matrices]
                fan_r = [self._fan_rms(k, g_list, red) for k in matrices]
                spreads = S.spread_batched(unit_r + fan_r)  # (2M, 4)
                index = self._const_index(tuple(matrices))
                for j, s in enumerate(S.SPREAD_FIELDS):
                    for axis, rows in (("unit", spreads[: len(matrices), j]),
                                       ("fan", spreads[len(matrices):, j])):
                        out[f"{axis}_rms_{s}"] = nan.index_copy(0, index, rows)
        if cfg.microbatch:
            out.update(self._microbatch_stats(sq, unit_sq_big, present, numel, red))
        if cfg.per_example:
            out.update(self._per_example_stats(sq, present, numel, red))
        if cfg.temporal and shards is None:
            out.update(self._temporal_stats(numel))
        if cfg.histograms:
            self._histograms(unit_sq_big, g_list)
        if "spam_hits" in red:
            spam = red["spam_hits"] / red["spam_ok"]
        else:
            spam = self._spam_fraction(g_list, present) \
                if shards is None and cfg.spam else None
        if spam is not None:
            out["spam_fraction"] = spam
        return out

    def _scale_factors(self, micro: int, batch: int) -> tuple[float, float]:
        """(small-batch factor on h_k, big-batch factor on p.grad), see the module docstring."""
        if self.config.loss_reduction == "mean":
            return float(micro), 1.0
        return 1.0 / batch, 1.0 / (batch * micro)

    def _amp_unscale(self) -> torch.Tensor | None:
        scale = getattr(self.scaler, "_scale", None) if self.scaler is not None else None
        return None if scale is None else scale.detach().float().reshape(())

    def _microbatch_stats(self, sq, unit_sq_big, present, numel,
                          red: Mapping[str, torch.Tensor] | None = None
                          ) -> dict[str, torch.Tensor]:
        red = red or {}
        micro = max(self._micro_seen) if self._micro_seen else 0
        ranks = self._world
        if micro * ranks < 2 or all(v is None for v in self._mb_sq):
            return {}
        batch = self._batch_size or 1
        a, b = self._scale_factors(micro, batch)
        dev = self._device
        L = len(self.layers)
        nan = self._const("nan")
        has = None
        if "mb_sq" in red:  # torch.distributed: the mean over ranks of each rank's sum
            has = red["mb_ranks"] > 0  # a rank without the layer adds a zero gradient
            mb = torch.where(has, red["mb_sq"] / ranks, nan)
        else:
            mb = torch.stack([v if v is not None else nan for v in self._mb_sq])
        inv_scale = self._amp_unscale()
        if inv_scale is not None:
            mb = mb / inv_scale**2
        small_sq = mb * a * a / micro  # mean over micro-batches of |G_s|^2
        big_sq = sq * b * b
        b_small, b_big = float(batch), float(batch * micro * ranks)
        signal, trace = S.two_batch_estimates(small_sq, big_sq, b_small, b_big)
        st = self._state
        if "nt_trace" not in st:
            st["nt_trace"] = torch.zeros(L, device=dev, dtype=self._dtype)
            st["nt_signal"] = torch.zeros(L, device=dev, dtype=self._dtype)
            st["nt_count"] = torch.zeros((), device=dev, dtype=self._dtype)
        noise_scale, st["nt_trace"], st["nt_signal"], st["nt_count"] = S.ema_ratio_update(
            trace, signal, st["nt_trace"], st["nt_signal"], st["nt_count"], self.config.noise_ema
        )
        out = {
            "twobatch_trace": trace,
            "twobatch_signal": signal,
            "noise_scale": noise_scale,
            "var_per_element": trace / numel,
        }
        med, mean = [], []
        for k in range(L):
            unit_small = self._mb_unit[k]
            if f"mb_unit{k}" in red and has is not None:
                unit_small = torch.where(has[k], red[f"mb_unit{k}"] / ranks, nan)
            if unit_small is None or unit_sq_big[k] is None:
                med.append(nan)
                mean.append(nan)
                continue
            if inv_scale is not None:
                unit_small = unit_small / inv_scale**2
            m, mu = S.unit_noise_to_signal(unit_small * a * a / micro, unit_sq_big[k] * b * b,
                                           b_small, b_big)
            med.append(m)
            mean.append(mu)
        out["unit_nsr_median"] = torch.stack(med)
        out["unit_nsr_mean"] = torch.stack(mean)
        return out

    def _per_example_stats(self, sq, present, numel,
                           red: Mapping[str, torch.Tensor] | None = None
                           ) -> dict[str, torch.Tensor]:
        """Within-batch trace over the step's examples; under torch.distributed the examples
        of every rank (``red["pe_sq"]``: the ranks' rescaled sums; equal counts assumed)."""
        red = red or {}
        if not any(c > 0 for c in self._pe_count):
            return {}
        nan = self._const("nan")
        micro = max(max(self._micro_seen), 1)
        trace, signal = [], []
        for k in range(len(self.layers)):
            n = self._pe_count[k]
            if n * self._world < 2 or self._pe_sq[k] is None or not present[k]:
                trace.append(nan)
                signal.append(nan)
                continue
            batch = n // micro
            alpha, beta = (float(micro * batch), 1.0) if self.config.loss_reduction == "mean" \
                else (1.0, 1.0 / (micro * batch))
            mean_sq = self._pe_sq[k] * alpha * alpha / n
            if "pe_sq" in red:
                mean_sq = red["pe_sq"][k] / (n * self._world)
            big = sq[k] * beta * beta
            t = S.within_batch_trace(mean_sq, big, n * self._world)
            trace.append(t)
            signal.append(big - t / (n * self._world))
        trace_t = torch.stack(trace)
        signal_t = torch.stack(signal)
        return {
            "pe_trace": trace_t,
            "pe_noise_scale": trace_t / signal_t,
            "pe_var_per_element": trace_t / numel,
        }

    def _temporal_budget(self) -> int:
        cfg = self.config
        if cfg.temporal_budget_bytes is not None:
            return cfg.temporal_budget_bytes
        return sum(self._temporal_cost(k) for k in range(len(self.layers)) if self._matrix[k])

    def _temporal_cost(self, k: int) -> int:
        """Bytes of layer k's exact temporal buffers: EMAs of g and of G/r, float32."""
        return 2 * self.layers[k].numel * 4

    def _update_temporal(self, g_list, present) -> None:
        """EMA of g (exact buffer, or a count sketch past the budget) and of SCALE's normalized
        G/r, updated every step; priority to output, embedding, then hidden layers."""
        if not self._temporal:
            budget = self._temporal_budget()
            order = sorted(
                (k for k in range(len(self.layers)) if self._matrix[k]),
                key=lambda k: {Role.OUTPUT: 0, Role.EMBEDDING: 1}.get(self.layers[k].role, 2),
            )
            for k in order:
                info = self.layers[k]
                cost = self._temporal_cost(k)
                exact = cost <= budget
                if exact:
                    budget -= cost
                self._temporal[k] = S.temporal_init(
                    info.param, sketch_dim=None if exact else self.config.sketch_dim, seed=k
                )
        for k, st in self._temporal.items():
            if present[k]:
                S.temporal_update_(st, g_list[k], self.layers[k].layout,
                                   self.config.temporal_beta)

    def _temporal_stats(self, numel) -> dict[str, torch.Tensor]:
        nan = self._const("nan")
        var, ns, normed = [], [], []
        for k in range(len(self.layers)):
            st = self._temporal.get(k)
            if st is None or int(st["count"]) == 0:  # python int counter, no sync
                var.append(nan)
                ns.append(nan)
                normed.append(nan)
                continue
            v, mean_sq, v_norm = S.temporal_readout(st)
            var.append(v)
            ns.append(torch.where(mean_sq > 0, v / mean_sq, nan))  # no signal: no ratio
            normed.append(v_norm / self._numel[k])
        var_t = torch.stack(var)
        return {
            "temporal_var": var_t,
            "temporal_var_per_element": var_t / numel,
            "temporal_noise_scale": torch.stack(ns),
            "temporal_var_normalized": torch.stack(normed),
        }

    def _unit_rms(self, k: int, g_list, unit_sq_big) -> torch.Tensor:
        """Per-unit RMS from the per-unit squared norms already computed this step (the fan
        size comes from the parameter's global shape: ``g_list[k]`` may be a shard)."""
        fan = self._numel[k] // unit_sq_big[k].numel()
        return (unit_sq_big[k] / fan).sqrt()

    def _fan_rms(self, k: int, g_list, red: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-fan RMS; a sharded layer's from its reduced sums and counts (``sqrt(sum /
        count)`` over finite entries); in one process from this step's squared copy."""
        if f"fan{k}" in red:
            return (red[f"fan{k}"] / red[f"fan_count{k}"]).sqrt()
        if k in self._fan_sq:  # non-finite entries count as zeros (the layer's count says so)
            fan = self._fan_sq[k]
            return (fan / (self._numel[k] // fan.numel())).sqrt()
        return S.fan_rms(g_list[k], self.layers[k].layout)

    def _const_index(self, ks: tuple[int, ...]) -> torch.Tensor:
        key = "index:" + ",".join(map(str, ks))
        if key not in self._consts:
            self._consts[key] = torch.tensor(ks, device=self._device, dtype=torch.long)
        return self._consts[key]

    def _histograms(self, unit_sq_big, g_list) -> None:
        ks = [k for k in range(len(self.layers)) if unit_sq_big[k] is not None]
        if not ks:
            return
        rs = [self._unit_rms(k, g_list, unit_sq_big) for k in ks]
        hists = S.log_histograms(rs, bins=self.config.histogram_bins)
        moments = S.histograms_moments(rs)
        for j, k in enumerate(ks):
            edges, counts = hists[j]
            self._pending.append((self.step_count, "hist",
                                  (self.layers[k].name, edges, counts, moments[j])))

    def _spam_fraction(self, g_list, present) -> torch.Tensor | None:
        if self.optimizer is None:
            return None
        state = self.optimizer.state
        dev = self._device
        values = []
        found = False
        for k, info in enumerate(self.layers):
            v = state.get(info.param, {}).get("exp_avg_sq") if present[k] else None
            if v is None or not torch.is_tensor(v) or v.shape != g_list[k].shape:
                values.append(torch.full((), math.nan, device=dev))
                continue
            found = True
            values.append(S.spam_fraction(g_list[k], v, self.config.spikes.spam_theta))
        return torch.stack(values) if found else None

    def _spam_counts(self, g_list, present,
                     shards: list[D.Sharding]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """FSDP2: this rank's ``(hits, ok)`` counts of :meth:`_spam_fraction` per layer (local
        shards of the gradient and of ``exp_avg_sq``), to be summed over ranks."""
        if self.optimizer is None:
            return None
        state = self.optimizer.state
        zero = self._const("zero")
        hits, oks = [], []
        found = False
        for k, info in enumerate(self.layers):
            v = state.get(info.param, {}).get("exp_avg_sq") if present[k] else None
            v = D.local_tensor(v) if torch.is_tensor(v) else None
            if v is None or v.shape != g_list[k].shape or not shards[k].contributes:
                hits.append(zero)
                oks.append(zero)
                found = found or v is not None
                continue
            found = True
            h, ok = D.spam_counts(g_list[k], v, self.config.spikes.spam_theta)
            hits.append(h.to(self._dtype))
            oks.append(ok.to(self._dtype))
        return (torch.stack(hits), torch.stack(oks)) if found else None

    # ------------------------------------------------------------------ flush (host side)

    def flush(self) -> None:
        """Move pending statistics to the host in ONE transfer and hand them to the sinks.

        Under torch.distributed this first completes the steps since the last logged one
        (ONE all-reduce): call it on every rank. Ranks other than 0 transfer nothing.
        """
        if self._deferred:
            self._complete()
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        if not self.sinks:
            return  # a rank that writes nothing needs no transfer
        tensors: list[torch.Tensor] = []
        for _, kind, payload in pending:
            if kind in ("step", "skipped"):
                tensors.extend(payload[0].values())
            elif kind == "hist":
                tensors.extend(payload[1:])
        flat = torch.cat([t.detach().float().reshape(-1) for t in tensors]) if tensors else None
        host = flat.cpu().tolist() if flat is not None else []  # the one intentional sync
        if not self.sinks:
            return
        rows, events, hists = self._to_records(pending, host)
        for sink in self.sinks:
            if rows:
                sink.write_stats(rows)
            if hists:
                sink.write_histograms(hists)
            if events:
                sink.write_events(events)
            sink.flush()

    def _to_records(self, pending, host: list[float]):
        names = [i.name for i in self.layers]
        roles = [i.role.value for i in self.layers]
        L = len(names)
        pos = 0
        rows: list[tuple[int, str, str, str, float]] = []
        events: list[SpikeEvent] = []
        hists: list[Histogram] = []
        for step, kind, payload in pending:
            if kind == "event":
                events.append(payload)
                continue
            if kind == "row":
                rows.append((step, *payload))
                continue
            if kind == "hist":
                layer, edges, counts, moments = payload
                ne, nc, nm = edges.numel(), counts.numel(), moments.numel()
                hists.append(Histogram(step, layer, "unit_rms_hist", host[pos:pos + ne],
                                       host[pos + ne:pos + ne + nc],
                                       host[pos + ne + nc:pos + ne + nc + nm]))
                pos += ne + nc + nm
                continue
            per_step, present, micro, logging = payload
            values: dict[str, list[float]] = {}
            for key, t in per_step.items():
                n = t.numel()
                values[key] = host[pos:pos + n]
                pos += n
            events.extend(self._events(step, values, present))
            if not logging:
                continue
            for key, vals in values.items():
                if key in ("flags", "loss_flag"):
                    continue
                if key in ("loss", "loss_z"):
                    rows.append((step, GLOBAL, GLOBAL, key, vals[0]))
                    continue
                for k in range(L):
                    if present[k]:
                        rows.append((step, names[k], roles[k], key, vals[k]))
                if len(vals) == L + 1:
                    rows.append((step, GLOBAL, GLOBAL, key, vals[L]))
            if micro:  # counted by the micro-batch hooks (not installed by "minimal")
                rows.append((step, GLOBAL, GLOBAL, "microbatches", float(micro)))
            if kind == "skipped":
                rows.append((step, GLOBAL, GLOBAL, "skipped_step", 1.0))
        return rows, events, hists

    def _events(self, step: int, values: dict[str, list[float]], present) -> list[SpikeEvent]:
        names = [i.name for i in self.layers]
        L = len(names)
        out: list[SpikeEvent] = []
        flags, z, norm = values["flags"], values["grad_norm_z"], values["grad_norm"]
        for k in range(L):
            if present[k] and flags[k] > 0:
                out.append(SpikeEvent(step, names[k], "grad_norm", norm[k], z[k]))
        if flags[L] > 0:
            ranked = sorted((k for k in range(L) if present[k] and math.isfinite(z[k])),
                            key=lambda k: z[k], reverse=True)
            top = tuple(names[k] for k in ranked[: self.config.spikes.top_k])
            out.append(SpikeEvent(step, GLOBAL, "grad_norm_global", norm[L], z[L], top))
        nonfinite = values["nonfinite_count"]
        for k in range(L):
            if present[k] and nonfinite[k] > 0:
                out.append(SpikeEvent(step, names[k], "nonfinite", nonfinite[k], nonfinite[k]))
        if values.get("loss_flag", [0.0])[0] > 0:
            out.append(SpikeEvent(step, GLOBAL, "loss", values["loss"][0], values["loss_z"][0]))
        return out


@dataclass
class _StepRecord:
    """One finalized step, kept on device until its statistics are completed: at once with a
    single process, after the next reduction under torch.distributed. ``sq``, ``max_abs``
    and ``nonfinite`` are this rank's contributions when ``sharded`` (FSDP2 partial sums),
    else the global values; ``loss`` is rank-local."""

    step: int
    skipped: bool
    present: list[bool]
    micro: int
    logging: bool
    sq: torch.Tensor
    max_abs: torch.Tensor
    nonfinite: torch.Tensor
    loss: torch.Tensor | None
    sharded: bool
