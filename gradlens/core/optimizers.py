"""The optimizers a lens finalizes its steps in: one or several, plain or wrapped.

- **Wrappers** (accelerate's ``AcceleratedOptimizer``, :class:`gradlens.optim.GatedOptimizer`):
  the step pre-hook goes on the innermost ``torch.optim.Optimizer`` (``.optimizer``). accelerate
  calls its wrapper's ``step()`` at every micro-batch but the inner ``step()`` only when
  ``accelerator.sync_gradients`` (and not when its GradScaler skips the step), so hooking the
  inner optimizer counts one lens step per real optimizer step.
- **Several optimizers** (``GradLens(model, [muon, adamw])``): one training step is one lens
  step. The lens finalizes in the pre-hook of the first optimizer to step after a backward
  pass, before any of them has stepped or zeroed its gradients; the pre-hooks of the others
  in the same training step do nothing. (Without a backward seen since the last step, an
  optimizer stepping a second time opens the next lens step.)
- **Coverage**: when the lens hooks the optimizers, a tracked layer that none of them owns may
  be stepped and zeroed by another optimizer before the lens reads it, and a layer whose
  gradient is None at the step although a backward pass reached it was zeroed before the
  lens read it. The lens cannot see such a layer's gradient: its rows and every ``global``
  row are NaN, with a ``validity`` event naming the layers (never a global norm over part of
  the model).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from gradlens.core.lens import GradLens

_MAX_NAMED = 4


def hook_target(optimizer: Any, argument: str = "optimizer") -> torch.optim.Optimizer:
    """The innermost ``torch.optim.Optimizer`` of ``optimizer`` (through ``.optimizer``
    attributes of wrappers), the one whose ``step()`` runs only on real steps."""
    seen: list[int] = []
    opt = optimizer
    while "_optimizer_step_pre_hooks" not in getattr(opt, "__dict__", {}):  # torch's, set up
        inner = getattr(opt, "optimizer", None)
        seen.append(id(opt))
        if inner is None or id(inner) in seen or len(seen) > 8:
            raise TypeError(f"{argument} must be a torch.optim.Optimizer or a wrapper of one "
                            "with an .optimizer attribute (accelerate's AcceleratedOptimizer), "
                            f"or a list of them; got {type(optimizer).__name__}")
        opt = inner
    return opt


def as_list(optimizer: Any) -> list[Any]:
    """``None`` -> ``[]``, one optimizer -> ``[it]``, a list or tuple -> a list (validated)."""
    if optimizer is None:
        return []
    if isinstance(optimizer, (list, tuple)):
        if not optimizer:
            raise ValueError("optimizer: got an empty list; pass None or the optimizers")
        for j, opt in enumerate(optimizer):
            hook_target(opt, f"optimizer[{j}]")
        return list(optimizer)
    hook_target(optimizer)
    return [optimizer]


class OptimizerSet:
    """Several optimizers seen as one by the lens's families: ``param_groups`` (the same
    dicts), ``state`` (a lookup in each optimizer's state) and ``optimizers``."""

    def __init__(self, optimizers: Sequence[Any]) -> None:
        self.optimizers = list(optimizers)
        self.state = _States([o.state for o in self.optimizers])

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def name(self) -> str:
        return "+".join(type(o).__name__ for o in self.optimizers)


class _States:
    def __init__(self, states: list[Any]) -> None:
        self._states = states

    def get(self, p: torch.Tensor, default: Any = None) -> Any:
        for st in self._states:
            if p in st:
                return st[p]
        return default


def optimizer_name(optimizer: Any) -> str | None:
    if optimizer is None:
        return None
    if isinstance(optimizer, OptimizerSet):
        return optimizer.name
    return type(optimizer).__name__


class StepHooks:
    """Step pre-hooks on the optimizers' inner torch optimizers; finalizes one lens step per
    training step, and names the tracked layers the lens cannot see (module docstring)."""

    def __init__(self, lens: GradLens, optimizers: Sequence[Any]) -> None:
        self.lens = lens
        self.targets = [hook_target(o) for o in optimizers]
        self._stepped: set[int] = set()
        owned = {id(p) for t in self.targets for g in t.param_groups for p in g["params"]}
        self.unowned = [k for k, info in enumerate(lens.layers) if id(info.param) not in owned]

    def install(self) -> None:
        for t in self.targets:
            self.lens.observer.add(t.register_step_pre_hook(self._pre_hook))

    @torch.compiler.disable  # eager, outside any compiled step: guards on nothing
    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        lens = self.lens
        if lens._closed:
            return
        key = id(optimizer)
        lens._stepped = True
        if (len(self.targets) > 1 and self._stepped and key not in self._stepped
                and not lens.step_open()):
            self._stepped.add(key)  # a later optimizer of the same training step
            return
        self._stepped = {key}
        lens._finalize(skipped=False)

    def blind(self, present: list[bool], micro_seen: list[int]) -> dict[int, str]:
        """``{layer: reason}`` of the tracked layers whose gradient the lens cannot see at
        this step (empty when no layer has a gradient: nothing is written then)."""
        names = self.lens.layers
        out: dict[int, str] = {}
        if self.unowned:
            why = (f"{_names(names, self.unowned)} belong to none of the optimizers given to "
                   "the lens (another optimizer may step and zero them before the lens reads "
                   "them): pass every optimizer, GradLens(model, [opt_a, opt_b]), or leave "
                   "them out with exclude=; the global rows are NaN")
            out.update(dict.fromkeys(self.unowned, why))
        gone = [] if all(present) else [
            k for k, (p, m) in enumerate(zip(present, micro_seen, strict=True))
            if not p and m > 0 and k not in out]
        if gone:
            why = (f"{_names(names, gone)} had no gradient at the optimizer step although a "
                   "backward pass reached them (set to None before the lens read them: an "
                   "optimizer the lens was not given?); the global rows are NaN")
            out.update(dict.fromkeys(gone, why))
        return out


def _names(layers: Sequence[Any], ks: list[int]) -> str:
    shown = ", ".join(layers[k].name for k in ks[:_MAX_NAMED])
    more = f" and {len(ks) - _MAX_NAMED} more" if len(ks) > _MAX_NAMED else ""
    return f"{len(ks)} tracked layer(s) ({shown}{more})"
