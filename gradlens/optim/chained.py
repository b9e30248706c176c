"""Several optimizers over disjoint parameter sets, driven as ONE ``torch.optim.Optimizer``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["ChainedOptimizer"]


class _ChainedState(MutableMapping[Tensor, Any]):
    """``optimizer.state`` of a :class:`ChainedOptimizer`: a live view of the children's states.

    ``state[p]`` reads (or, like torch's ``defaultdict``, creates) the entry of the child that
    owns ``p``; iteration and ``len`` cover every child.
    """

    def __init__(self, optimizers: Sequence[Optimizer]) -> None:
        self._optimizers = optimizers

    def _owner(self, p: Tensor) -> Optimizer:
        for o in self._optimizers:
            if p in o.state:
                return o
        for o in self._optimizers:
            if any(q is p for g in o.param_groups for q in g["params"]):
                return o
        raise KeyError(p)

    def __getitem__(self, p: Tensor) -> Any:
        return self._owner(p).state[p]

    def __setitem__(self, p: Tensor, value: Any) -> None:
        self._owner(p).state[p] = value

    def __delitem__(self, p: Tensor) -> None:
        del self._owner(p).state[p]

    def __contains__(self, p: object) -> bool:
        return any(p in o.state for o in self._optimizers)

    def __iter__(self) -> Iterator[Tensor]:
        for o in self._optimizers:
            yield from o.state

    def __len__(self) -> int:
        return sum(len(o.state) for o in self._optimizers)


class ChainedOptimizer(Optimizer):
    """Optimizers over disjoint parameter sets that behave as one optimizer.

    - ``param_groups`` is the union of the children's groups: the *same* dicts, so an
      ``lr_scheduler`` (``LambdaLR``, ``CosineAnnealingLR``, ...) built on the chained optimizer
      schedules every child, each group from its own initial ``lr``.
    - ``step(closure)`` evaluates the closure once, then steps every child in order. Hooks
      registered with ``register_step_pre_hook`` / ``register_step_post_hook`` on the chained
      optimizer run once per chained step; hooks on a child run when that child steps.
    - ``zero_grad`` zeroes every child; ``state`` is a live view of the children's states (so
      :func:`gradlens.optim.optimizer_state_numel` counts them all).
    - ``state_dict()`` is ``{"optimizers": [child.state_dict(), ...]}``; ``load_state_dict``
      loads each child and re-links ``param_groups`` (torch replaces a child's group dicts when
      it loads). State-dict hooks run on the children, not on the chained optimizer.

    Parameters must be disjoint across children (checked). To add a group later, add it to a
    child (``chained.optimizers[i].add_param_group(...)``) and call :meth:`refresh_param_groups`.

    Args:
        optimizers: the children, stepped in this order.
    """

    def __init__(self, optimizers: Sequence[Optimizer]) -> None:
        children = list(optimizers)
        if not children:
            raise ValueError("ChainedOptimizer needs at least one optimizer")
        for o in children:
            if not isinstance(o, Optimizer):
                raise TypeError(f"ChainedOptimizer takes torch optimizers, got {type(o).__name__}")
        self.optimizers = children
        self._linking = True
        # torch's __init__ validates the union (no parameter in two groups) and appends the
        # children's own group dicts to self.param_groups.
        super().__init__([g for o in children for g in o.param_groups], {})
        self._linking = False
        self.state = _ChainedState(self.optimizers)  # type: ignore[assignment]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only used while linking the children's groups; add new groups to a child instead."""
        if not getattr(self, "_linking", False):
            raise RuntimeError(
                "ChainedOptimizer: add the group to one of its children, e.g. "
                "chained.optimizers[i].add_param_group(group), then call "
                "chained.refresh_param_groups()"
            )
        super().add_param_group(param_group)

    def refresh_param_groups(self) -> None:
        """Re-link ``param_groups`` (in place) to the children's current group dicts."""
        groups = [g for o in self.optimizers for g in o.param_groups]
        seen: set[int] = set()
        for g in groups:
            for p in g["params"]:
                if id(p) in seen:
                    raise ValueError(
                        "ChainedOptimizer: a parameter appears in more than one child optimizer"
                    )
                seen.add(id(p))
        self.param_groups[:] = groups

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Evaluate ``closure`` (if any) once, then step every child in order."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``zero_grad`` of every child."""
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """``{"optimizers": [child.state_dict() for each child]}``."""
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load each child's state (same children, same order), then re-link ``param_groups``."""
        saved = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if not isinstance(saved, list) or len(saved) != len(self.optimizers):
            n = len(saved) if isinstance(saved, list) else "no"
            raise ValueError(
                f"ChainedOptimizer.load_state_dict: expected {{'optimizers': [...]}} with "
                f"{len(self.optimizers)} entries, got {n}; was it saved from a "
                "ChainedOptimizer with the same children?"
            )
        for o, sd in zip(self.optimizers, saved, strict=True):
            o.load_state_dict(sd)
        self.refresh_param_groups()

    def __getstate__(self) -> dict[str, Any]:
        return {
            "defaults": self.defaults,
            "optimizers": self.optimizers,
            "param_groups": self.param_groups,
            "state": self.state,
            "_linking": False,
        }

    def __repr__(self) -> str:
        inner = ",\n".join("  " + repr(o).replace("\n", "\n  ") for o in self.optimizers)
        return f"{type(self).__name__}(\n{inner}\n)"
