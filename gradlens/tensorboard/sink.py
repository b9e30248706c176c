"""The TensorBoard sink: scalars, raw histograms, spike events and the dashboard layout.

What it writes (tags from :mod:`gradlens.schema`):

- run-level rows as scalars ``gradlens/global/<stat>``; per-layer rows as scalars
  ``gradlens/<stat>/<layer>`` only with ``per_layer=True`` (a tag per (layer, statistic) is
  ~6,000 tags per step for a 7B-shaped model: TensorBoard's own scalar views become unusable
  and the event file grows by ~0.4 MB per step; the per-layer views are the gradlens tab's
  heatmaps, read from the table);
- per-group aggregates ``gradlens/by_group/<stat>/<group>/{mean,min,max}`` over the finite
  values of the layers of each dashboard group at each step (the margin charts read them);
- histograms with ``add_histogram_raw`` under ``tb_tag(hist.stat, hist.layer)``;
- spike events twice: as text under ``gradlens/spikes`` (one markdown line per event, one text
  entry per step), and as scalars ``gradlens/spikes/<kind>`` (the largest score of that kind at
  the step), because TensorBoard down-samples scalars and text but a spike stays visible as a
  scalar peak;
- at :meth:`~TensorBoardSink.open`, the custom-scalars layout built by
  :func:`gradlens.tensorboard.dashboards.build_layout` from the packaged templates and the run's
  layers.

Scalars of one step go out as one event holding many values, encoded from a template of the
step's tags (:mod:`gradlens.tensorboard._scalar_events`: much faster than one ``add_scalar``
call, or one protobuf object, per value), checksummed by a vectorized CRC-32C (``_crc32c``, about 15x
faster than TensorBoard's per-byte Python one on a 40 kB event). TensorBoard stores scalars
as float32.

The sink writes its event file itself (TensorBoard's record format, one file per sink), in
whole records appended at each :meth:`~TensorBoardSink.flush`, so a write error is handled as
the table sink handles it: a ``RuntimeWarning`` once, the unwritten records kept in a bounded
backlog and retried at later flushes, the file truncated back to its last good record, the
dropped rows counted (:attr:`~gradlens.sinks.base.Sink.rows_dropped`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import socket
import time
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gradlens.schema import (
    GLOBAL,
    SPIKES_TEXT_TAG,
    SpikeEvent,
    tb_group_tag,
    tb_spike_tag,
    tb_tag,
)
from gradlens.sinks import _crc32c as _crc
from gradlens.sinks._files import AppendFiles
from gradlens.sinks.base import (
    DEFAULT_BACKLOG_ROWS,
    Histogram,
    Sink,
    StatRow,
    StatRows,
    WarnOnce,
    check_ended,
    ensure_writable_dir,
    layer_group,
)
from gradlens.tensorboard._scalar_events import ScalarTemplate

__all__ = ["TensorBoardSink", "spike_markdown"]


def spike_markdown(event: SpikeEvent) -> str:
    """One markdown line describing a spike event."""
    where = "the run" if event.layer == GLOBAL else f"`{event.layer}`"
    line = (f"- step {event.step}: **{event.kind}** in {where}: value {event.value:.4g}, "
            f"score {event.score:.4g}")
    if event.kind == "guarded_step":
        line += f", guard action **{event.reason}**"
    if event.layers:
        line += " (top layers: " + ", ".join(f"`{n}`" for n in event.layers) + ")"
    return line


class TensorBoardSink(Sink):
    """Write the lens's records as TensorBoard events in ``logdir``.

    Args:
        logdir: the run directory; created if needed (a non-writable one raises
            :class:`~gradlens.sinks.base.LogdirError` here).
        group_aggregates: write the per-group mean/min/max scalars (the margin charts need them).
        per_layer: also write every per-layer row as its own scalar (default False: the
            run-level rows and the per-group aggregates only).
        dashboards: install the custom-scalars layout at :meth:`open`.
        templates: dashboard templates (default: the packaged ones,
            :func:`gradlens.tensorboard.dashboards.load_templates`).
        max_queue, flush_secs: also write the queued events, before the next :meth:`flush`,
            once this many are queued or this many seconds have passed since the last write.
        max_backlog_rows: the cap of the in-memory backlog while the event file cannot be
            written, in values (a scalar, a histogram, a spike event count one each).

    Attributes:
        event_path: the event file (``events.out.tfevents.<time>.<host>.<pid>.<n>``).
        rows_dropped: values given up on (backlog cap, or unwritten at :meth:`close`).
    """

    background = True

    def __init__(
        self,
        logdir: str | os.PathLike[str],
        *,
        group_aggregates: bool = True,
        per_layer: bool = False,
        dashboards: bool = True,
        templates: Sequence[Any] | None = None,
        max_queue: int = 1000,
        flush_secs: int = 30,
        max_backlog_rows: int = DEFAULT_BACKLOG_ROWS,
    ) -> None:
        self.logdir = ensure_writable_dir(logdir)
        self.meta = {}
        self.group_aggregates = group_aggregates
        self.per_layer = per_layer
        self.dashboards = dashboards
        self.templates = templates
        self.layout: Any = None
        self._groups: dict[str, str] = {}
        self.max_queue = max_queue
        self.flush_secs = flush_secs
        self.max_backlog_rows = max_backlog_rows
        self.rows_dropped = 0
        self.files = AppendFiles(fsync=False, lines=False)  # the file seam
        self.event_path = self.logdir / (
            f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{next(_FILE_IDS)}")
        self._queue: deque[tuple[int, bytes, int]] = deque()  # (step, record, values)
        self._queued_values = 0
        self._last_write = time.monotonic()
        self._failing = False
        self._warn = WarnOnce()
        self._layout_record = b""
        self._layouts: dict[tuple, tuple[ScalarTemplate, np.ndarray, int]] = {}
        # the file's first record; written again (with the layout) if the file is recreated
        self._version_record = _record(_event(file_version="brain.Event:2"))
        self._drain()

    def open(self, meta: Mapping[str, Any]) -> None:
        """Remember each layer's group and install the dashboard layout."""
        super().open(meta)
        layers = list(self.meta.get("layers") or [])
        self._groups = {
            str(la["name"]): str(la.get("group") or layer_group(la["name"], la.get("role", "")))
            for la in layers
        }
        if self.dashboards:
            from gradlens.tensorboard.dashboards import build_layout, layout_summary

            stats = self.meta.get("stats")
            self.layout = build_layout(layers, self.templates,
                                       stats=set(stats) if stats is not None else None,
                                       per_layer=self.per_layer)
            self._layout_record = _record(_event(summary=layout_summary(self.layout)))
            self._queue.append((0, self._layout_record, 0))
            self._drain()

    def abandon(self, remove_files: bool = False) -> None:
        """Give up a sink that will not be used (a lens whose constructor failed): close the
        event file (and delete it with ``remove_files``), writing nothing more."""
        self._queue.clear()
        self.files.close()
        if remove_files:
            with contextlib.suppress(OSError):
                self.event_path.unlink()
        self._closed = True

    def _add(self, summary: Any, step: int, values: int) -> None:
        """Queue one event; write the queue when it is long or old."""
        self._add_record(_record(_event(summary=summary, step=step)), step, values)

    def _add_record(self, record: bytes, step: int, values: int) -> None:
        self._queue.append((step, record, values))
        self._queued_values += values
        if self._failing:
            self._trim()
        elif (len(self._queue) >= self.max_queue
              or time.monotonic() - self._last_write >= self.flush_secs):
            self._drain()

    def _trim(self) -> None:
        """Drop the oldest steps past the backlog cap, counting their values."""
        while self._queued_values > self.max_backlog_rows and self._queue:
            step = self._queue[0][0]
            while self._queue and self._queue[0][0] == step:
                n = self._queue.popleft()[2]
                self._queued_values -= n
                self.rows_dropped += n

    def _drain(self) -> None:
        """Append every queued record; a failure warns once and keeps them for the next
        flush."""
        if not self._queue and self.files.size(self.event_path) > 0:
            return
        data = b"".join(rec for _, rec, _ in self._queue)
        try:
            # a new (or recreated) file starts with the version record and the layout
            header = self._version_record + (
                self._layout_record if self._layout_record not in (
                    r for _, r, _ in self._queue) else b"")
            self.files.append(self.event_path, data, header)
        except Exception as err:  # I/O never stops training: keep, retry, count
            self._failing = True
            self._warn(self, self.event_path, err, self._queued_values)
            self._trim()
            return
        self._failing = False
        self._queue.clear()
        self._queued_values = 0
        self._last_write = time.monotonic()

    def _group(self, layer: str, role: str) -> str:
        group = self._groups.get(layer)
        if group is None:
            group = self._groups[layer] = layer_group(layer, role)
        return group

    def write_stats(self, rows: Sequence[StatRow]) -> None:
        """Scalars per row, plus the per-group aggregates; one event per step, encoded from
        the step's tag list (:mod:`gradlens.tensorboard._scalar_events`)."""
        self._ensure_open()
        rows = StatRows.of(rows)
        if not len(rows):
            return
        steps = np.unique(rows.steps)
        for step in steps.tolist():
            part = rows if len(steps) == 1 else _select(rows, rows.steps == step)
            template, group_of, n_groups, own = self._tag_layout(part)
            values = part.values
            keep = None
            if n_groups:
                aggregates, present = _group_aggregates(values, group_of, n_groups)
                values = np.concatenate([values[own], aggregates])
                keep = np.concatenate([np.ones(len(own), dtype=bool),
                                       np.repeat(present, 3)])
            else:
                values = values[own]
            event = template.event(values, step, time.time(), keep)
            self._add_record(_crc.record(event), step,
                             len(values) if keep is None else int(keep.sum()))

    def _tag_layout(self, rows: StatRows
                    ) -> tuple[ScalarTemplate, np.ndarray, int, np.ndarray]:
        """``(template, group_of, n_groups, own)`` of one step's rows: the event template of
        the tags of the rows written as their own scalar (indices ``own``: the run-level rows,
        and every row with ``per_layer``) then ``mean, min, max`` of each (stat, dashboard
        group) in order of first appearance; ``group_of[i]`` is row i's aggregate (-1: none, a
        run-level row). Cached: the rows are the same at every logged step."""
        key = (rows.labels, rows.stats, rows.label_ids.tobytes(), rows.stat_ids.tobytes())
        layout = self._layouts.get(key)
        if layout is None:
            cells = [(rows.labels[a], rows.stats[b])
                     for a, b in zip(rows.label_ids.tolist(), rows.stat_ids.tolist(),
                                     strict=True)]
            own = np.array([i for i, ((layer, _), _) in enumerate(cells)
                            if self.per_layer or layer == GLOBAL], dtype=np.int64)
            tags = [tb_tag(cells[i][1], cells[i][0][0]) for i in own]
            groups: dict[tuple[str, str], int] = {}
            group_of = np.full(len(cells), -1, dtype=np.int64)
            if self.group_aggregates:
                for i, ((layer, role), stat) in enumerate(cells):
                    if layer != GLOBAL:
                        group_of[i] = groups.setdefault((stat, self._group(layer, role)),
                                                        len(groups))
            tags += [tb_group_tag(stat, group, agg) for stat, group in groups
                     for agg in ("mean", "min", "max")]
            if len(self._layouts) >= 16:
                self._layouts.clear()
            layout = self._layouts[key] = (ScalarTemplate(tags), group_of, len(groups), own)
        return layout

    def write_histograms(self, hists: Sequence[Histogram]) -> None:
        """Raw histograms. ``min``/``max``/``num``/``sum``/``sum_squares`` come from
        ``hist.moments`` when given; otherwise the outer edges and bin-center estimates (the
        raw values never leave the device)."""
        from torch.utils.tensorboard.summary import histogram_raw

        self._ensure_open()
        for h in hists:
            limits = h.bucket_limits
            counts = [float(c) for c in h.counts]
            num = sum(counts)
            if not counts or num <= 0 or not all(math.isfinite(x) for x in limits):
                continue  # nothing TensorBoard can draw
            if len(h.edges) == len(counts) + 1:
                lo = float(h.edges[0])
                lefts = [lo, *limits[:-1]]
            else:  # right limits: the first bucket is an underflow bucket ending at limits[0]
                lo = limits[0]
                lefts = [limits[0], *limits[:-1]]
            centers = [(a + b) / 2 for a, b in zip(lefts, limits, strict=True)]
            mn, mx = lo, limits[-1]
            total = sum(c * x for c, x in zip(counts, centers, strict=True))
            total_sq = sum(c * x * x for c, x in zip(counts, centers, strict=True))
            if h.moments is not None and all(math.isfinite(float(m)) for m in h.moments):
                mn, mx, num, total, total_sq = (float(m) for m in h.moments)
            self._add(histogram_raw(tb_tag(h.stat, h.layer), min=mn, max=mx, num=num, sum=total,
                                    sum_squares=total_sq, bucket_limits=limits,
                                    bucket_counts=counts), int(h.step), 1)

    def write_events(self, events: Sequence[SpikeEvent]) -> None:
        """A markdown text entry per step, and the largest score per (step, kind) as a
        scalar."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._ensure_open()
        lines: dict[int, list[str]] = defaultdict(list)
        best: dict[tuple[int, str], float] = {}
        for e in events:
            step = int(e.step)
            lines[step].append(spike_markdown(e))
            score = float(e.score)
            old = best.get((step, e.kind))
            if old is None or (math.isfinite(score) and (not math.isfinite(old) or score > old)):
                best[(step, e.kind)] = score
        for step in sorted(lines):
            values = [_text_value(SPIKES_TEXT_TAG, "\n".join(lines[step]))]
            values += [Summary.Value(tag=tb_spike_tag(kind), simple_value=score)
                       for (s, kind), score in best.items() if s == step]
            self._add(Summary(value=values), step, len(lines[step]))

    def flush(self) -> None:
        """Append the queued events to the event file. A write error is not raised: see the
        module docstring."""
        self._check_not_closed()
        self._drain()

    def close(self, ended: str | None = None) -> None:
        """Flush and close the event file (what is still unwritten is counted in
        :attr:`rows_dropped`). Idempotent."""
        ended = check_ended(ended)
        if self._closed:
            return
        self._drain()
        self.rows_dropped += self._queued_values
        if self._queued_values:
            import warnings

            warnings.warn(
                f"gradlens: TensorBoardSink closed with {self._queued_values} values it could "
                f"not write to {self.event_path}; they are lost",
                RuntimeWarning,
                stacklevel=2,
            )
        self._queue.clear()
        self._queued_values = 0
        self.files.close()
        super().close(ended)


_FILE_IDS = itertools.count()


def _select(rows: StatRows, mask: np.ndarray) -> StatRows:
    return StatRows(rows.steps[mask], rows.labels, rows.label_ids[mask], rows.stats,
                    rows.stat_ids[mask], rows.values[mask])


def _group_aggregates(values: np.ndarray, group_of: np.ndarray, n_groups: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, min, max)`` per group over the finite values of its rows, interleaved
    (``(3 n_groups,)``), and whether the group has any finite value (the others are left
    out of the event)."""
    ok = (group_of >= 0) & np.isfinite(values)
    ids, vals = group_of[ok], values[ok]
    count = np.bincount(ids, minlength=n_groups)
    total = np.bincount(ids, weights=vals, minlength=n_groups)
    lo = np.full(n_groups, np.inf)
    hi = np.full(n_groups, -np.inf)
    np.minimum.at(lo, ids, vals)
    np.maximum.at(hi, ids, vals)
    present = count > 0
    mean = np.divide(total, count, out=np.zeros(n_groups), where=present)
    return np.stack([mean, lo, hi], axis=1).reshape(-1), present


def _event(summary: Any = None, step: int | None = None, file_version: str | None = None) -> Any:
    from tensorboard.compat.proto import event_pb2

    ev = event_pb2.Event(wall_time=time.time())
    if step is not None:
        ev.step = int(step)
    if summary is not None:
        ev.summary.CopyFrom(summary)
    if file_version is not None:
        ev.file_version = file_version
    return ev


def _record(event: Any) -> bytes:
    """One event in TensorBoard's record format (length, CRCs, payload)."""
    return _crc.record(event.SerializeToString())


def _text_value(tag: str, text: str) -> Any:
    """A text-plugin summary value under exactly ``tag`` (``SummaryWriter.add_text`` appends
    ``/text_summary`` to the tag)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.plugins.text.plugin_data_pb2 import TextPluginData

    smd = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
        plugin_name="text", content=TextPluginData(version=0).SerializeToString()))
    tensor = TensorProto(dtype="DT_STRING", string_val=[text.encode("utf-8")],
                         tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]))
    return Summary.Value(tag=tag, metadata=smd, tensor=tensor)
