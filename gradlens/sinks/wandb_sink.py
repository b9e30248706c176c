"""A Weights & Biases sink: global and per-kind scalars, spike events, a heatmap image.

``GradLens(model, opt, sinks=[WandbSink(project="my-run")])`` (or pass an open ``run``). At
each flush, step by step in order (``run.log(..., step=step)``):

    gradlens/<stat>                       the run-level rows (loss, lr/<group>, batch_size, ...)
    gradlens/by_kind/<stat>/<kind>        per layer kind (gradlens.kinds), the median over the
                                          kind's layers of their finite values
    gradlens/<stat>/<layer>               every layer, only with ``per_layer=True`` (W&B's
                                          charts slow down past a few thousand keys)
    gradlens/spikes/<kind>                spike events of that kind at the step (count)
    gradlens/heatmap/<stat>               every ``heatmap_every`` steps: the layer x step map
                                          of ``heatmap_stat`` over the last ``heatmap_steps``
                                          logged steps (log colour scale, kind bands)

and at ``close`` the table ``gradlens/spike_events`` (every event). The run's config gets the
lens's run.json metadata (``gradlens/...``) once, at ``open``. A W&B error never stops
training: the sink warns once and counts what it dropped (``rows_dropped``). Steps must grow:
a step at or below one already logged is dropped and counted (W&B refuses it). Install with
``pip install gradlens[wandb]``; tested offline (``WANDB_MODE=offline``).
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gradlens.kinds import KIND_COLORS, KINDS, layer_kind
from gradlens.schema import GLOBAL, SpikeEvent
from gradlens.sinks.base import Sink, StatRow

__all__ = ["WandbSink"]


def _wandb() -> Any:
    try:
        import wandb
    except ImportError as err:  # pragma: no cover - the message is the point
        raise ImportError("WandbSink needs wandb: pip install 'gradlens[wandb]'") from err
    return wandb


class WandbSink(Sink):
    """Log the lens's records to a W&B run (see the module docstring).

    Args:
        run: an open ``wandb`` run; None: ``wandb.init(**init)`` at ``open``, and the sink
            finishes the run it started at ``close``.
        heatmap_stat: the statistic of the heatmap image (a per-layer one).
        heatmap_every: steps between heatmap images (0: none).
        heatmap_steps: logged steps (columns) the image shows, the latest ones.
        per_layer: also log every layer's value (many keys on a large model).
        **init: ``wandb.init`` arguments (``project``, ``name``, ``dir``, ``mode``, ...).
    """

    background = True  # W&B's log is thread-safe; the heatmap renders off the training loop

    def __init__(self, run: Any = None, *, heatmap_stat: str = "grad_norm",
                 heatmap_every: int = 100, heatmap_steps: int = 200, per_layer: bool = False,
                 **init: Any) -> None:
        for name, v in (("heatmap_every", heatmap_every), ("heatmap_steps", heatmap_steps)):
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name ==
                                                                     "heatmap_every" else 1):
                raise ValueError(f"WandbSink: {name}={v!r}; expected an int >= "
                                 f"{0 if name == 'heatmap_every' else 1}")
        if run is not None and init:
            raise ValueError(f"WandbSink: pass an open run or wandb.init arguments, not both "
                             f"(got run and {sorted(init)})")
        self.run, self._own = run, run is None
        self.init = init
        self.heatmap_stat, self.heatmap_every = heatmap_stat, heatmap_every
        self.heatmap_steps, self.per_layer = heatmap_steps, per_layer
        self._rows: list[StatRow] = []
        self._events: list[SpikeEvent] = []
        self._all_events: list[SpikeEvent] = []
        self._last_step = -1
        self._next_image = heatmap_every
        self._history: dict[int, dict[str, float]] = {}
        self._kinds: dict[str, str] = {}
        self._warned = False
        self.images_logged = 0

    # ---------------------------------------------------------------- the sink interface

    def open(self, meta: Mapping[str, Any]) -> None:
        super().open(meta)
        wandb = _wandb()
        if self.run is None:
            self.run = wandb.init(**self.init)
        config = {f"gradlens/{k}": v for k, v in meta.items() if k != "layers"}
        self._guard(lambda: self.run.config.update(config, allow_val_change=True))

    def write_stats(self, rows: Sequence[StatRow]) -> None:
        self._ensure_open()
        self._rows.extend(rows)

    def write_events(self, events: Sequence[SpikeEvent]) -> None:
        self._ensure_open()
        self._events.extend(events)

    def flush(self) -> None:
        self._check_not_closed()
        if not self._opened:
            self.open({})
        by_step: dict[int, list[StatRow]] = defaultdict(list)
        for r in self._rows:
            by_step[int(r[0])].append(r)
        ev_by_step: dict[int, list[SpikeEvent]] = defaultdict(list)
        for e in self._events:
            ev_by_step[int(e.step)].append(e)
        self._all_events.extend(self._events)
        self._rows, self._events = [], []
        for step in sorted(set(by_step) | set(ev_by_step)):
            rows, events = by_step.get(step, []), ev_by_step.get(step, [])
            if step <= self._last_step:
                self.rows_dropped += len(rows) + len(events)
                continue
            data = self._scalars(rows)
            for e in events:
                key = f"gradlens/spikes/{e.kind}"
                data[key] = data.get(key, 0) + 1
            self._remember(step, rows)
            if self.heatmap_every and step >= self._next_image and self._history:
                image = self._heatmap()
                if image is not None:
                    data[f"gradlens/heatmap/{self.heatmap_stat}"] = image
                    self.images_logged += 1
                self._next_image = (step // self.heatmap_every + 1) * self.heatmap_every
            if data and self._guard(lambda d=data, s=step: self.run.log(d, step=s)):
                self._last_step = step
            elif data:
                self.rows_dropped += len(rows) + len(events)

    def close(self, ended: str | None = None) -> None:
        if self.closed:
            return
        if self._opened:
            self.flush()
            if self._all_events:
                self._guard(self._log_events)
            if self._own and self.run is not None:
                code = 0 if ended in (None, "finished") else 1
                self._guard(lambda: self.run.finish(exit_code=code))
        super().close(ended)

    # ---------------------------------------------------------------- helpers

    def _guard(self, fn) -> bool:
        """Run a W&B call; an error warns once and never reaches the training loop."""
        try:
            fn()
            return True
        except Exception as err:  # W&B's errors are not ours to raise
            if not self._warned:
                self._warned = True
                warnings.warn(f"gradlens WandbSink: W&B failed ({type(err).__name__}: {err}); "
                              "training goes on, the rows are counted as dropped",
                              RuntimeWarning, stacklevel=3)
            return False

    def _kind(self, layer: str, role: str) -> str:
        k = self._kinds.get(layer)
        if k is None:
            k = self._kinds[layer] = layer_kind(layer, role)
        return k

    def _scalars(self, rows: Sequence[StatRow]) -> dict[str, Any]:
        data: dict[str, Any] = {}
        per_kind: dict[tuple[str, str], list[float]] = defaultdict(list)
        for _, layer, role, stat, value in rows:
            v = float(value)
            if layer == GLOBAL:
                data[f"gradlens/{stat}"] = v
                continue
            if self.per_layer:
                data[f"gradlens/{stat}/{layer}"] = v
            if math.isfinite(v):
                per_kind[(stat, self._kind(layer, role))].append(v)
        for (stat, kind), vals in per_kind.items():
            data[f"gradlens/by_kind/{stat}/{kind}"] = float(np.median(vals))
        return data

    def _remember(self, step: int, rows: Sequence[StatRow]) -> None:
        vals = {str(r[1]): float(r[4]) for r in rows
                if r[3] == self.heatmap_stat and r[1] != GLOBAL}
        for r in rows:
            if r[1] != GLOBAL:
                self._kind(str(r[1]), str(r[2]))
        if vals:
            self._history[step] = vals
            while len(self._history) > self.heatmap_steps:
                del self._history[min(self._history)]

    def heatmap_array(self) -> tuple[list[str], list[int], np.ndarray]:
        """``(layers, steps, values)`` the next image shows: layers grouped by kind (first
        seen order inside), the kept steps, NaN where a layer has no value."""
        steps = sorted(self._history)
        seen = list(dict.fromkeys(n for s in steps for n in self._history[s]))
        rank = {k: i for i, k in enumerate(KINDS)}
        layers = sorted(seen, key=lambda n: (rank.get(self._kinds.get(n, "other"), 99),
                                             seen.index(n)))
        values = np.array([[self._history[s].get(n, math.nan) for s in steps] for n in layers])
        return layers, steps, values

    def _heatmap(self) -> Any:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import to_rgb
        from matplotlib.figure import Figure

        layers, steps, values = self.heatmap_array()
        if not layers:
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            shown = np.where(values > 0, np.log10(values), np.nan)
        fig = Figure(figsize=(8, max(2.5, 0.12 * len(layers) + 1)), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_axes((0.06, 0.12, 0.82, 0.8))
        band = fig.add_axes((0.02, 0.12, 0.03, 0.8))
        im = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, len(layers) - 0.5, -0.5))
        kinds = [self._kinds.get(n, "other") for n in layers]
        band.imshow(np.array([[to_rgb(KIND_COLORS.get(k, "#7f7f7f"))] for k in kinds]),
                    aspect="auto", interpolation="nearest")
        band.set_xticks([])
        band.set_yticks([kinds.index(k) for k in dict.fromkeys(kinds)], list(dict.fromkeys(kinds)),
                        fontsize=6)
        ax.set_yticks([])
        ax.set_xlabel("step")
        ax.set_title(f"log10 {self.heatmap_stat}, {len(layers)} layers by kind")
        fig.colorbar(im, cax=fig.add_axes((0.9, 0.12, 0.02, 0.8)))
        fig.canvas.draw()
        pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
        return _wandb().Image(pixels, caption=f"{self.heatmap_stat}, steps {steps[0]}-"
                                              f"{steps[-1]}")

    def _log_events(self) -> None:
        wandb = _wandb()
        cols = ["step", "layer", "kind", "value", "score", "layers"]
        table = wandb.Table(columns=cols, data=[
            [int(e.step), e.layer, e.kind, float(e.value), float(e.score),
             ",".join(getattr(e, "layers", ()) or ())] for e in self._all_events])
        self.run.log({"gradlens/spike_events": table}, step=max(self._last_step, 0))
