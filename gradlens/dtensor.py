"""Sharded tensors (FSDP2 ``fully_shard``, tensor parallelism): the one ``DTensor`` check.

Shared by the lens (``core.distributed``), the families and the optimizers (``optim``), which
compute on a rank's local shard. Works on builds without ``torch.distributed`` (nothing is a
``DTensor`` there).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["dtensor_types", "is_dtensor", "local_tensor"]


@functools.lru_cache(maxsize=1)
def dtensor_types() -> tuple[type, type] | None:
    """``(DTensor, Shard)`` of ``torch.distributed.tensor``, or None without torch.distributed."""
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - very old torch
        return None
    return DTensor, Shard


def is_dtensor(t: Any) -> bool:
    """``isinstance(t, DTensor)``, False where torch.distributed is missing."""
    types = dtensor_types()
    return types is not None and isinstance(t, types[0])


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (a view: in-place ops update the DTensor), else ``t``."""
    return t.to_local() if is_dtensor(t) else t
