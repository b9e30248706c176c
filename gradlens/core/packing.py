"""A flush's ONE collective, packed from the catalog's declarations.

Each family returns its rank-local values by name (``Statistic.partials``); each name must be
one of the :class:`gradlens.catalog.Partial` its declaration lists (the shared intermediates':
:data:`gradlens.catalog.INTERMEDIATE_PARTIALS`). This module packs every value with its
declared reduction into one :class:`gradlens.core.distributed.Pack` (``sum``; ``max`` through
the per-rank slots; ``mean`` as a sum divided by the world after the reduction), keyed by
(step, family, name, layer), and hands each family a view of ITS reduced values by their
declared names. In one process nothing is packed: the view is the dict the family returned
(no copy, no collective). Host-side checks only: no value is read.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch

from gradlens import catalog
from gradlens.catalog import Partial
from gradlens.core import distributed as D

INTERMEDIATES = "intermediates"  # the owner named in errors about the shared intermediates

_declared: dict[str, tuple[Any, dict[str, Partial]]] = {}


def declared(family: str) -> dict[str, Partial]:
    """The partials a family's catalog declaration lists, by name (none when undeclared)."""
    if family == INTERMEDIATES:
        spec: Any = catalog.INTERMEDIATE_PARTIALS
        parts = [p for ps in spec.values() for p in ps]
    else:
        spec = catalog.FAMILIES.get(family)
        parts = list(spec.partials) if spec is not None else []
    cached = _declared.get(family)
    if cached is None or cached[0] is not spec:  # a re-registered user family: rebuilt
        cached = _declared[family] = (spec, {p.name: p for p in parts})
    return cached[1]


class Packing:
    """The partials of one flush: :meth:`add` per (step, family), then ONE :meth:`reduce`."""

    def __init__(self, world: int, layers: int) -> None:
        self.world, self.layers = world, layers
        self.pack = D.Pack(world, D.rank()) if world > 1 else None
        # where each reduced entry goes: (view, slot, pack key, mean)
        self._fill: list[tuple[dict, Hashable, Hashable, bool]] = []

    def add(self, step: int, family: str, values: Mapping[str, Any],
            logged: bool) -> Mapping[str, Any]:
        """Check ``values`` against the family's declaration and pack them; returns the view
        that :meth:`reduce` fills (in one process: ``values`` itself)."""
        if not values:
            return values
        spec = declared(family)
        for name, v in values.items():
            self._check(family, spec.get(name), name, v, logged)
        if self.pack is None:
            return values
        view: dict[str, Any] = {}
        for name, v in values.items():
            p = spec[name]
            if isinstance(v, Mapping):
                sub = view[name] = {}
                for k, t in v.items():
                    self._put(p, (step, family, name, k), t, sub, k)
            else:
                self._put(p, (step, family, name), v, view, name)
        return view

    def _check(self, family: str, p: Partial | None, name: str, v: Any, logged: bool) -> None:
        if p is None:
            listed = sorted(declared(family))
            raise ValueError(f"family {family!r} returned the partial {name!r}, which its "
                             f"catalog declaration does not list (declared: {listed}); "
                             "declare it (catalog.Partial) to have it reduced")
        if not (p.per_step or logged):
            raise ValueError(f"family {family!r}: partial {name!r} is declared for logged "
                             "steps only (per_step=False) but was returned at a step that is "
                             "not logged")
        vector = p.shape in ("unit", "fan")
        if vector != isinstance(v, Mapping):
            want = "{layer index: vector}" if vector else "a tensor"
            raise ValueError(f"family {family!r}: partial {name!r} (shape {p.shape!r}) must "
                             f"be {want}, got {type(v).__name__}")
        if p.shape == "layer" and tuple(v.shape) != (self.layers,):
            raise ValueError(f"family {family!r}: partial {name!r} must have shape "
                             f"({self.layers},) (one value per layer), got {tuple(v.shape)}")
        if p.shape == "scalar" and v.numel() != 1:
            raise ValueError(f"family {family!r}: partial {name!r} must be one value, got "
                             f"shape {tuple(v.shape)}")

    def _put(self, p: Partial, key: Hashable, t: torch.Tensor, view: dict,
             slot: Hashable) -> None:
        assert self.pack is not None
        (self.pack.max if p.reduce == "max" else self.pack.sum)(key, t)
        self._fill.append((view, slot, key, p.reduce == "mean"))

    def reduce(self) -> None:
        """The one collective (none in one process); fills every view :meth:`add` returned."""
        if self.pack is None or not self._fill:
            return
        red = self.pack.reduce()
        for view, slot, key, mean in self._fill:
            view[slot] = red[key] / self.world if mean else red[key]
