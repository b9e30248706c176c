"""The statistic API: what a family of statistics declares, and the step context it reads.

A :class:`Statistic` is one family (norms, two-batch variance, ...). The collector
(:class:`gradlens.GradLens`) installs the hooks the enabled families need, fills a
:class:`StepContext` per optimizer step from cheap observations, and calls each family in
order:

    observe(ctx)            at the step pre-hook, on device (every step for ``every_step``
                            families and for state that advances every step; else logged steps)
    partials(ctx)           rank-local values by name, each a partial the family's catalog
                            declaration lists (:class:`gradlens.catalog.Partial`: how it reduces
                            across ranks, its shape); the collector packs them all into the
                            ONE collective of a flush
    emit(ctx, red, out)     after the reduction, ``red[name]`` the family's reduced partials
                            (in one process: the values as returned): ``out[stat] = (L,)`` or
                            ``(L+1,)`` tensors (the last entry the ``global`` row); read earlier
                            families' output
    invalid(ctx)            host-side validity: ``{layer index: reason}`` (``-1``: all layers)

A family whose condition fails for a layer writes NaN for every statistic it emits there; the
collector records the reason once per (family, reason) as a ``validity`` event and a warning.
A number computed under a broken assumption is never written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from gradlens import catalog
from gradlens.catalog import NEEDS, FamilySpec, Partial, StatSpec
from gradlens.dtensor import local_tensor

if TYPE_CHECKING:
    from gradlens.core import distributed as D
    from gradlens.core.lens import GradLens

__all__ = ["LayerStatistic", "Statistic", "StepContext", "register_statistic"]

@dataclass
class StepContext:
    """What the collector observed about one optimizer step (cheap: shapes and counts).

    Attributes:
        step: the lens step (equals the optimizer step).
        logging: whether statistics are recorded at this step.
        skipped: the GradScaler skipped the step (inf/NaN gradients).
        present: per layer, whether it has a gradient.
        micro: backward passes seen in the step (the largest count over layers).
        micro_seen: per layer, backward passes in which its parameter got a gradient.
        sizes: examples of each micro-batch, in order (from the tracked layers' inputs or
            the ``batch_size`` option); empty when nothing told.
        loss_scale: the GradScaler's scale (0-d tensor) when one was given, else None.
        grads: the gradients at the step (FSDP2: local shards); None once no family needs
            them (steps that are not logged, after ``observe``).
        shards: FSDP2 shard descriptions, else None.
        sq, max_abs, nonfinite: ``(L,)`` finite squared norms, largest finite ``|g_i|``
            and non-finite counts of ``grads`` (rank-local contributions when sharded).
        edited: per layer, whether ``p.grad`` changed between the last backward and the step
            (host-known from the tensor's version counter; FSDP2's DTensors: always True).
        pre_sq: squared norms at the end of the last backward and its data-parallel
            reduction (rank-local partial sums under FSDP2), where measured; else None.
        loss: the summed micro-batch losses (rank-local), or None.
        world: ranks in the run.
        data: per-family scratch space for this step (keyed by family name).
    """

    step: int
    logging: bool
    skipped: bool
    present: list[bool]
    micro: int
    micro_seen: list[int]
    sizes: list[int]
    loss_scale: torch.Tensor | None
    grads: list[torch.Tensor] | None
    shards: list[D.Sharding] | None
    sq: torch.Tensor
    max_abs: torch.Tensor
    nonfinite: torch.Tensor
    world: int = 1
    edited: list[bool] | None = None
    pre_sq: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    data: dict[str, Any] = field(default_factory=dict)
    sq_reduced: torch.Tensor | None = None  # set by the norms family (NaN where no norm)
    pre_sq_reduced: torch.Tensor | None = None  # set by the norms family: pre_sq, reduced
    step_ok: torch.Tensor | bool = True  # set by the norms family: no non-finite entry
    shared: Any = None  # core.intermediates.Intermediates of a logged step
    step_unscaled: bool = True  # with a GradScaler: p.grad at the step is unscaled

    @property
    def batch(self) -> int:
        """Examples in the step's micro-batches (per rank)."""
        return sum(self.sizes)

    @property
    def equal_sizes(self) -> bool:
        return len(set(self.sizes)) <= 1


class Statistic:
    """One family of per-layer statistics (subclass it; see the module docstring).

    A built-in family sets ``spec`` (its :class:`gradlens.catalog.FamilySpec`), which fills
    ``name``, ``emits``, ``needs``, ``intermediates`` and ``partial_specs``. A user family
    sets them itself: ``name`` (the family, used in validity events), ``emits`` (statistic
    names, registered on first use), ``needs`` (from :data:`gradlens.catalog.NEEDS`),
    ``intermediates`` (from :data:`gradlens.catalog.INTERMEDIATES`), ``docs`` (one line per
    emitted statistic, for the schema), ``heatmap`` (the report draws a layer x step heatmap
    of each), ``reduce`` (how its statistics cross ranks) and ``partial_specs`` (what
    :meth:`partials` returns; default: one ``layer`` partial ``value`` reduced by ``reduce``
    when that is ``sum``, ``mean`` or ``max``). Also ``every_step``: observe and emit at every
    step, not only logged ones.
    """

    spec: ClassVar[FamilySpec | None] = None
    name: ClassVar[str] = ""
    emits: ClassVar[tuple[str, ...]] = ()
    needs: ClassVar[frozenset[str]] = frozenset()
    intermediates: ClassVar[frozenset[str]] = frozenset()
    every_step: ClassVar[bool] = False
    docs: ClassVar[dict[str, str]] = {}
    heatmap: ClassVar[bool] = True
    reduce: ClassVar[str] = "derived"
    partial_specs: ClassVar[tuple[Partial, ...]] = ()

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        spec = cls.__dict__.get("spec")
        if spec is not None:
            cls.name, cls.emits = spec.name, spec.names + spec.histograms
            cls.needs, cls.intermediates = spec.needs, spec.intermediates
            cls.partial_specs = spec.partials

    def bind(self, lens: GradLens) -> None:
        """Called once with the collector: layers, config, device helpers."""
        self.lens = lens

    def install(self, lens: GradLens) -> None:
        """Install hooks (through the collector's observer); the handles are removed by close."""

    def reset(self) -> None:
        """Start a new step: drop per-step accumulators."""

    def observe(self, ctx: StepContext) -> None:
        """At the step pre-hook, on device (no sync)."""

    def partials(self, ctx: StepContext) -> dict[str, torch.Tensor | dict[int, torch.Tensor]]:
        """This rank's values for the flush's one collective, by declared partial name
        (``layer``: ``(L,)``; ``unit`` / ``fan``: ``{layer index: vector}``; ``scalar``: one
        value). Every rank must return the same names and shapes. On device, no sync."""
        return {}

    def emit(self, ctx: StepContext, red: Mapping[str, Any],
             out: dict[str, torch.Tensor]) -> None:
        """Write ``out[stat]``: ``(L,)`` per layer, or ``(L+1,)`` with the global value last;
        ``red``: the reduced partials by name."""

    def invalid(self, ctx: StepContext) -> dict[int, str]:
        """Layers (index; ``-1`` for all) whose statistics would be wrong here, with why."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


class LayerStatistic(Statistic):
    """A user statistic of one value per layer, from the gradient at the step.

    Override :meth:`compute` (``grad``: the gradient the optimizer consumes, ``param``: the
    parameter; return a 0-d tensor, on device, no ``.item()``). Under torch.distributed the
    per-layer values (the partial ``value``) are averaged over ranks (``reduce = "mean"``),
    summed (``"sum"``) or their maximum taken (``"max"``); under FSDP2 ``grad`` and ``param``
    are this rank's shards. Logged steps only.
    """

    reduce: ClassVar[str] = "mean"  # or "sum", "max"
    needs = frozenset({"step_grad"})

    def compute(self, grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def observe(self, ctx: StepContext) -> None:
        if not ctx.logging:
            return
        lens = self.lens
        nan = lens.const("nan")
        values = [
            self.compute(g, local_tensor(info.param)).to(lens.dtype).reshape(())
            if ctx.present[k] else nan
            for k, (info, g) in enumerate(zip(lens.layers, ctx.grads or [], strict=False))
        ]
        ctx.data[self.name] = torch.stack(values)

    def partials(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {"value": ctx.data[self.name]}

    def emit(self, ctx, red, out) -> None:
        out[self.emits[0]] = red["value"]


_REGISTERED: dict[str, type[Statistic]] = {}


def register_statistic(cls: type[Statistic]) -> type[Statistic]:
    """Register a family's statistics in the catalog (usable as a class decorator): a
    built-in's declaration is its ``spec``; a user family's is made from ``name``, ``emits``,
    ``docs``, ``reduce``, ``heatmap`` and ``partial_specs`` (category ``custom``, one value
    per layer; without ``partial_specs``, a ``reduce`` of ``sum`` / ``mean`` / ``max``
    declares one ``layer`` partial ``value`` feeding every emitted statistic).

    A name that is already a built-in statistic, or that another registered family emits, is
    an error: a silent clash would mix two meanings under one name.
    """
    if not cls.name or not cls.emits:
        raise ValueError(f"{cls.__name__} must set name and emits")
    bad = (set(cls.needs) - NEEDS) | (set(cls.intermediates) - catalog.INTERMEDIATES)
    if bad:
        raise ValueError(f"{cls.__name__}: unknown needs {sorted(bad)}; choose from "
                         f"{sorted(NEEDS | catalog.INTERMEDIATES)}")
    owner = _REGISTERED.get(cls.name)
    if owner is not None and (owner.__module__, owner.__qualname__) == (cls.__module__,
                                                                        cls.__qualname__):
        owner = cls  # the same class from a reloaded module
    if owner is not None and owner is not cls:
        raise ValueError(f"a statistic family named {cls.name!r} is already registered "
                         f"({owner.__module__}.{owner.__qualname__})")
    spec = cls.spec
    if spec is not None and any(spec.name in p for p in catalog.PRESETS.values()):
        switch = f"its flag {spec.flag!r}" if spec.flag else "every preset"
        raise ValueError(f"{cls.__name__} is a built-in family: it runs with {switch}, not "
                         "through statistics=")
    if spec is None:
        allowed = ("mean", "sum", "max") + (() if issubclass(cls, LayerStatistic)
                                            else ("derived",))
        if cls.reduce not in allowed:
            raise ValueError(f"{cls.__name__}.reduce must be one of {allowed}, got "
                             f"{cls.reduce!r}")
        stats = tuple(StatSpec(s, cls.docs.get(s, cls.__doc__ or s), "custom",
                               reduce=cls.reduce, heatmap=s if cls.heatmap else None)
                      for s in cls.emits)
        partials = tuple(p if p.feeds else replace(p, feeds=cls.emits)
                         for p in cls.partial_specs)
        if not partials and cls.reduce != "derived":
            partials = (Partial("value", cls.reduce, "layer", "the rank's values",
                                feeds=cls.emits),)
        spec = FamilySpec(cls.name, stats, f"{cls.__module__}:{cls.__qualname__}",
                          needs=frozenset(cls.needs),
                          intermediates=frozenset(cls.intermediates), partials=partials)
        if owner is cls:  # a reloaded module: its earlier declaration is replaced
            catalog.FAMILIES.pop(cls.name, None)
    catalog.register(spec)
    _REGISTERED[cls.name] = cls
    return cls


def in_backward() -> bool:
    """True while autograd runs a backward pass (a checkpointed module's recomputation)."""
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return fn is not None and fn() != -1


def nan_where(values: torch.Tensor, ok: torch.Tensor | None) -> torch.Tensor:
    """``values`` with NaN where ``ok`` is False (a bool tensor broadcast along dim 0)."""
    if ok is None:
        return values
    return torch.where(ok, values, torch.full_like(values, math.nan))


def spike_free(out: dict[str, torch.Tensor], L: int) -> torch.Tensor | None:
    """``(L+1,)`` bool, on device: True where the spike detector flagged neither the layer's
    norm nor the global norm at this step (last entry: no flag at all). The variance EMAs
    skip the other steps, as the detectors skip non-finite ones. None without detectors."""
    flags = out.get("_flags")
    if flags is None:
        return None
    bad = (flags[:L] > 0) | (flags[L] > 0)
    return torch.cat([~bad, (~bad.any()).reshape(1)])


def edit_tolerance(dtype: torch.dtype) -> float:
    """Relative spread of per-layer factors still read as one common factor (rounding of a
    scaled gradient: ~1e-7 in float32, ~1e-3 in 16-bit formats)."""
    return 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4


def mask_layers(out: dict[str, torch.Tensor], keys: set[str], ok: torch.Tensor) -> None:
    """NaN where ``ok`` is False in the per-layer statistics ``keys`` of ``out`` (a global
    entry, last, is NaN when any layer is)."""
    for key in keys:
        v = out[key]
        full = torch.cat([ok, ok.all().reshape(1)]) if v.numel() == ok.numel() + 1 else ok
        if v.numel() == full.numel():
            out[key] = nan_where(v, full)


def micro_weights(sizes: list[int], loss_reduction: str) -> tuple[list[float], float, float]:
    """``(v, lam, c)`` of a step's micro-batches (sizes ``b_k``): micro-batch k contributes
    ``lam v_k G_k`` to ``p.grad`` (``G_k`` its mean gradient, ``sum v_k = 1``), and
    ``c = sum_k v_k^2 / b_k`` is the variance factor of the step's gradient (``families.twobatch``
    has the table of conventions)."""
    K, B = len(sizes), float(sum(sizes))
    lam = B if loss_reduction == "sum" else 1.0
    v = [1.0 / K] * K if loss_reduction == "mean" else [b / B for b in sizes]
    return v, lam, sum(vk * vk / b for vk, b in zip(v, sizes, strict=True))
