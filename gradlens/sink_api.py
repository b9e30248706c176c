"""The sink interface: where the collector's host-side records go, and the records themselves.

Below the collector (``core``) and the sinks (``sinks``), which both import it.

The collector calls a sink in this order::

    open(meta)                      once, with the run metadata (see below)
    write_stats(rows)               \\
    write_histograms(hists)          | zero or more times per flush, then
    write_events(events)            /
    flush()                         once per flush: everything written so far must be durable
    close(ended=None)               once or more (idempotent); flushes first. ``ended`` says how
                                    the run ended: "finished", or "interrupted" (an exception
                                    or Ctrl-C unwound the training loop); None: "interrupted"
                                    when called while an exception is being handled (see
                                    :func:`check_ended`), else "finished"

I/O never stops training: a sink that writes files (table, TensorBoard) never lets a write
error (disk full, run directory deleted, read-only file) out of these calls. It warns once
(``RuntimeWarning``, naming the path and the error), keeps what it could not write in a bounded
in-memory backlog, retries at the next flush and counts what it had to drop
(:attr:`Sink.rows_dropped`). Only misuse raises: a write after ``close``, a bad ``ended``.

Everything handed to a sink is already on the host (no tensors): one device-to-host transfer
per flush happens in the collector, never in a sink. The rows come as :class:`StatRows`, a
sequence of :data:`StatRow` tuples to whoever iterates it, held as numpy columns (codes into
small tables of names) so that the sinks that read the columns do no Python work per row.

``meta`` is a JSON-able dict: ``name``, ``model``, ``optimizer``, ``preset``,
``gradlens_version``, ... and ``layers``, a list of ``{name, role, layout, shape, numel, group}``
where ``group`` (:func:`gradlens.kinds.layer_kind`) is the dashboard group of the layer. A sink
may be used without ``open`` (tests, notebooks): it then behaves as if opened with ``{}``.
"""

from __future__ import annotations

import inspect
import itertools
import math
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, overload

import numpy as np

from gradlens.schema import SpikeEvent

__all__ = ["ENDED", "Histogram", "Sink", "StatRow", "StatRows", "check_ended", "close_sink"]

ENDED = ("finished", "interrupted")
"""How a run can end, as :meth:`Sink.close` takes it and ``run.json`` records it."""

StatRow = tuple[int, str, str, str, float]
"""One row of the long table, in ``schema.STAT_COLUMNS`` order: step, layer, role, stat, value."""


class StatRows(Sequence[StatRow]):
    """Rows held as columns: what the collector hands its sinks at a flush.

    A sequence of :data:`StatRow` tuples to whoever iterates it (``int`` step, ``float``
    value), built without a Python object per row: ``labels[label_ids[i]]`` is row i's
    ``(layer, role)``, ``stats[stat_ids[i]]`` its statistic, ``steps[i]`` and ``values[i]``
    (int64, float64 arrays) the rest. The sinks that know it (the table, TensorBoard, the
    in-memory sink) read the columns; :meth:`of` turns any sequence of rows into one. Never
    mutated once built (the writer thread shares it between sinks).
    """

    __slots__ = ("label_ids", "labels", "stat_ids", "stats", "steps", "values")

    def __init__(self, steps: np.ndarray, labels: Sequence[tuple[str, str]],
                 label_ids: np.ndarray, stats: Sequence[str], stat_ids: np.ndarray,
                 values: np.ndarray) -> None:
        self.steps = np.asarray(steps, dtype=np.int64)
        self.labels = tuple(labels)
        self.label_ids = np.asarray(label_ids, dtype=np.intp)
        self.stats = tuple(stats)
        self.stat_ids = np.asarray(stat_ids, dtype=np.intp)
        self.values = np.asarray(values, dtype=np.float64)
        n = len(self.steps)
        if not len(self.label_ids) == len(self.stat_ids) == len(self.values) == n:
            raise ValueError("StatRows: steps, label_ids, stat_ids and values must have one "
                             "entry per row")

    @classmethod
    def of(cls, rows: Sequence[StatRow]) -> StatRows:
        """``rows`` as columns (itself when it already is)."""
        if isinstance(rows, StatRows):
            return rows
        labels: dict[tuple[str, str], int] = {}
        stats: dict[str, int] = {}
        n = len(rows)
        steps = np.empty(n, np.int64)
        values = np.empty(n, np.float64)
        lid = np.empty(n, np.intp)
        sid = np.empty(n, np.intp)
        for i, (step, layer, role, stat, v) in enumerate(rows):
            steps[i], values[i] = int(step), float(v)
            lid[i] = labels.setdefault((str(layer), str(role)), len(labels))
            sid[i] = stats.setdefault(str(stat), len(stats))
        return cls(steps, list(labels), lid, list(stats), sid, values)

    @classmethod
    def concat(cls, parts: Sequence[Sequence[StatRow]]) -> StatRows:
        """The rows of ``parts`` in order, as one (codes remapped where the tables differ)."""
        cols = [cls.of(p) for p in parts]
        cols = [c for c in cols if len(c)] or cols[:1]
        if not cols:
            return cls.empty()
        if len(cols) == 1:
            return cols[0]
        first = cols[0]
        if all(c.labels == first.labels and c.stats == first.stats for c in cols[1:]):
            lid = np.concatenate([c.label_ids for c in cols])
            sid = np.concatenate([c.stat_ids for c in cols])
            labels, stats = first.labels, first.stats
        else:
            label_of: dict[tuple[str, str], int] = {}
            stat_of: dict[str, int] = {}
            lmaps = [np.array([label_of.setdefault(x, len(label_of)) for x in c.labels],
                              dtype=np.intp) for c in cols]
            smaps = [np.array([stat_of.setdefault(x, len(stat_of)) for x in c.stats],
                              dtype=np.intp) for c in cols]
            lid = np.concatenate([m[c.label_ids] for m, c in zip(lmaps, cols, strict=True)])
            sid = np.concatenate([m[c.stat_ids] for m, c in zip(smaps, cols, strict=True)])
            labels, stats = list(label_of), list(stat_of)
        return cls(np.concatenate([c.steps for c in cols]), labels, lid, stats, sid,
                   np.concatenate([c.values for c in cols]))

    @classmethod
    def empty(cls) -> StatRows:
        e = np.zeros(0, np.intp)
        return cls(e, (), e, (), e, np.zeros(0))

    def __len__(self) -> int:
        return len(self.steps)

    @overload
    def __getitem__(self, i: int) -> StatRow: ...

    @overload
    def __getitem__(self, i: slice) -> StatRows: ...

    def __getitem__(self, i: int | slice) -> StatRow | StatRows:
        if isinstance(i, slice):
            return StatRows(self.steps[i], self.labels, self.label_ids[i], self.stats,
                            self.stat_ids[i], self.values[i])
        layer, role = self.labels[self.label_ids[i]]
        v = float(self.values[i])
        return (int(self.steps[i]), layer, role, self.stats[self.stat_ids[i]],
                math.nan if v != v else v)

    def __iter__(self) -> Iterator[StatRow]:
        return iter(self.tuples())

    def __repr__(self) -> str:
        return f"StatRows({len(self)} rows)"

    def column(self, name: str) -> list[Any]:
        """One column as a list: ``step``, ``layer``, ``role``, ``stat`` or ``value``."""
        if name == "step":
            return self.steps.tolist()
        if name == "value":  # NaN as the one ``math.nan``: equal rows compare equal
            out = self.values.tolist()
            for i in np.flatnonzero(np.isnan(self.values)).tolist():
                out[i] = math.nan
            return out
        if name == "stat":
            return np.array(self.stats, dtype=object)[self.stat_ids].tolist()
        k = ("layer", "role").index(name)
        table = np.array([lab[k] for lab in self.labels], dtype=object)
        return table[self.label_ids].tolist()

    def tuples(self) -> list[StatRow]:
        """The rows as tuples ``(step, layer, role, stat, value)``."""
        return list(zip(*(self.column(c) for c in ("step", "layer", "role", "stat", "value")),
                        strict=True))

    def step_slices(self) -> list[tuple[int, StatRows]]:
        """``(step, rows)`` for each run of consecutive rows of one step, in order."""
        if not len(self):
            return []
        cuts = [0, *(np.flatnonzero(self.steps[1:] != self.steps[:-1]) + 1).tolist(),
                len(self)]
        return [(int(self.steps[a]), self[a:b]) for a, b in itertools.pairwise(cuts)]


@dataclass(frozen=True)
class Histogram:
    """A histogram already binned on device, in one of two layouts told apart by length:

    - ``len(edges) == len(counts) + 1``: bin edges, ``counts[i]`` values fell in
      ``[edges[i], edges[i + 1])``;
    - ``len(edges) == len(counts)``: TensorBoard's right limits (``bucket_limits``),
      ``counts[i]`` values fell in ``(edges[i - 1], edges[i]]`` and ``counts[0]`` at or below
      ``edges[0]`` (an underflow bucket, as :func:`gradlens.stats.columns.log_histogram` gives).

    Attributes:
        step: optimizer step.
        layer: parameter name (or ``"global"``).
        stat: what was binned (``unit_rms_hist``: the per-output-unit gradient RMS).
        edges: increasing bin edges or right limits (see above).
        counts: counts (floats, as they come off the device).
        moments: optional exact ``[min, max, num, sum, sum_squares]`` of the binned values
            (:func:`gradlens.stats.columns.histogram_moments`); without them TensorBoard gets
            the outer edges and bin-center estimates.
    """

    step: int
    layer: str
    stat: str
    edges: Sequence[float]
    counts: Sequence[float]
    moments: Sequence[float] | None = None

    def __post_init__(self) -> None:
        if len(self.edges) - len(self.counts) not in (0, 1):
            raise ValueError(
                f"Histogram {self.stat}/{self.layer} at step {self.step}: {len(self.edges)} "
                f"edges for {len(self.counts)} counts; pass n + 1 bin edges or n right limits "
                "for n counts"
            )
        if self.moments is not None and len(self.moments) != 5:
            raise ValueError(
                f"Histogram {self.stat}/{self.layer}: moments must be [min, max, num, sum, "
                f"sum_squares], got {len(self.moments)} numbers"
            )

    @property
    def bucket_limits(self) -> list[float]:
        """Right limit of each count (TensorBoard's ``bucket_limits``)."""
        edges = [float(e) for e in self.edges]
        return edges[1:] if len(edges) == len(self.counts) + 1 else edges


class Sink(ABC):
    """Where records go. Subclasses implement :meth:`write_stats` and :meth:`write_events`,
    and override the others as needed (calling ``super()`` in :meth:`open` and :meth:`close`).

    A sink is a context manager (an exception leaving the block closes it with
    ``ended="interrupted"``); :meth:`close` may be called any number of times. Writing to a
    closed sink raises ``RuntimeError``.

    Attributes:
        ended: ``None`` while open, then the ``ended`` given to the first :meth:`close`.
        rows_dropped: rows (events, histograms) this sink could not write and gave up on; 0 for
            a sink that cannot fail.
        flushes_coalesced: flushes the lens's writer thread merged into a later write because
            the disk was behind (:mod:`gradlens.core.writer`); nothing lost.
        background: the lens may write it on its writer thread (:mod:`gradlens.core.writer`):
            only for sinks that nothing reads while the run trains (False by default).
    """

    meta: dict[str, Any]
    background: bool = False
    _opened: bool = False
    _closed: bool = False
    ended: str | None = None
    rows_dropped: int = 0
    flushes_coalesced: int = 0

    def open(self, meta: Mapping[str, Any]) -> None:
        """Receive the run metadata; called once, before any write."""
        self._check_not_closed()
        self.meta = dict(meta)
        self._opened = True

    @abstractmethod
    def write_stats(self, rows: Sequence[StatRow]) -> None:
        """Append rows ``(step, layer, role, stat, value)``; ``value`` may be NaN or +-inf."""

    def write_histograms(self, hists: Sequence[Histogram]) -> None:  # noqa: B027
        """Record histograms; the default ignores them (tables have no place for them)."""

    @abstractmethod
    def write_events(self, events: Sequence[SpikeEvent]) -> None:
        """Record spike events."""

    def flush(self) -> None:  # noqa: B027
        """Make everything written so far durable (a killed run keeps it)."""

    def close(self, ended: str | None = None) -> None:
        """Flush and release resources; ``ended`` is ``"finished"``, ``"interrupted"`` or None
        (see :func:`check_ended`). Idempotent (the first call's ``ended`` is kept)."""
        ended = check_ended(ended)
        if not self._closed:
            self.ended = ended
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def opened(self) -> bool:
        return self._opened

    def _check_not_closed(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed; create a new sink")

    def _ensure_open(self) -> None:
        """Open with empty metadata when a write comes before :meth:`open`."""
        self._check_not_closed()
        if not self._opened:
            self.open({})

    def __enter__(self) -> Sink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(ended="finished" if exc_type is None else "interrupted")


def check_ended(ended: str | None) -> str:
    """``ended`` itself (a ``ValueError`` naming the accepted values for anything else); for
    ``None``, ``"interrupted"`` while an exception is being handled (``close`` called from a
    ``with`` block that an exception, ``KeyboardInterrupt`` included, is leaving, or from an
    ``except`` clause) and ``"finished"`` otherwise."""
    if ended is None:
        return "interrupted" if sys.exc_info()[1] is not None else "finished"
    if ended not in ENDED:
        raise ValueError(f"ended must be one of {ENDED}, got {ended!r}")
    return ended


def close_sink(sink: Sink, ended: str | None = None) -> None:
    """``sink.close(ended=ended)``, or ``sink.close()`` for a sink written before ``close``
    took ``ended`` (a user's subclass overriding ``close(self)``)."""
    ended = check_ended(ended)
    try:
        params = inspect.signature(sink.close).parameters
    except (TypeError, ValueError):
        params = {}
    if "ended" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        sink.close(ended=ended)
    else:
        sink.close()
