"""The SCALE paper's learning-rate schedule: linear warm-up, then cosine decay to a floor.

Stands alone (``torch.optim.lr_scheduler.LambdaLR`` over a closed form), like every optimizer
module here.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["cosine_lr_factor", "cosine_schedule"]


def cosine_lr_factor(step: int, total_steps: int, warmup_frac: float = 0.1,
                     min_ratio: float = 0.1) -> float:
    """The multiplier of the peak lr at optimizer step ``step`` (0-based).

    With ``W = round(warmup_frac * total_steps)`` warm-up steps:

    - ``step < W``: linear warm-up ``(step + 1) / W`` (step 0 already moves; step W-1 is at peak);
    - then ``min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2`` with
      ``p = (step - W) / max(1, total_steps - 1 - W)``, clipped to [0, 1]: the peak at step W,
      ``min_ratio`` at the last step ``total_steps - 1`` and after it.
    """
    warmup = round(warmup_frac * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total_steps - 1 - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def cosine_schedule(optimizer: Optimizer, total_steps: int, warmup_frac: float = 0.1,
                    min_ratio: float = 0.1) -> LambdaLR:
    """``LambdaLR`` applying :func:`cosine_lr_factor` to every param group's lr.

    The SCALE paper's schedule: 10% linear warm-up, cosine decay to 0.1 x peak. Call
    ``scheduler.step()`` once after each ``optimizer.step()``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= warmup_frac < 1.0:
        raise ValueError(f"warmup_frac must be in [0, 1), got {warmup_frac}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    return LambdaLR(optimizer, lambda s: cosine_lr_factor(s, total_steps, warmup_frac, min_ratio))
