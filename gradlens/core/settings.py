"""The run's settings: the optimizer's class and hyperparameters (``run.json``) and the learning
rate of each parameter group at every logged step (the global statistic ``lr/<group>``).

A group is named by its ``name`` entry when it has one (torch.optim accepts extra keys), else
by its ``role`` (the gradlens optimizers' groups: ``embedding``, ``output``, ``matrices``,
``1d``), else by its index; duplicates get ``#index``.
Hyperparameters are the group's entries other than ``params`` whose values are numbers,
strings, booleans, None or tuples of them; a 0-d tensor (a tensor ``lr``) is read once, when
the run opens; other entries (a step gate tensor, callables) are left out and named in
``skipped``. The per-step learning rate is a Python float in ``param_groups`` for every
torch.optim scheduler; a tensor learning rate is stacked on device and travels with the
flush's one transfer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from gradlens.schema import GLOBAL

if TYPE_CHECKING:
    from gradlens.core.lens import GradLens

__all__ = ["group_names", "learning_rates", "log_learning_rates", "optimizer_settings"]

# the gradlens optimizers' group roles, in words (the internal "hidden"/"vector" are jargon)
_ROLE_NAMES = {"embedding": "embedding", "output": "output", "hidden": "matrices",
               "vector": "1d"}


def _inner(optimizer: Any) -> Any:
    """The wrapped optimizer of a wrapper (GatedOptimizer, accelerate's), for its class."""
    return getattr(optimizer, "optimizer", optimizer)


def group_names(optimizer: Any) -> list[str]:
    """One name per parameter group (see the module docstring)."""
    names: list[str] = []
    for i, g in enumerate(getattr(optimizer, "param_groups", [])):
        n = g.get("name")
        if not (isinstance(n, str) and n):  # SCALE's groups carry their role
            n = _ROLE_NAMES.get(str(g.get("role")), str(i))
        names.append(n if n not in names else f"{n}#{i}")
    return names


def _plain(v: Any) -> tuple[bool, Any]:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True, v
    if isinstance(v, (tuple, list)) and all(isinstance(x, (bool, int, float, str)) for x in v):
        return True, list(v)
    if torch.is_tensor(v) and v.numel() == 1 and not v.is_complex():
        return True, float(v.detach().reshape(()).cpu())  # once, at open: not in the loop
    return False, None


def optimizer_settings(optimizer: Any) -> dict[str, Any] | None:
    """``{"class", "groups": [{"name", "n_params", <hyperparameters>}], "skipped"}`` of the
    optimizer, or None without one."""
    if optimizer is None:
        return None
    inner = _inner(optimizer)
    groups, skipped = [], set()
    for name, g in zip(group_names(optimizer), getattr(optimizer, "param_groups", []),
                       strict=True):
        row: dict[str, Any] = {"name": name, "n_params": len(g.get("params", []))}
        for key, value in g.items():
            if key in ("params", "name"):
                continue
            ok, plain = _plain(value)
            if ok:
                row[key] = plain
            else:
                skipped.add(key)
        groups.append(row)
    cls = type(inner)
    return {"class": cls.__name__, "module": cls.__module__,
            "wrapper": type(optimizer).__name__ if inner is not optimizer else None,
            "groups": groups, "skipped": sorted(skipped)}


def learning_rates(optimizer: Any, names: list[str]) -> tuple[list[tuple[str, float]],
                                                                 list[str], list[torch.Tensor]]:
    """The groups' learning rates now: ``(floats, tensor_names, tensors)``; Python numbers
    are returned as ``("lr/<group>", value)`` rows, tensor learning rates as device tensors
    (read at the flush). No host sync."""
    rows: list[tuple[str, float]] = []
    t_names: list[str] = []
    tensors: list[torch.Tensor] = []
    for name, g in zip(names, getattr(optimizer, "param_groups", []), strict=False):
        lr = g.get("lr")
        if isinstance(lr, (int, float)) and not isinstance(lr, bool):
            rows.append((f"lr/{name}", float(lr)))
        elif torch.is_tensor(lr) and lr.numel() == 1:
            t_names.append(f"lr/{name}")
            tensors.append(lr.detach().reshape(1).float().clone())
    return rows, t_names, tensors


def log_learning_rates(lens: GradLens) -> None:
    """Queue ``lr/<group>`` of the lens's current step: Python floats as rows, tensor rates
    (no host sync) with the flush's one transfer."""
    if lens.optimizer is None:
        return
    floats, names, tensors = learning_rates(lens.optimizer, group_names(lens.optimizer))
    for stat, value in floats:
        lens._pending.append((lens.step_count, "row", (GLOBAL, GLOBAL, stat, value)))
    if tensors:
        lens._pending.append((lens.step_count, "scalars", (names, torch.cat(tensors))))
