"""torch.distributed support of the lens: which gradient a rank holds, and ONE reduction per flush.

What each rank sees (checked by ``tests/distributed``):

- **DDP** (``DistributedDataParallel``). A hook registered with ``param.register_hook`` runs
  before the parameter's ``AccumulateGrad`` node, hence before DDP's reducer: it sees the
  *rank-local* gradient of this micro-batch (also inside ``no_sync()``, where nothing is
  reduced). ``p.grad`` at the optimizer step is the all-reduced **mean** over ranks, i.e. the
  gradient of the global batch: every per-step statistic is already global on every rank.
  The raw (pre-clip) norms are read from an autograd final callback queued behind the
  reducer's own (``core.observer``), so they describe that all-reduced gradient too; under
  ``no_sync()`` only the last backward reduces, and only its measurement is kept.
  Only the quantities built from the hooks (micro-batch squared norms, per-unit vectors,
  per-example sums) and the observed loss are rank-local and need a reduction.
- **FSDP2** (``fully_shard``). Parameters are ``DTensor`` shards; forward and backward run on
  separate, unsharded ``nn.Parameter`` objects that FSDP2 creates once and reuses (their
  storage is freed and refilled). A hook on the sharded parameter **never fires**; a hook on
  the unsharded parameter sees the rank-local, full-size micro-batch gradient before the
  reduce-scatter (also with ``set_requires_gradient_sync(False)``), exactly as under DDP. The
  lens registers its micro-batch hooks on the unsharded parameters from a forward pre-hook of
  the owning module. ``p.grad`` at the optimizer step is this rank's **shard** of the mean
  gradient (``Shard(0)``): every per-step statistic is a partial sum (the raw norms too, read
  after FSDP2's post-backward wait and summed in the flush's collective). In-place edits of a
  DTensor gradient (clipping) bump no version counter: FSDP2 gradients count as edited at
  every step, and the step's norms are compared with the raw ones (a common factor of 1 is
  no edit).

Sharding-correct statistics, for a gradient ``G`` split into disjoint pieces ``G^(r)``:

- squared norms and non-finite counts add over pieces: ``||G||^2 = sum_r ||G^(r)||^2``;
- ``max |G|`` is the max over pieces (packed as one slot per rank, see :class:`Pack`);
- per-unit squared norms (rows of the ``(units, fan)`` view): when the *fan* axis is split, each
  rank holds partial sums of every unit, and the sum over ranks is exact; when the *unit* axis
  is split, each rank holds whole units, and the global vector is their concatenation. Both are
  done with the same SUM: a rank writes its values at its offset in a zero vector of the global
  length (:func:`place`), so the all-reduce concatenates. That costs the same bytes as an
  all-gather of the shards, fits in the one collective, and yields the vector on every rank;
- ``Replicate`` mesh dimensions (HSDP) hold copies: only the rank at coordinate 0 of each
  contributes (others add zeros), so nothing is counted twice. Plain tensors held whole by every
  rank (DDP, an unsharded layer next to sharded ones) contribute from rank 0 only.

Rank-local values are never logged as global ones: every reducible quantity is a partial the
catalog declares (:class:`gradlens.catalog.Partial`), packed by :mod:`gradlens.core.packing`
into one :class:`Pack` and read back reduced.

Collectives: ONE ``all_reduce`` per flush (per logged step; ``close()`` / ``flush()`` too when
steps are pending), none on other steps: per-step detector inputs (norms, non-finite counts,
loss) are kept on device and the detectors run, in step order, after the reduction. A DTensor
layout this module cannot place (``Partial``, ``_StridedShard``, a mesh that does not span the
world, an ndim > 2 tensor split beyond dim 0) falls back to ``full_tensor()``: one extra
collective per such tensor per step, announced by a warning.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradlens.dtensor import dtensor_types, is_dtensor, local_tensor
from gradlens.stats.shards import fan_finite_counts, spam_counts, unit_count

__all__ = [
    "Pack",
    "Sharding",
    "Span",
    "fan_finite_counts",
    "is_dtensor",
    "is_writer_rank",
    "local_tensor",
    "localize",
    "place",
    "rank",
    "spam_counts",
    "unit_count",
    "unwrap_model",
    "world_size",
]


def _ready() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks of the default process group (1 without torch.distributed)."""
    return torch.distributed.get_world_size() if _ready() else 1


def rank() -> int:
    """This process's rank in the default group (0 without torch.distributed)."""
    return torch.distributed.get_rank() if _ready() else 0


def is_writer_rank() -> bool:
    """True on the rank that writes (rank 0), and without torch.distributed."""
    return rank() == 0


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile``
    (same parameters and names as the plain model; its hooks still fire), else ``model``.
    FSDP2 modules are returned as they are (``fully_shard`` wraps in place)."""
    from torch._dynamo.eval_frame import OptimizedModule
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, DistributedDataParallel | DataParallel | OptimizedModule):
        model = model._orig_mod if isinstance(model, OptimizedModule) else model.module
    return model


@dataclass(frozen=True)
class Span:
    """This rank's contiguous block ``[offset, offset + length)`` of an axis of size ``total``."""

    offset: int
    length: int
    total: int


@dataclass(frozen=True)
class Sharding:
    """How this rank's (local) gradient relates to the global one.

    Attributes:
        contributes: add this rank's partial values to the sum (False on non-zero coordinates
            of ``Replicate`` mesh dimensions, and on ranks other than 0 for whole tensors).
        sharded: the local tensor is a piece (partial sums); False: every rank holds it whole.
        units, fan: the rank's block of the unit / fan axis of the ``(units, fan)`` view when
            that axis is split (None: this rank holds the whole axis).
    """

    contributes: bool
    sharded: bool = False
    units: Span | None = None
    fan: Span | None = None


def _dtensor_sharding(g: Any, layout: str, world: int) -> Sharding | None:
    """The :class:`Sharding` of a ``DTensor`` gradient, or None where it cannot be placed."""
    _, shard_cls = dtensor_types()  # type: ignore[misc]
    mesh = g.device_mesh
    coord = mesh.get_coordinate()
    if coord is None or mesh.size() != world:
        return None  # the mesh does not span the default group
    contributes = True
    split: dict[int, list[int]] = {}  # tensor dim -> mesh dims sharding it, in mesh order
    for i, placement in enumerate(g.placements):
        if placement.is_replicate():
            contributes = contributes and coord[i] == 0
        elif type(placement) is shard_cls:
            split.setdefault(placement.dim % g.ndim, []).append(i)
        else:
            return None  # Partial, _StridedShard, custom placements
    if layout == "vector" or not split:
        return Sharding(contributes, sharded=True)
    if g.ndim > 2 and any(d != 0 for d in split):
        return None  # the fan axis is flattened: a split inside it is not contiguous
    local_shape = g.to_local().shape
    spans: dict[int, Span] = {}
    for d, mesh_dims in split.items():
        size, offset = int(g.shape[d]), 0
        for i in mesh_dims:  # torch.chunk semantics, applied in mesh-dimension order
            n, c = mesh.size(i), coord[i]
            chunk = math.ceil(size / n) if size else 0
            o = min(c * chunk, size)
            offset, size = offset + o, max(0, min(chunk, size - o))
        if size != local_shape[d]:
            return None  # a sharding rule this module does not know: be safe
        spans[d] = Span(offset, size, int(g.shape[d]))
    unit_dim = 1 if layout in ("conv1d", "embedding") else 0
    return Sharding(contributes, sharded=True, units=spans.get(unit_dim),
                    fan=spans.get(1 - unit_dim) if g.ndim == 2 else None)


_warned: set[str] = set()
_shardings: dict[tuple, Sharding | None] = {}


def localize(grads: Sequence[torch.Tensor], layouts: Sequence[str],
             world: int) -> tuple[list[torch.Tensor], list[Sharding] | None]:
    """Plain tensors to compute on, and how each relates to the global gradient.

    Returns ``(tensors, None)`` unchanged when no gradient is a ``DTensor`` (single process,
    DDP). Otherwise each ``DTensor`` becomes its local shard with its :class:`Sharding`, a
    plain tensor is a whole one (contributes from rank 0), and a ``DTensor`` that cannot be
    placed is gathered with ``full_tensor()`` (a collective; warned once per layout).
    """
    if not any(is_dtensor(g) for g in grads):
        return list(grads), None
    me = rank()
    whole = Sharding(contributes=me == 0)
    tensors: list[torch.Tensor] = []
    shards: list[Sharding] = []
    for g, layout in zip(grads, layouts, strict=True):
        if not is_dtensor(g):
            tensors.append(g)
            shards.append(whole)
            continue
        key = (g.device_mesh, tuple(g.placements), tuple(g.shape), layout, world)
        if key not in _shardings:  # python work per layer: once per layout, not per step
            _shardings[key] = _dtensor_sharding(g, layout, world)
        s = _shardings[key]
        if s is None:
            key = f"{tuple(g.placements)}"
            if key not in _warned:
                _warned.add(key)
                warnings.warn(
                    f"gradlens: DTensor placements {key} cannot be reduced in the lens's one "
                    "collective; gathering such gradients with full_tensor() (one extra "
                    "collective per tensor per step)", RuntimeWarning, stacklevel=3)
            tensors.append(g.full_tensor())
            shards.append(whole)
        else:
            tensors.append(g.to_local())
            shards.append(s)
    return tensors, shards


def place(vec: torch.Tensor, span: Span | None, contributes: bool = True) -> torch.Tensor:
    """``vec`` written at ``span.offset`` of a zero vector of length ``span.total`` (``vec``
    itself when ``span`` is None); all zeros when this rank does not contribute. Summed over
    ranks, placed blocks concatenate and placed partial sums add."""
    if span is None:
        return vec if contributes else torch.zeros_like(vec)
    out = vec.new_zeros(span.total)
    if contributes and span.length:
        out.narrow(0, span.offset, span.length).copy_(vec)
    return out


class Pack:
    """Rank-local tensors gathered into ONE flat tensor and reduced with ONE ``all_reduce``.

    ``sum(key, t)`` entries are summed over ranks. ``max(key, t)`` entries are reduced by max
    through the same SUM: each rank writes its values in its own row of a ``(world, m)`` zero
    block, the sum therefore holds every rank's row exactly (``x + 0 = x``), and the max is
    taken locally. That costs ``world * m`` entries, so only small vectors (one value per
    layer) go there.

    Every rank must add the same keys with the same shapes in the same order: the layout of
    the flat tensor is decided by calls, not by data (a rank that adds less would corrupt the
    reduction or hang it). With one rank, :meth:`reduce` returns the tensors as given, without
    communication or copies.
    """

    def __init__(self, world: int, rank: int, group: Any = None) -> None:
        self.world = world
        self.rank = rank
        self.group = group
        self._sums: list[tuple[Hashable, torch.Tensor]] = []
        self._maxes: list[tuple[Hashable, torch.Tensor]] = []

    def __len__(self) -> int:
        return len(self._sums) + len(self._maxes)

    def sum(self, key: Hashable, t: torch.Tensor) -> None:
        self._sums.append((key, t))

    def max(self, key: Hashable, t: torch.Tensor) -> None:
        self._maxes.append((key, t))

    def reduce(self) -> dict[Hashable, torch.Tensor]:
        """The reduced tensors by key (shapes as added; float32, float64 if any input is)."""
        entries = self._sums + self._maxes
        if not entries:
            return {}
        if self.world == 1:
            return dict(entries)
        dtype = (torch.float64 if any(t.dtype == torch.float64 for _, t in entries)
                 else torch.float32)
        device = entries[0][1].device
        parts = [t.reshape(-1).to(dtype) for _, t in self._sums]
        m = sum(t.numel() for _, t in self._maxes)
        if m:
            slots = torch.zeros(self.world, m, dtype=dtype, device=device)
            slots[self.rank] = torch.cat([t.reshape(-1).to(dtype) for _, t in self._maxes])
            parts.append(slots.reshape(-1))
        flat = torch.cat(parts)
        torch.distributed.all_reduce(flat, group=self.group)  # the one collective
        out: dict[Hashable, torch.Tensor] = {}
        pos = 0
        for key, t in self._sums:
            out[key] = flat[pos:pos + t.numel()].view(t.shape)
            pos += t.numel()
        if m:
            maxes = flat[pos:].view(self.world, m).amax(dim=0)
            pos = 0
            for key, t in self._maxes:
                out[key] = maxes[pos:pos + t.numel()].view(t.shape)
                pos += t.numel()
        return out
