"""Which modules get per-example gradients, decided by what their forward computes.

A *rule* turns a module's input ``x`` (its first tensor argument) and output gradient ``d``
into the factors of each parameter's per-example gradient (example ``b``, tokens ``t``):

- :class:`Outer` ``(a, d)``: ``g_b = sum_t d_bt a_bt^T`` (a ``F.linear`` weight, ``(out, in)``);
  ``transposed``: ``g_b = sum_t a_bt d_bt^T`` (GPT-2's ``Conv1D``, ``(in, out)``).
- :class:`Lookup` ``(ids, d)``: ``g_b = sum_t e_{ids_bt} d_bt^T`` (an embedding table).
- :class:`Elementwise` ``(x_hat, d)``: ``g_b = sum_t d_bt * x_hat_bt`` (a norm's gain).
- :class:`Summed` ``(d)``: ``g_b = sum_t d_bt`` (a bias).

A rule is exact only for the forward it was written for. A module therefore gets a rule when
its class, or the nearest class of its method resolution order that has one, is that forward:
the exact torch / transformers classes below, a subclass that does not override ``forward``,
or a class registered with :func:`register_per_example_rule`. Anything else (a subclass with
its own ``forward``, an unknown module) has none, and the family reports why
(:func:`rule_for`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from gradlens.stats.per_example_vector import has_llama_rms_forward, normalized_input

__all__ = ["Elementwise", "Lookup", "Outer", "Rule", "Summed", "register_per_example_rule",
           "rule_for", "unregister_per_example_rule"]


class Outer(NamedTuple):
    a: torch.Tensor
    d: torch.Tensor
    transposed: bool = False


class Lookup(NamedTuple):
    ids: torch.Tensor
    d: torch.Tensor
    padding_idx: int | None = None


class Elementwise(NamedTuple):
    x: torch.Tensor
    d: torch.Tensor


class Summed(NamedTuple):
    d: torch.Tensor


Factor = Outer | Lookup | Elementwise | Summed
#: ``rule(module, x, d) -> {parameter leaf name: factors}``
Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, Factor]]


def _linear(module: nn.Module, x: torch.Tensor, d: torch.Tensor) -> dict[str, Factor]:
    return {"weight": Outer(x, d), "bias": Summed(d)}


def _conv1d(module: nn.Module, x: torch.Tensor, d: torch.Tensor) -> dict[str, Factor]:
    return {"weight": Outer(x, d, transposed=True), "bias": Summed(d)}


def _embedding(module: nn.Module, x: torch.Tensor, d: torch.Tensor) -> dict[str, Factor]:
    return {"weight": Lookup(x, d, getattr(module, "padding_idx", None))}


def _norm(module: nn.Module, x: torch.Tensor, d: torch.Tensor) -> dict[str, Factor]:
    x_hat = normalized_input(module, x)
    return {"weight": Elementwise(x_hat, d), "bias": Summed(d)}


#: transformers classes by (module path prefix, name): exact forwards the rules reproduce
_HF = {"Conv1D": _conv1d, "T5LayerNorm": _norm}
_TORCH: dict[type, Rule] = {nn.Linear: _linear, nn.Embedding: _embedding,
                            nn.LayerNorm: _norm, nn.RMSNorm: _norm}
_REGISTERED: dict[type, Rule] = {}


def _builtin(cls: type) -> Rule | None:
    if cls in _TORCH:
        return _TORCH[cls]
    if not cls.__module__.startswith("transformers."):
        return None
    if has_llama_rms_forward(cls):
        return _norm
    return _HF.get(cls.__name__)


def may_look_up(rule: Rule) -> bool:
    """Whether a rule can give :class:`Lookup` factors (an embedding's, or a registered one)."""
    return rule not in (_linear, _conv1d, _norm)


def register_per_example_rule(cls: type[nn.Module], rule: Rule, *,
                              replace: bool = False) -> None:
    """Give modules of class ``cls`` (and its subclasses that keep its ``forward``) a
    per-example rule: ``rule(module, x, d)`` returns, per parameter leaf name, the factors
    of its per-example gradient (:class:`Outer`, :class:`Lookup`, :class:`Elementwise`,
    :class:`Summed`), from the forward's first tensor input ``x`` and the output gradient
    ``d``. A class that already has a rule (registered, or built in) is an error unless
    ``replace=True``: a silent overwrite would change every number of those layers.

    The rule is checked at run time: the decomposition self-check compares the factors'
    sum over the micro-batch with the gradient autograd computes (see docs/api.md)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"cls must be an nn.Module subclass, got {cls!r}")
    if not callable(rule):
        raise TypeError(f"rule must be callable as rule(module, x, d), got {rule!r}")
    owner = _REGISTERED.get(cls) or _builtin(cls)
    if owner is not None and owner is not rule and not replace:
        raise ValueError(f"{cls.__qualname__} already has a per-example rule "
                         f"({getattr(owner, '__qualname__', owner)!r}); pass replace=True "
                         "to overwrite it")
    _REGISTERED[cls] = rule


def unregister_per_example_rule(cls: type[nn.Module]) -> None:
    """Drop a registered rule (built-in rules stay)."""
    _REGISTERED.pop(cls, None)


def _name(cls: type) -> str:
    """``torch.nn.Linear``-style: the public module path when the class is exported there."""
    for public in ("torch.nn", "transformers"):
        if cls.__module__.startswith(public + ".") and getattr(
                __import__(public.split(".")[0]) if public == "transformers" else nn,
                cls.__name__, None) is cls:
            return f"{public}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def rule_for(module: nn.Module) -> tuple[Rule | None, str]:
    """``(rule, "")`` for a module whose forward a rule describes, else ``(None, why)``."""
    cls = type(module)
    for base in cls.__mro__:
        rule = _REGISTERED.get(base) or _builtin(base)
        if rule is None:
            continue
        if base is cls or cls.forward is base.forward:
            return rule, ""
        return None, (f"{_name(cls)} subclasses {_name(base)} but overrides forward: the "
                      f"per-example rule of {base.__qualname__} assumes its forward "
                      "(register one with gradlens.register_per_example_rule)")
    return None, (f"{_name(cls)} is not a module kind with a per-example rule (Linear, "
                  "Conv1D, Embedding, LayerNorm/RMSNorm; register one with "
                  "gradlens.register_per_example_rule)")
