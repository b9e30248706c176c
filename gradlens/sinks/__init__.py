"""gradlens.sinks: where the collector's records go.

- :class:`~gradlens.sinks.table.TableSink`: ``run.json``, the long table (csv, jsonl, parquet)
  and ``spikes.jsonl``, kill-safe;
- :class:`~gradlens.tensorboard.sink.TensorBoardSink`: scalars, histograms, spike text and the
  custom-scalar dashboards (imported on first use: it loads TensorBoard);
- :class:`~gradlens.sinks.wandb_sink.WandbSink`: Weights & Biases (global and per-kind scalars,
  spike events, a heatmap image; imported on first use; ``pip install gradlens[wandb]``);
- :class:`~gradlens.sinks.memory.MemorySink`: lists and a DataFrame, for tests and notebooks;
- :class:`~gradlens.sink_api.Sink` (the interface) and :class:`~gradlens.sinks.base.MultiSink`;
- :mod:`~gradlens.sinks.defaults`: what a lens writes by default (installed on import).
"""

from __future__ import annotations

from typing import Any

from gradlens.sinks import defaults  # noqa: F401  (installs the lens's default sinks)
from gradlens.sinks.base import (
    Histogram,
    LogdirError,
    MultiSink,
    Sink,
    StatRow,
    StatRows,
    layer_group,
)
from gradlens.sinks.memory import MemorySink
from gradlens.sinks.table import TableSink

__all__ = [
    "Histogram",
    "LogdirError",
    "MemorySink",
    "MultiSink",
    "Sink",
    "StatRow",
    "StatRows",
    "TableSink",
    "TensorBoardSink",
    "WandbSink",
    "layer_group",
]


def __getattr__(name: str) -> Any:
    if name == "TensorBoardSink":
        from gradlens.tensorboard.sink import TensorBoardSink

        return TensorBoardSink
    if name == "WandbSink":
        from gradlens.sinks.wandb_sink import WandbSink

        return WandbSink
    raise AttributeError(f"module 'gradlens.sinks' has no attribute {name!r}")
