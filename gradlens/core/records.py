"""Host side of a flush: the one transferred vector back into rows (as columns), histograms
and events.

Each pending item is ``(step, kind, payload)``: ``step`` (a finalized step: per-statistic
device tensors, the validity mask and reasons), ``hist``, ``row`` (host scalars) or
``event``. Statistic keys that start with ``_`` are internal (detector flags) and never rows.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gradlens.catalog import scope
from gradlens.kinds import layer_kind
from gradlens.schema import GLOBAL, SpikeEvent
from gradlens.sink_api import Histogram, StatRows

if TYPE_CHECKING:
    from gradlens.core.lens import GradLens


@dataclass
class StepOutput:
    """One finalized step awaiting the flush's transfer."""

    values: dict[str, torch.Tensor]
    present: list[bool]
    micro: int
    logging: bool
    skipped: bool
    batch: int = 0  # examples in the step, all ranks (0: unknown)
    invalid: dict[str, dict[int, str]] = field(default_factory=dict)  # family -> layer -> why


def device_tensors(pending: list[tuple[int, str, Any]]) -> list[torch.Tensor]:
    """The tensors to transfer, in the order :func:`to_records` reads them."""
    out: list[torch.Tensor] = []
    for _, kind, payload in pending:
        if kind == "step":
            out.extend(payload.values.values())
        elif kind == "hist":
            out.extend(payload[1:4])
        elif kind == "scalars":
            out.append(payload[1])
    return out


class _Columns:
    """The rows of one flush, gathered as blocks of columns (no Python object per row)."""

    def __init__(self, labels: list[tuple[str, str]]) -> None:
        self.labels = labels
        self._label_of = {lab: k for k, lab in enumerate(labels)}
        self.stats: list[str] = []
        self._stat_of: dict[str, int] = {}
        self._steps: list[int] = []
        self._stat_ids: list[int] = []
        self._label_ids: list[np.ndarray] = []
        self._values: list[np.ndarray] = []

    def _stat(self, stat: str) -> int:
        k = self._stat_of.get(stat)
        if k is None:
            k = self._stat_of[stat] = len(self.stats)
            self.stats.append(stat)
        return k

    def block(self, step: int, label_ids: np.ndarray, stat: str, values: np.ndarray) -> None:
        self._steps.append(step)
        self._stat_ids.append(self._stat(stat))
        self._label_ids.append(label_ids)
        self._values.append(values)

    def one(self, step: int, layer: str, role: str, stat: str, value: float) -> None:
        k = self._label_of.get((layer, role))
        if k is None:
            k = self._label_of[(layer, role)] = len(self.labels)
            self.labels.append((layer, role))
        self.block(step, np.array([k], np.intp), stat, np.array([value], np.float64))

    def rows(self) -> StatRows:
        if not self._values:
            return StatRows.empty()
        sizes = [len(v) for v in self._values]
        return StatRows(np.repeat(np.asarray(self._steps, np.int64), sizes), self.labels,
                        np.concatenate(self._label_ids), self.stats,
                        np.repeat(np.asarray(self._stat_ids, np.intp), sizes),
                        np.concatenate(self._values))


_LABELS: weakref.WeakKeyDictionary[Any, list[tuple[str, str]]] = weakref.WeakKeyDictionary()
"""Each lens's row labels (its layers are fixed at its construction)."""


def to_records(lens: GradLens, pending: list[tuple[int, str, Any]], host: Any
               ) -> tuple[StatRows, list[SpikeEvent], list[Histogram]]:
    """``(rows, events, histograms)`` of the pending items, ``host`` the transferred values
    (in :func:`device_tensors` order). The rows are columns (:class:`StatRows`): per
    statistic, the present layers' values (a ``global``-scope statistic's per-layer
    placeholders, NaN, left out), then its run-level value when it has one."""
    host = np.asarray(host, dtype=np.float64)
    labels = _LABELS.get(lens)
    if labels is None:  # each layer's (name, kind) (gradlens.kinds), then the run's row
        labels = _LABELS[lens] = [*((i.name, layer_kind(i.name, i.role.value))
                                    for i in lens.layers), (GLOBAL, GLOBAL)]
    L = len(labels) - 1
    pos = 0
    cols = _Columns(list(labels))
    events: list[SpikeEvent] = []
    hists: list[Histogram] = []
    for step, kind, payload in pending:
        if kind == "event":
            events.append(payload)
            continue
        if kind == "row":
            cols.one(step, *payload)
            continue
        if kind == "scalars":  # global values that were device tensors (tensor lr)
            names_s, t = payload
            for n, v in zip(names_s, host[pos:pos + t.numel()].tolist(), strict=True):
                cols.one(step, GLOBAL, GLOBAL, n, v)
            pos += t.numel()
            continue
        if kind == "hist":
            layer, edges, counts, moments, stat = payload
            ne, nc, nm = edges.numel(), counts.numel(), moments.numel()
            part = host[pos:pos + ne + nc + nm].tolist()
            hists.append(Histogram(step, layer, stat, part[:ne], part[ne:ne + nc],
                                   part[ne + nc:]))
            pos += ne + nc + nm
            continue
        out: StepOutput = payload
        arrays: dict[str, np.ndarray] = {}
        for key, t in out.values.items():
            n = t.numel()
            arrays[key] = host[pos:pos + n]
            pos += n
        values = {key: a.tolist() for key, a in arrays.items()}
        for family in lens.families:
            events.extend(family_events(family, step, values, out.present))
        events.extend(validity_events(lens, step, values, out))
        if not out.logging:
            continue
        keep = np.flatnonzero(np.asarray(out.present, dtype=bool))  # the present layers
        for key, vals in arrays.items():
            if key.startswith("_"):
                continue
            where = scope(key)  # gradlens.catalog: layer | global | run
            if where == "run":  # one value: the global row
                cols.one(step, GLOBAL, GLOBAL, key, vals[0])
                continue
            sel = keep
            if len(vals) == L + 1 and where == "global":  # per-layer entries: placeholders
                sel = keep[~np.isnan(vals[keep])]
            cols.block(step, sel, key, vals[sel])
            if len(vals) == L + 1:
                cols.one(step, GLOBAL, GLOBAL, key, vals[L])
        if out.micro:  # counted by the micro-batch hooks (not installed by "minimal")
            cols.one(step, GLOBAL, GLOBAL, "microbatches", float(out.micro))
        if out.batch:
            cols.one(step, GLOBAL, GLOBAL, "batch_size", float(out.batch))
        if out.skipped:
            cols.one(step, GLOBAL, GLOBAL, "skipped_step", 1.0)
    return cols.rows(), events, hists


def family_events(family: Any, step: int, values: dict[str, list[float]],
                  present: list[bool]) -> list[SpikeEvent]:
    fn = getattr(family, "events", None)
    return fn(step, values, present) if fn is not None else []


def validity_events(lens: GradLens, step: int, values: dict[str, list[float]],
                    out: StepOutput) -> list[SpikeEvent]:
    """A ``validity`` event (and a warning) the first time a (family, reason) occurs. A step
    the GradScaler skipped has none: its ``skipped_step`` event says why its values are off,
    and a reason spent on it would silence the warning of a later, real failure."""
    if out.skipped:
        return []
    reasons = {fam: dict(bad) for fam, bad in out.invalid.items()}
    edit_ok = values.get("_edit_ok")
    if edit_ok is not None:
        why = ("the gradient changed between backward and step by an edit that is not one "
               "common factor (value clipping, per-layer edits): the hooks' gradients and "
               "p.grad disagree")
        for fam in lens.consistency_families:
            for k, ok in enumerate(edit_ok):
                if ok == 0 and out.present[k]:
                    reasons.setdefault(fam, {}).setdefault(k, why)
    for family in lens.families:
        fn = getattr(family, "device_reasons", None)
        if fn is not None:
            for k, why in fn(values).items():
                if out.present[k]:
                    reasons.setdefault(family.name, {}).setdefault(k, why)
    found: list[SpikeEvent] = []
    for fam, bad in reasons.items():
        by_reason: dict[str, list[str]] = {}
        for k, reason in bad.items():
            layer = GLOBAL if k < 0 else lens.layers[k].name
            if (fam, reason, layer) in lens._validity_seen:
                continue
            lens._validity_seen.add((fam, reason, layer))
            by_reason.setdefault(reason, []).append(layer)
            found.append(SpikeEvent(step, layer, "validity", math.nan, math.nan,
                                    family=fam, reason=reason))
        for reason, layers in by_reason.items():
            _warn(lens, fam, reason, layers)
    return found


def name_layers(layers: list[str], shown: int = 3) -> str:
    """``a, b, c and 5 more``."""
    more = f" and {len(layers) - shown} more" if len(layers) > shown else ""
    return ", ".join(layers[:shown]) + more


def _warn(lens: GradLens, family: str, reason: str, layers: list[str]) -> None:
    """One warning per reason in a run (several families may share one), naming the layers
    it covers (a few, then a count); a later step's new layers get their events, not a second
    warning."""
    if ("warned", reason) in lens._validity_seen:
        return
    lens._validity_seen.add(("warned", reason))
    where = "" if layers == [GLOBAL] else f" ({name_layers(layers)})"
    if family == "batch_size":  # a note on how sizes were read: nothing is NaN for it
        msg = f"gradlens: batch sizes{where}: {reason}"
    else:
        msg = f"gradlens: {family} statistics are NaN{where} where {reason}"
    warnings.warn(msg, RuntimeWarning, stacklevel=5)
