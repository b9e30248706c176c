r"""The spike guard: skip or damp the optimizer step the spike detector flags, on device.

:class:`SpikeGuard` runs after the spikes family, every step, inside the optimizer's step
pre-hook (single process: the detectors run there, before ``optimizer.step()``). With the
detector's flags ``f_k`` (per layer ``k`` and the global norm) and each layer's action
``a_k`` (from ``policy``, by layer pattern or role):

    skip:  gate = prod_{k: a_k = skip} (1 - f_k)           (0: no parameter or state change)
    damp:  g_k <- d_k g_k,   d_k = min(1, exp(l_k) / ||g_k||)   where f_k and a_k = damp

``l_k`` is the detector's forecast of ``log ||g_k||`` made before this step (level plus
slope, :func:`gradlens.stats.zscore_update`), and ``||g_k||`` the raw norm the detector
reads (before clipping): without an edit a damped gradient has the norm the detector
expected; after clipping the consumed gradient is scaled by the same ratio. A flagged global
norm with action ``damp`` scales every tracked gradient by ``min(1, exp(l_global) /
||g'||)``, ``g'`` the raw gradient after the per-layer damping. A step
whose gradient has a non-finite entry (which never enters a detector) is skipped when
``nonfinite="skip"``. Everything is a device tensor: nothing is read on the host; the gate
is written in place into the tensor the optimizer reads (``step_gate`` groups of the
gradlens optimizers, :class:`gradlens.optim.GatedOptimizer` for ``torch.optim`` ones).

The statistics of a step describe its gradient before the guard acts. Guarded steps are
``guarded_step`` events (``value``: the damping factor, 0 for a skipped step; ``score``: the
detector's z-score; ``reason``: ``skip`` or ``damp``).

Under torch.distributed the detectors run after the flush's reduction, too late for the
step: the guard refuses to run there.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from typing import Any

import torch

from gradlens.families.base import Statistic, StepContext
from gradlens.kinds import KINDS, layer_kind
from gradlens.schema import GLOBAL, SpikeEvent

__all__ = ["GUARD_ACTIONS", "SpikeGuard"]

GUARD_ACTIONS = ("skip", "damp", "none")
_ROLES = ("embedding", "output", "hidden", "vector", *KINDS)  # internal roles and the kinds


def _check_action(action: str, where: str) -> str:
    if action not in GUARD_ACTIONS:
        raise ValueError(f"SpikeGuard: {where}={action!r}; use one of {list(GUARD_ACTIONS)}")
    return action


class SpikeGuard(Statistic):
    """Act on the spike detector's flags before the optimizer steps (see the module docstring).

    Args:
        policy: one action for every layer (``"skip"``, ``"damp"``, ``"none"``), or a mapping
            from layer kinds (:data:`gradlens.kinds.KINDS`: ``embedding``, ``attention``,
            ``mlp``, ``norms``, ``output``, ``other``; the internal roles ``hidden`` and
            ``vector`` too) or fnmatch
            patterns on layer (parameter or module) names to actions; the first matching
            key in the mapping's order wins, unmatched layers get ``"none"``. A pattern that
            matches no tracked layer is a ``ValueError``.
        global_action: the action on a flag of the global norm (default: ``policy`` when it
            is one action, else ``"none"``).
        nonfinite: ``"skip"`` (default) skips a step with a non-finite gradient entry in a
            tracked layer; ``"none"`` leaves it to the optimizer (or the GradScaler).

    Use: ``GradLens(model, optimizer, guard=SpikeGuard("skip"))``. The lens puts the guard's
    gate into the optimizer: every group's ``step_gate`` for the gradlens optimizers, or
    ``set_gate`` of a :class:`~gradlens.optim.GatedOptimizer` (pass the wrapper to the lens);
    a plain ``torch.optim`` optimizer supports only ``damp``.
    """

    name = "guard"
    needs = frozenset({"step_grad"})
    every_step = True

    def __init__(self, policy: str | Mapping[str, str] = "skip", *,
                 global_action: str | None = None, nonfinite: str = "skip") -> None:
        if isinstance(policy, str):
            self.policy: dict[str, str] = {"*": _check_action(policy, "policy")}
            default_global = policy
        else:
            self.policy = {str(k): _check_action(v, f"policy[{k!r}]") for k, v in policy.items()}
            default_global = "none"
        self.global_action = _check_action(global_action or default_global, "global_action")
        if nonfinite not in ("skip", "none"):
            raise ValueError(f"SpikeGuard: nonfinite={nonfinite!r}; use 'skip' or 'none'")
        self.nonfinite = nonfinite
        self.gate: torch.Tensor | None = None

    # ------------------------------------------------------------------ setup

    def bind(self, lens) -> None:
        super().bind(lens)
        if lens.world > 1:
            raise ValueError(
                "SpikeGuard needs a single process: under torch.distributed the spike "
                "detectors run after the flush's all-reduce, after the optimizer has stepped")
        self.actions = [self._action_of(i) for i in lens.layers]
        for key in self.policy:
            if key != "*" and key not in _ROLES and not any(
                    fnmatch.fnmatchcase(i.name, key) or fnmatch.fnmatchcase(i.module_name, key)
                    for i in lens.layers):
                raise ValueError(f"SpikeGuard: policy pattern {key!r} matches no tracked "
                                 "layer")
        self._forecast: torch.Tensor | None = None
        uses_gate = "skip" in self.actions or self.global_action == "skip" \
            or self.nonfinite == "skip"
        if uses_gate:
            device = lens.layers[0].param.device if lens.layers else torch.device("cpu")
            self.gate = torch.ones((), dtype=torch.float32, device=device)
            self._attach(lens.optimizer)

    def _action_of(self, info) -> str:
        for key, action in self.policy.items():
            if key in _ROLES:
                if key in (info.role.value, layer_kind(info.name, info.role.value)):
                    return action
            elif fnmatch.fnmatchcase(info.name, key) or fnmatch.fnmatchcase(info.module_name,
                                                                              key):
                return action
        return "none"

    def _attach(self, optimizer: Any) -> None:
        from gradlens.optim import GatedOptimizer, check_step_gate

        if optimizer is None:
            raise ValueError("SpikeGuard with 'skip' needs the optimizer: GradLens(model, "
                             "optimizer, guard=...)")
        if isinstance(optimizer, GatedOptimizer):
            optimizer.set_gate(self.gate)
            self._detach = lambda: optimizer.set_gate(None)
            return
        groups = optimizer.param_groups
        if not all("step_gate" in g for g in groups):
            raise ValueError(
                f"SpikeGuard: {type(optimizer).__name__} has no step_gate option; wrap it: "
                "GradLens(model, GatedOptimizer(optimizer), guard=...) and step the wrapper "
                "(or use policy='damp', which needs no gate)")
        for g in groups:
            check_step_gate(self.gate, g["params"])
            g["step_gate"] = self.gate

        def detach() -> None:
            for g in groups:
                if g.get("step_gate") is self.gate:
                    g["step_gate"] = None

        self._detach = detach

    def install(self, lens) -> None:
        """The lens's ``close()`` takes the gate out of the optimizer (a last skipped step
        must not leave it at 0)."""
        if self.gate is not None:
            lens.observer.add(_Handle(self._detach))

    # ------------------------------------------------------------------ the step

    def observe(self, ctx: StepContext) -> None:
        """Keep the detector's forecast of ``log ||g||`` made before this step."""
        state = getattr(self.lens.family("spikes"), "state", {})
        fc = state.get("grad_mean")
        self._forecast = None if fc is None else fc[..., 0] + fc[..., 1]

    def emit(self, ctx: StepContext, red, out) -> None:
        lens = self.lens
        L = len(lens.layers)
        flags = out["_flags"]  # (L+1,) 0/1 floats, from the spikes family
        norm = out["grad_norm_preclip"]  # what the detector judged: the raw norm
        one = torch.ones((), dtype=flags.dtype, device=flags.device)
        skip_w = lens.flags([a == "skip" for a in self.actions]).to(flags.dtype)
        damp_w = lens.flags([a == "damp" for a in self.actions]).to(flags.dtype)
        layer_f = flags[:L]
        # gate: 0 when a skip-layer (or the global norm, under "skip") fires
        keep = torch.prod(1.0 - layer_f * skip_w)
        if self.global_action == "skip":
            keep = keep * (1.0 - flags[L])
        if self.nonfinite == "skip":
            keep = keep * (ctx.nonfinite.sum() == 0).to(keep.dtype)
        factor = torch.ones(L, dtype=flags.dtype, device=flags.device)
        if self._forecast is not None and any(self._damps(k) for k in range(L)):
            level = torch.exp(self._forecast.to(flags.dtype))
            ratio = torch.where(norm > 0, level / norm, one).clamp(max=1.0).nan_to_num(1.0)
            factor = torch.where((layer_f * damp_w) > 0, ratio[:L], factor)
            if self.global_action == "damp":
                sq = torch.nan_to_num(norm[:L].square()) * factor.square()
                g_ratio = (level[L] / sq.sum().sqrt()).clamp(max=1.0).nan_to_num(1.0)
                factor = factor * torch.where(flags[L] > 0, g_ratio, one)
            grads = [i.param.grad for i in lens.layers]
            for k in range(L):
                if grads[k] is not None and self._damps(k):
                    grads[k].mul_(factor[k].to(grads[k].dtype))  # in place, on device
        if self.gate is not None:
            self.gate.copy_(keep)
        out["_guard"] = torch.cat([factor * keep, keep.reshape(1)])

    def _damps(self, k: int) -> bool:
        return self.actions[k] == "damp" or self.global_action == "damp"

    def events(self, step: int, values: dict[str, list[float]],
               present: list[bool]) -> list[SpikeEvent]:
        names = [i.name for i in self.lens.layers]
        L = len(names)
        guard, z = values.get("_guard"), values["grad_norm_z"]
        if guard is None:  # a step finalized before the guard was enabled
            return []
        if guard[L] == 0:
            return [SpikeEvent(step, GLOBAL, "guarded_step", 0.0, _finite(z[L]),
                               reason="skip")]
        out = [SpikeEvent(step, names[k], "guarded_step", guard[k], _finite(z[k]),
                          reason="damp")
               for k in range(L) if present[k] and guard[k] < 1.0]
        return out


class _Handle:
    """A removable handle (the observer removes every handle at ``close()``)."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def remove(self) -> None:
        self.fn()


def _finite(x: float) -> float:
    return x if math.isfinite(x) else math.nan
