r"""A device-side step gate: take an optimizer step or skip it, decided on the device.

A gate is a 0-d floating tensor on the parameters' device: 1.0 means "step normally", 0.0
means "skip": no parameter changes (weight decay included) and no optimizer state advances
(moments, step counters, every other buffer). A spike guard computes it on the device from the
step's statistics and the optimizer obeys it **without a host sync**: nothing reads its value
on the host, nothing branches on it in Python.

How a gated step is taken (here and in the gradlens optimizers' ``step_gate`` option)::

    snapshot = [x.clone() for x in every tensor the step writes]   # params and state
    <the ordinary step, in place>
    x <- where(gate != 0, x, snapshot)                             # per tensor, on device

The gate *selects*, it is never multiplied in: ``0 * NaN`` is NaN, and the step a guard skips
is typically the one whose gradient is not finite; a selection also makes ``gate = 1``
bit-identical to the ordinary step and ``gate = 0`` bit-identical to no step. The price: one
transient copy of the written tensors of the stepped group, one extra read and write of each.

:class:`GatedOptimizer` gives ``torch.optim`` optimizers the same guarantee from outside.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["GatedOptimizer", "check_step_gate", "gate_restore", "gate_snapshot"]


def check_step_gate(gate: Any, params: Iterable[Tensor]) -> None:
    """Raise ``ValueError`` unless ``gate`` is None or a 0-d floating tensor on ``params``' device.

    Reads only metadata (dtype, shape, device): no host sync.
    """
    if gate is None:
        return
    if not isinstance(gate, Tensor):
        raise ValueError(
            f"Invalid step_gate: step_gate={gate!r} (None or a 0-d tensor on the parameters' "
            "device, 1.0 to step and 0.0 to skip)"
        )
    if gate.ndim != 0 or not gate.is_floating_point():
        raise ValueError(
            f"Invalid step_gate: a {gate.ndim}-D {gate.dtype} tensor (must be a 0-d floating "
            "tensor, 1.0 to step and 0.0 to skip)"
        )
    for p in params:
        if p.device != gate.device:
            raise ValueError(
                f"Invalid step_gate: it lives on {gate.device}, a parameter on {p.device} (put "
                "the gate on the parameters' device: a cross-device read would sync)"
            )


def gate_snapshot(gate: Tensor | None, *tensor_lists: Sequence[Tensor]) -> list[Tensor] | None:
    """Clones of every tensor in ``tensor_lists`` when ``gate`` is set, else None (no cost)."""
    if gate is None:
        return None
    return [t.clone() for lst in tensor_lists for t in lst]


def gate_restore(
    gate: Tensor | None, snapshot: list[Tensor] | None, *tensor_lists: Sequence[Tensor]
) -> None:
    """Put back, in place, the snapshot of every tensor where ``gate == 0`` (on device)."""
    if gate is None or snapshot is None:
        return
    step = gate != 0
    tensors = [t for lst in tensor_lists for t in lst]
    for t, old in zip(tensors, snapshot, strict=True):
        torch.where(step, t, old, out=t)


def _state_tensors(state: dict[str, Any]) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


class GatedOptimizer:
    r"""Wrap a ``torch.optim`` optimizer so that ``step()`` obeys a device-side gate, sync-free.

    ``GatedOptimizer(optimizer, gate)`` (or ``gate=None`` and ``set_gate(...)`` later): before
    each ``step()`` it clones the parameters that have a gradient and every tensor in their
    optimizer state; after the inner ``step()`` it puts them back where ``gate == 0``
    (``torch.where``, on device). State that the inner optimizer creates lazily during a skipped
    step is reset to zeros (``step`` counters included), which is the state every supported
    optimizer starts from.

    Guarantees (tested for ``torch.optim.AdamW``, ``Adam`` (amsgrad too) and ``SGD`` with
    momentum, float64 on the CPU): a step with ``gate = 0`` leaves the parameters and every
    state tensor bit-identical, the first step included; ``gate = 1`` is bit-identical to the
    unwrapped step; the sequence (1, 0, 1) equals (1, 1) of the unwrapped optimizer. No value is
    read on the host.

    Limits:
        - Lazily created state must be equivalent to zeros: true for Adam/AdamW (zero moments,
          step 0) and for SGD with ``dampening=0`` (a zero buffer gives ``0*mu + g = g``, the
          buffer SGD creates). SGD with ``dampening != 0`` is refused, since its first buffer
          is ``g`` and a zero buffer would give ``(1 - dampening) g``.
        - On an accelerator, torch keeps Adam's ``step`` counters on the CPU unless
          ``capturable=True``; restoring a CPU counter from a device gate would sync. The
          wrapper therefore sets ``capturable=True`` on every group that has the option when
          the parameters are not on the CPU, and refuses groups that cannot (``fused``).
        - Only ``param_groups``' tensors and ``state`` are covered; Python-side state of the
          inner optimizer (e.g. counters kept in attributes) is not.
        - Costs one copy of the stepped parameters and their state per step, into buffers kept
          between steps (memory: one more copy of the parameters and their state), and one
          ``where`` per tensor (``benchmarks/bench_gated_step.py`` measures it).
        - It is not a ``torch.optim.Optimizer``: build schedulers on the inner optimizer
          (``gated.optimizer``), whose ``param_groups`` the wrapper shares.

    Args:
        optimizer: a ``torch.optim.Optimizer``.
        gate: the 0-d device gate (see :func:`check_step_gate`), or None (plain steps).
    """

    def __init__(self, optimizer: Optimizer, gate: Tensor | None = None) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"GatedOptimizer wraps a torch optimizer, got {type(optimizer)!r}")
        self.optimizer = optimizer
        self.gate: Tensor | None = None
        self._pool: dict[tuple[int, str], Tensor] = {}
        self.set_gate(gate)

    def set_gate(self, gate: Tensor | None) -> None:
        """Use ``gate`` from the next ``step()`` on (validated, see :func:`check_step_gate`)."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        check_step_gate(gate, params)
        if gate is not None:
            for group in self.optimizer.param_groups:
                self._prepare_group(group)
        self.gate = gate

    @staticmethod
    def _prepare_group(group: dict[str, Any]) -> None:
        if group.get("dampening", 0) != 0 and group.get("momentum", 0) != 0:
            raise ValueError(
                f"GatedOptimizer: SGD with dampening={group['dampening']} creates its momentum "
                "buffer as the raw gradient, which a skipped first step cannot undo; use "
                "dampening=0"
            )
        on_device = any(p.device.type != "cpu" for p in group["params"])
        if on_device and group.get("fused"):
            raise ValueError(
                "GatedOptimizer: fused=True keeps step counters where a device gate cannot "
                "restore them without a sync; use foreach or capturable=True"
            )
        if on_device and "capturable" in group:
            group["capturable"] = True

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The inner optimizer's ``param_groups`` (schedulers may use the wrapper's)."""
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        """The inner optimizer's ``state``."""
        return self.optimizer.state

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """The inner ``step(closure)``, undone on device where the gate is 0."""
        gate = self.gate
        if gate is None:
            return self.optimizer.step(closure)
        params = [p for g in self.optimizer.param_groups for p in g["params"]
                  if p.grad is not None]
        saved: list[tuple[Tensor, dict[str, Tensor] | None, Tensor]] = []
        sources: list[Tensor] = []
        buffers: list[Tensor] = []
        with torch.no_grad():
            for p in params:
                state = self.optimizer.state.get(p)
                tensors = _state_tensors(state) if state else {}
                old_p = self._buffer(p, "", p)
                old_state = {k: self._buffer(p, k, v) for k, v in tensors.items()}
                sources += [p.detach(), *tensors.values()]
                buffers += [old_p, *old_state.values()]
                saved.append((p, old_state or None, old_p))
            if sources:
                torch._foreach_copy_(buffers, sources)
        loss = self.optimizer.step(closure)
        with torch.no_grad():
            step = gate != 0
            for p, old_state, old_p in saved:
                torch.where(step, p, old_p, out=p.data)
                state = self.optimizer.state.get(p, {})
                for key, value in _state_tensors(state).items():
                    if old_state is not None and key in old_state:
                        torch.where(step, value, old_state[key], out=value)
                    else:  # created lazily by this step: back to its zero initial value
                        torch.where(step, value, torch.zeros_like(value), out=value)
        return loss

    def _buffer(self, p: Tensor, key: str, like: Tensor) -> Tensor:
        """The reusable snapshot buffer of ``(p, key)`` shaped like ``like``.

        Kept between steps: a fresh allocation per step measured ~5x slower than the copy on
        the CPU (page faults); on a GPU the caching allocator would hold the same memory."""
        buf = self._pool.get((id(p), key))
        if (buf is None or buf.shape != like.shape or buf.dtype != like.dtype
                or buf.device != like.device):
            buf = torch.empty_like(like, memory_format=torch.preserve_format)
            self._pool[(id(p), key)] = buf
        return buf

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The inner ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's ``state_dict()`` (the gate is not saved)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The inner ``load_state_dict``, then the gate's group settings again."""
        self.optimizer.load_state_dict(state_dict)
        if self.gate is not None:
            for group in self.optimizer.param_groups:
                self._prepare_group(group)

    def __getattr__(self, name: str) -> Any:
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __repr__(self) -> str:
        return f"GatedOptimizer({self.optimizer!r})"
