"""The collector: hooks on a model, statistic families on device, one transfer per flush.

Event flow of one optimizer step::

    forward            pre-hooks read the batch size; [full] forward hooks keep layer inputs
    loss.backward()    one hook on the model's output arms the end of the pass (per-parameter
                       hooks until verified: core.backward_arm); on logged steps parameter
                       hooks count micro-batches and hand their gradients to the families
                       that need them; at its end (after DDP's all-reduce / FSDP2's
                       reduce-scatter) each p.grad's version is noted
                       and, while the loop edits, the raw norms measured (one reduction)
    optimizer.step()   step pre-hook (of the first of several optimizers to step; of the
                       inner optimizer of a wrapper, :mod:`gradlens.core.optimizers`): the
                       step context is filled, every family observes (norms and detectors
                       every step; the rest on logged steps), on device
    every log_every    ONE device->host transfer (and one all-reduce under torch.distributed),
                       rows and events to the sinks

Which gradient: ``grad_norm``, spreads, temporal and SPAM statistics describe the gradient
the optimizer consumes (after clipping and unscaling); ``grad_norm_preclip`` (every step,
every preset), the spike detectors, the guard and the variance estimators describe the raw
gradient (after the data-parallel reduction, before clipping, unscaled by the GradScaler
given as ``scaler``), measured at the end of the backward pass whenever the loop edits the
gradient (:mod:`gradlens.families.raw`). One common factor (norm clipping, unscaling) is
exact; any other edit makes the estimators NaN with a ``validity`` event, in one process and
under torch.distributed. The families and their conditions: :mod:`gradlens.families`.

Scaling conventions (``loss_reduction``): ``mean`` (each micro-batch's mean loss / K),
``global_mean`` (HF's ``num_items_in_batch``), ``sum``; unequal micro-batches are exact.

Data parallelism (DDP, FSDP2; :mod:`gradlens.core.distributed`): create the lens after
wrapping the model, on every rank. Everything rank-local is reduced with ONE all-reduce per
flush (the detectors of the steps in between run after it), so ``flush()`` and ``close()``
are collective; only rank 0 writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradlens import stats as S
from gradlens.actuators.guard import SpikeGuard
from gradlens.core import distributed as D
from gradlens.core import optimizers as O
from gradlens.core import run as R
from gradlens.core import settings
from gradlens.core.arguments import check_lens_arguments
from gradlens.core.config import LensConfig
from gradlens.core.constants import DeviceConstants
from gradlens.core.emit import complete_steps
from gradlens.core.intermediates import step_summaries
from gradlens.core.observer import Observer
from gradlens.core.records import device_tensors, to_records
from gradlens.core.selection import select_layers
from gradlens.core.writer import BackgroundWriter
from gradlens.families import Statistic, StepContext, builtin_families, register_statistic
from gradlens.roles import LayerInfo, Role, discover_layers
from gradlens.schema import GLOBAL
from gradlens.sink_api import Sink
from gradlens.stats.summary_plan import SummaryPlans

__all__ = ["GradLens"]

_UNMEASURED = ("the gradient was edited between backward and step (first seen at this "
               "step) and its value before the edit was not measured; it is from the next "
               "step on")


class GradLens(DeviceConstants):
    """Per-layer gradient statistics of a training run.

    Args:
        model: any ``nn.Module`` (HF causal LMs get their roles from their embeddings).
        optimizer: the optimizer whose ``step()`` consumes the gradients, or a list of them
            (Muon + AdamW): the lens finalizes each step in a step pre-hook, before any of
            them steps; wrappers such as accelerate's are hooked on their inner optimizer
            (:mod:`gradlens.core.optimizers`). Without one, call :meth:`step` after each
            backward.
        logdir: run directory (TensorBoard events, the long table, spikes.jsonl, run.json).
            ``None`` keeps everything in memory (``lens.memory``).
        preset: ``minimal`` | ``standard`` | ``full`` (see :mod:`gradlens.core.config`); an
            option given explicitly wins over the preset's flags.
        log_every: record statistics every this many steps.
        include, exclude: fnmatch patterns on parameter names; roles: roles to track.
        overrides, output: role overrides, passed to :func:`gradlens.roles.discover_layers`.
        sinks: extra sinks (or instead of the default ones when ``logdir`` is None).
        table_format: ``parquet`` | ``csv`` | ``jsonl``; None (default): the table already
            in ``logdir`` keeps its format, a new one is parquet.
        tensorboard: write TensorBoard events too.
        scaler: a ``torch.amp.GradScaler``: statistics are unscaled with its scale, and a
            step it skips (inf/NaN) becomes a ``skipped_step`` event.
        statistics: user families (:class:`gradlens.Statistic` subclasses or instances).
        guard: a :class:`gradlens.SpikeGuard`: skip or damp the steps the spike detector
            flags, on device, before the optimizer steps (single process only).
        step_hook: finalize each step in the optimizer's step pre-hook (False: the caller
            calls :meth:`step`, as the framework callbacks do; the optimizer then serves for
            its state and run.json only).
        name: run name stored in run.json (default: the logdir's name).
        meta: extra JSON-able entries for run.json (framework, run config, ...).
        **options: any :class:`~gradlens.core.config.LensConfig` field.
    """

    @R.undo_on_error
    def __init__(
        self,
        model: nn.Module,
        optimizer: Any = None,
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
        table_format: str | None = None,
        tensorboard: bool = True,
        scaler: Any = None,
        statistics: Iterable[Statistic | type[Statistic]] = (),
        step_hook: bool = True,
        name: str | None = None,
        meta: Mapping[str, Any] | None = None,
        guard: SpikeGuard | None = None,
        **options: Any,
    ) -> None:
        check_lens_arguments(locals())
        self.config = LensConfig.from_preset(preset, log_every=log_every, **options)
        from torch._dynamo.eval_frame import OptimizedModule

        self.compiled = model if isinstance(model, OptimizedModule) else None
        self.model = model = D.unwrap_model(model)  # DDP, compile: the inner module
        self.world = D.world_size()
        optimizers = O.as_list(optimizer)
        self.optimizers = optimizers
        self.optimizer = (optimizers[0] if len(optimizers) == 1
                          else O.OptimizerSet(optimizers) if optimizers else None)
        self.scaler = scaler
        infos = discover_layers(model, overrides=overrides, output=output)
        self.layers: list[LayerInfo] = [i for i in select_layers(infos, include, exclude, roles)
                                        if i.numel > 0]  # a zero-element tensor has no stats
        self._index = {id(i.param): k for k, i in enumerate(self.layers)}
        self._params, self.numel = [i.param for i in self.layers], [i.numel for i in self.layers]
        self._layouts = [i.layout for i in self.layers]
        self.matrix = [layout != "vector" for layout in self._layouts]
        self._modules = dict(model.named_modules())
        self.logdir = Path(logdir) if logdir is not None else None
        self.sinks, self.memory = R.default_sinks(self.logdir, list(sinks or []), table_format,
                                                  tensorboard)
        self._writer = BackgroundWriter() if self.config.background_io else None
        self.step_count = 0
        self._closed = False
        self._stepped = False  # optimizer.step() ran since the scaler's last update()
        self._pending: list[tuple[int, str, Any]] = []
        self._deferred: list[StepContext] = []
        self._loss: torch.Tensor | None = None
        self._validity_seen: set[tuple[str, str]] = set()
        self._untracked: tuple[int, list] | None = (0, [])  # (walks, listed); None: warned
        self.device: torch.device | None = None
        self.dtype = self.grad_dtype = torch.float32  # accumulation: float64 for a float64 model
        self._consts: dict[str | tuple, torch.Tensor] = {}
        self.summary_plans = SummaryPlans()  # how the every-step summary is batched
        self.hooks = O.StepHooks(self, optimizers) if optimizers and step_hook else None
        self.families = builtin_families(self.config)
        for extra in statistics:
            cls = extra if isinstance(extra, type) else type(extra)
            register_statistic(cls)
            self.families.append(extra() if isinstance(extra, type) else extra)
        if guard is not None:  # last: every statistic describes the gradient before it acts
            self.families.append(guard)
        needs = set().union(*(f.needs for f in self.families))
        self.intermediates = frozenset().union(*(f.intermediates for f in self.families))
        self.consistency_families = [f.name for f in self.families
                                     if "consistent_grad" in f.needs]
        self.observer = Observer(self, needs)
        for f in self.families:
            f.bind(self)
        self.observer.install()
        for f in self.families:
            f.install(self)
        if self.hooks is not None:
            self.hooks.install()
        if scaler is not None:
            R.attach_scaler(scaler, self)
        R.open_sinks(self, name, meta)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> GradLens:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None and self.world > 1:
            self._deferred.clear()  # no collective while one rank unwinds: it could hang
        self.close(ended="interrupted" if exc_type is not None else "finished")

    def close(self, ended: str | None = None) -> None:
        """Flush what is pending, remove every hook, close the sinks. Idempotent. ``ended``
        (``finished`` | ``interrupted``) goes to run.json; None: ``interrupted`` when called
        while an exception unwinds, else ``finished``."""
        if self._closed:
            return
        self._closed = True
        self.observer.remove()
        if self.scaler is not None:
            R.detach_scaler(self.scaler, self)
        try:
            self.flush()
        finally:
            if self._writer is not None:
                self._writer.close()  # every queued flush written before the sinks close
            for sink in self.sinks:
                R.close_sink(sink, ended)

    def state_dict(self) -> dict[str, Any]:
        """Running statistics and detectors, to resume a run with identical detection."""
        return {"step_count": self.step_count,
                "families": {f.name: f.state_dict() for f in self.families}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        for f in self.families:
            f.load_state_dict(state.get("families", {}).get(f.name, {}))

    # ------------------------------------------------------------------ user calls

    @torch.compiler.disable  # eager inside a compiled step: no guard on the lens's state
    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """Hand over the loss you call ``backward()`` on (a tensor, no sync; or a number). The
        step's micro-batch losses are summed (with ``loss / K`` that is the step's mean) and
        reported as ``loss`` at layer ``global``, with a spike detector."""
        if isinstance(loss, bool) or not isinstance(loss, (torch.Tensor, int, float)):
            raise TypeError(f"observe_loss takes a tensor or a number, got {type(loss).__name__}")
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError("observe_loss takes the scalar loss (one element), got a "
                                 f"tensor of shape {tuple(loss.shape)}; reduce it first")
            value = loss.detach().float().reshape(())
        else:
            value = torch.tensor(float(loss), device=self.device or "cpu")
        self._loss = value if self._loss is None else self._loss + value

    def log_scalars(self, values: Mapping[str, float], step: int | None = None) -> None:
        """Record host-side scalars (Python numbers) as ``global`` rows with the next flush."""
        step = self.step_count if step is None else int(step)
        for stat, value in values.items():
            self._pending.append((step, "row", (GLOBAL, GLOBAL, stat, float(value))))

    def step(self) -> None:
        """Finalize the current step. Called by the optimizer's step pre-hook; call it yourself
        (after the backward passes, before zeroing the grads) when the lens has no optimizer."""
        if self._closed:
            raise RuntimeError("this GradLens is closed")
        self._finalize(skipped=False)

    # ------------------------------------------------------------------ helpers for families

    def family(self, name: str) -> Statistic:
        """The enabled family called ``name`` (a KeyError naming the enabled ones)."""
        for f in self.families:
            if f.name == name:
                return f
        raise KeyError(f"no family {name!r}; enabled: {[f.name for f in self.families]}")

    @property
    def step_count(self) -> int:  # optimizer steps finalized so far
        return self._step_count

    @step_count.setter
    def step_count(self, value: int) -> None:
        self._step_count = value
        self._logging_next = (value + 1) % self.config.log_every == 0
        if getattr(self, "observer", None) is not None:  # a resumed count: its hooks follow
            self.observer.sync_logged()

    def logging_step(self) -> bool:
        """Whether the step in progress is logged. A stored bool, not arithmetic on the step:
        a hook traced by torch.compile guards on what it reads (2 values, not one per step)."""
        return self._logging_next

    def step_open(self) -> bool:
        return self.observer.step_open() or self._loss is not None

    def module_of(self, k: int) -> nn.Module | None:
        return self._modules.get(self.layers[k].module_name)

    def add_histogram(self, step: int, layer: str, edges, counts, moments, stat: str) -> None:
        self._pending.append((step, "hist", (layer, edges, counts, moments, stat)))

    # ------------------------------------------------------------------ the step (on device)

    def _finalize(self, skipped: bool) -> None:
        grads = [p.grad for p in self._params]
        present = [g is not None for g in grads]
        self.step_count += 1
        if not any(present):
            self._reset()
            return
        ref = next(g for g in grads if g is not None)
        if self.device is None:
            self.device = D.local_tensor(ref).device
            self.dtype = S.accumulation_dtype(ref.dtype)
            self.grad_dtype = ref.dtype
        logging = self.step_count % self.config.log_every == 0
        obs = self.observer
        micro = max(obs.micro_seen)
        g_list = [self.const("zero") if g is None else g.detach() if g.requires_grad else g
                  for g in grads]
        g_list, shards = (D.localize(g_list, self._layouts, self.world)
                          if self.observer.sharded else (g_list, None))
        sq, max_abs, nonfinite, axis_sq = step_summaries(self, g_list, present, logging, shards)
        if shards is not None:  # this rank's share of the sums (core.distributed)
            contrib = self.mask([s.contributes for s in shards])
            sq = torch.where(contrib, sq, 0.0)
            nonfinite = torch.where(contrib, nonfinite, 0.0)
        sizes, size_note = obs.sizes(micro) if obs.track_sizes and logging else ([], None)
        edited, measured = obs.edits(grads)
        pre_sq = obs.pre_sq.to(self.dtype) if any(edited) and measured else None
        scale = getattr(self.scaler, "_scale", None) if self.scaler is not None else None
        ctx = StepContext(
            step=self.step_count, logging=logging, skipped=skipped, present=present,
            micro=micro, micro_seen=list(obs.micro_seen), sizes=sizes,
            loss_scale=None if scale is None else scale.detach().to(self.dtype).reshape(()),
            grads=g_list, shards=shards, sq=sq, max_abs=max_abs, nonfinite=nonfinite,
            world=self.world, edited=edited, pre_sq=pre_sq, loss=self._loss,
            step_unscaled=R.scaler_unscaled(self.scaler, self.optimizer))
        host_invalid: dict[str, dict[int, str]] = {}
        if size_note:
            host_invalid["batch_size"] = {-1: size_note}
        if logging and any(edited) and not measured:
            for fam in self.consistency_families:
                host_invalid[fam] = {k: _UNMEASURED for k, e in enumerate(edited) if e}
        if logging:
            R.warn_untracked(self)
            settings.log_learning_rates(self)
        if self.hooks is not None:  # layers it cannot see: NaN rows and global rows
            for k, why in self.hooks.blind(present, obs.micro_seen).items():
                for f in self.families:
                    host_invalid.setdefault(f.name, {}).setdefault(k, why)
        ctx.data["host_invalid"] = host_invalid
        ctx.data["axis_sq"] = axis_sq
        for f in self.families:
            f.observe(ctx)
        if not logging:
            ctx.grads = None
        self._deferred.append(ctx)
        if logging or self.world == 1:
            self._complete()
        self._reset()
        if logging:
            self.flush()

    def _reset(self) -> None:
        self.observer.reset()
        self._loss = None
        for f in self.families:
            f.reset()

    def _complete(self) -> None:
        complete_steps(self)  # gradlens.core.emit: ONE reduction, then the families emit

    # ------------------------------------------------------------------ flush (host side)

    def flush(self, wait: bool = False) -> None:
        """Move pending statistics to the host in ONE transfer and hand them to the sinks.

        Under torch.distributed this first completes the steps since the last logged one
        (ONE all-reduce): call it on every rank. Ranks other than 0 transfer nothing. The file
        sinks write on the writer thread (``background_io``); ``wait=True`` returns once they
        have (as ``close()`` does).
        """
        if wait and self._writer is not None:
            try:
                self.flush()
            finally:
                self._writer.drain()
            return
        if self._deferred:
            self._complete()
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        if not self.sinks:
            return  # a rank that writes nothing needs no transfer
        tensors = device_tensors(pending)
        # in the accumulation dtype: a float64 model's statistics reach the host unrounded
        flat = (torch.cat([t.detach().to(self.dtype).reshape(-1) for t in tensors])
                if tensors else None)
        host = flat.cpu().numpy() if flat is not None else []  # the one intentional sync
        rows, events, hists = to_records(self, pending, host)
        for sink in self.sinks:
            if sink.background and self._writer is not None:
                self._writer.submit(sink, rows, hists, events)
            else:
                R.write_sink(sink, rows, hists, events)
