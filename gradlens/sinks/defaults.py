"""The sinks a lens writes by default, handed to the collector (``core.run``) from above.

With a ``logdir``: the table (first) and, unless ``tensorboard=False``, TensorBoard, after any
sinks given; without one and without sinks: an in-memory sink (``lens.memory``). Importing
``gradlens.sinks`` installs this builder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradlens.core import run
from gradlens.sinks.base import Sink
from gradlens.sinks.memory import MemorySink
from gradlens.sinks.table import TableSink

__all__ = ["default_sinks"]


def default_sinks(logdir: Path | None, sinks: list[Sink], table_format: str | None,
                  tensorboard: bool) -> tuple[list[Sink], Any]:
    """``(sinks, memory sink or None)`` for a lens on the writing rank."""
    if logdir is not None:
        sinks.insert(0, TableSink(logdir, format=table_format))
        if tensorboard:
            from gradlens.tensorboard.sink import TensorBoardSink

            sinks.append(TensorBoardSink(logdir))
        return sinks, None
    if not sinks:
        memory = MemorySink()
        return [memory], memory
    return sinks, None


run.use_default_sinks(default_sinks)
