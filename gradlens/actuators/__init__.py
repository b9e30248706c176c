"""Actuators: what acts on the training from the lens's statistics, rather than measuring it.

:class:`~gradlens.actuators.guard.SpikeGuard` skips or damps the steps the spike detectors flag,
through the optimizer's device-side step gate (:mod:`gradlens.optim.gate`). An actuator reads
the families' results and runs after them; the collector (:mod:`gradlens.core`) calls it.
"""

from gradlens.actuators.guard import GUARD_ACTIONS, SpikeGuard

__all__ = ["GUARD_ACTIONS", "SpikeGuard"]
