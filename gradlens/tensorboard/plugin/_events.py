"""The rows of a run's ``spikes.jsonl``, as the plugin serves them."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["read_events"]


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of ``spikes.jsonl``; a damaged line (a live run's partial last line,
    or worse) is skipped, never raised: the dashboard shows what can be read."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            yield {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                   for k, v in rec.items()}
