"""Once-per-backward work without a Python call per tensor, and hooks that exist on logged steps only.

**The route.** The observer's end-of-backward callback (:mod:`gradlens.core.observer`) must be
queued during every backward pass that accumulates into the tracked gradients. A hook per
parameter does that at the price of a Python call per tensor per backward (1.2-1.8 us each in
torch 2.13: at 291 tensors and 2 micro-batches, ~1 ms per step). The route does it with a
constant number of calls: the model's forward hook registers a gradient hook on the output
tensors of that forward (a handful), and the first of them to fire in a backward pass arms
the callback (once per graph task: autograd's graph task id tells the passes apart).

That is right only if every backward that reaches the tracked parameters passes through the
model's output. So the route is **verified before it is trusted**: until a step with
gradients has been finalized, the per-parameter hooks stay too, and each of them checks that
the route fired in its own graph task. If one did not (a compiled training step traces the
forward hook; a loop that calls a submodule, not the model; ``torch.autograd.grad``; a
reentrant checkpoint's inner backward), the route is dropped for good and the per-parameter
hooks stay. After the check one post-accumulate hook stays on one tracked parameter (the
sentinel, one call per backward): a backward that reaches it without the route arms the
callback itself and puts the per-parameter hooks back from the next step on (a backward
missed at a parameter other than the sentinel changes ``p.grad`` after the last measurement:
the step's version check reads it as an edit, so nothing built on it is written unchecked).

**Logged-step hooks** (:class:`HookGroup`): hooks whose work serves logged steps only (the
micro-batch gradient hooks, the batch-size pre-hooks, the per-example forward hooks) are
installed when the next step is logged and removed after it, so unlogged steps make no call
into them; those hooks may then skip the checks that the step is logged and not compiled
(plain functions, made once per mode: a group's ``key``). Never under torch.compile (hooks
added after a trace are not traced in: the route is then off and every group stays
installed, with its checked hooks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

try:  # dynamo's per-code-object switch (torch.compiler.disable flips it per call instead)
    from torch._C._dynamo.eval_frame import (
        _FrameAction,
        _FrameExecStrategy,
        set_code_exec_strategy,
    )
except (ImportError, AttributeError):  # pragma: no cover - a torch without it
    set_code_exec_strategy = None

_MAX_OUTPUTS = 8  # output tensors hooked per forward (a loss, logits, a few hidden states)


def graph_task() -> int:
    """Autograd's id of the backward pass running now (-1 outside one)."""
    return torch._C._current_graph_task_id()


def never_traced(fn: Callable) -> bool:
    """Tell dynamo never to trace ``fn``'s frames nor the frames they call, once for its code
    object (every closure made from it): what ``torch.compiler.disable`` does, without its
    wrapper (~1 us per call). A hook that exists while the model runs eagerly can still be
    called inside a compiled training step (one compiled after eager steps): it then runs
    eagerly. False where this torch has no such switch."""
    if set_code_exec_strategy is None:
        return False
    try:
        set_code_exec_strategy(fn.__code__, _FrameExecStrategy(_FrameAction.SKIP,
                                                               _FrameAction.SKIP))
    except (TypeError, RuntimeError, AttributeError):  # pragma: no cover - another signature
        return False
    return True


def output_tensors(output: Any, limit: int = _MAX_OUTPUTS) -> list[torch.Tensor]:
    """Tensors that require grad in a forward's output, two levels deep (a tensor, a tuple or
    dict of them, an HF ``ModelOutput``, tuples inside those), at most ``limit``.

    A plain recursive function, not a closure: a closure that calls itself is a reference
    cycle, and its cell would keep the found outputs (the logits) alive until the garbage
    collector runs, a few hundred MB per step at a 32k vocabulary."""
    found: list[torch.Tensor] = []
    _visit(output, 0, found, limit)
    return found


def _visit(v: Any, depth: int, found: list[torch.Tensor], limit: int) -> None:
    if len(found) >= limit:
        return
    if torch.is_tensor(v):
        if v.requires_grad:
            found.append(v)
    elif depth < 2 and isinstance(v, dict | list | tuple):
        for x in v.values() if isinstance(v, dict) else v:
            _visit(x, depth + 1, found, limit)


class Route:
    """Arms ``arm()`` once per backward pass that goes through ``model``'s output."""

    def __init__(self, arm: Callable[[], None]) -> None:
        self._arm = arm
        self.task = -1  # graph task in which the route last fired
        self.missed = False  # a tracked gradient accumulated in a pass the route did not arm

    def install(self, model: nn.Module) -> Any:
        return model.register_forward_hook(self._on_output)

    def _on_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        if torch.compiler.is_compiling() or not torch.is_grad_enabled():
            return
        for t in output_tensors(output):
            t.register_hook(self._fired)

    def _fired(self, grad: torch.Tensor) -> None:
        task = graph_task()
        if task != self.task:
            self.task = task
            self._arm()

    def check(self) -> None:
        """Called by a per-parameter hook: was this backward armed by the route?"""
        if graph_task() != self.task:
            self.missed = True


class HookGroup:
    """Hooks installed together and removed together: ``installers`` are called with no
    argument and return the handles they registered. ``key``: the mode the installers
    made their hooks for (a new key installs them again)."""

    def __init__(self) -> None:
        self._installers: list[Callable[[], Iterable[Any]]] = []
        self._handles: list[Any] = []
        self.on = False
        self.key: Any = None

    def add(self, installer: Callable[[], Iterable[Any]]) -> None:
        self._installers.append(installer)
        if self.on:
            self._handles += list(installer())

    def set(self, on: bool, key: Any = None) -> None:
        if on == self.on and (not on or key == self.key):
            return
        self.remove()
        if on:
            self.on, self.key = True, key
            for installer in self._installers:
                self._handles += list(installer())

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.on = False
