"""SCALE parameter groups built from gradlens's layer roles."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from gradlens.roles import LayerInfo, Role, discover_layers

__all__ = ["GROUP_OPTIONS", "scale_param_groups"]

GROUP_OPTIONS = frozenset(
    {"lr", "lr_1d", "momentum", "weight_decay", "norm_dim", "algorithm", "betas", "eps"}
)
"""Keys an option override (``overrides={pattern: {key: value}}``) may set."""


def scale_param_groups(
    model: nn.Module,
    lr: float = 1e-4,
    lr_1d: float | None = None,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    momentum_roles: Iterable[str | Role] = ("output",),
    momentum_layers: Iterable[str] = (),
    normalize: bool = True,
    overrides: Mapping[str, str | Role | Mapping[str, Any]] | None = None,
    output: str | None = None,
) -> list[dict[str, Any]]:
    """Param groups for :class:`gradlens.optim.SCALE`, one per ``(role, norm_dim)``.

    Roles and axes come from :func:`gradlens.roles.discover_layers`, as everywhere in gradlens:

    - ``hidden`` (Linear ``(out, in)``: ``norm_dim=1``; GPT-2 ``Conv1D`` stored ``(in, out)``:
      ``norm_dim=0``; ndim > 2: viewed as ``(size0, -1)``, ``norm_dim=1``), no momentum;
    - ``embedding`` ``(vocab, d)``: ``norm_dim=0`` (one scale per feature), no momentum;
    - ``output`` (``lm_head``): ``norm_dim=1`` and EMA momentum ``momentum``;
    - ``vector`` (1-D): AdamW at ``lr_1d`` (None: ``lr``), scheduled like ``lr``.

    Frozen parameters are left out. Tied input/output embeddings appear once, as the output
    layer (``discover_layers`` warns once and says how to choose the embedding reading).

    The ablations are options, not classes: ``momentum_roles=()`` (no momentum anywhere),
    ``momentum_roles=("output", "hidden", "embedding")`` (momentum on every matrix),
    ``normalize=False`` (plain SGD, with output-layer momentum by default);
    ``momentum_layers=[...]`` gives momentum to named layers beyond the output layer.

    Args:
        model: any ``nn.Module``.
        lr: peak learning rate of every group (the scheduler scales it).
        lr_1d: peak AdamW learning rate of the 1-D group (None: ``lr``).
        weight_decay: decoupled weight decay for every group (1-D included).
        momentum: EMA beta given to the roles in ``momentum_roles``.
        momentum_roles: matrix roles that get the momentum buffer.
        momentum_layers: layers that get it too, whatever their role: names or fnmatch
            patterns matched against each parameter's name (and tied aliases) and its module's
            name (``"model.layers.3.mlp.down_proj"``, ``"*.layers.[0-1].*"``). 1-D tensors a
            pattern matches are left to AdamW. A name or pattern that matches no parameter, or
            only 1-D ones, is a ``ValueError`` naming it.
        normalize: False sets ``norm_dim=None`` on every matrix (no normalization).
        overrides: ``{fnmatch pattern on parameter name: value}``. A role (``"output"``,
            ``Role.HIDDEN``, ...) reassigns the role, as in ``discover_layers``; a dict sets
            group options (keys in :data:`GROUP_OPTIONS`) for the matching parameters, which
            then get a group of their own. A pattern that matches nothing is a ``ValueError``.
        output: qualified name of the output module when it cannot be detected.

    Returns:
        A list of dicts with ``params``, ``param_names``, ``role``, ``norm_dim``, ``momentum``,
        ``algorithm``, ``lr``, ``weight_decay`` (and ``lr_1d`` on the 1-D group), in order of
        first appearance in ``model.named_parameters()``. ``param_names`` labels the
        optimizer's ``state_dict``; torch then requires names on any group added later.
    """
    roles = _momentum_roles(momentum_roles)
    role_overrides: dict[str, str | Role] = {}
    option_overrides: dict[str, Mapping[str, Any]] = {}
    for pattern, value in (overrides or {}).items():
        if isinstance(value, Mapping):
            unknown = set(value) - GROUP_OPTIONS
            if unknown:
                raise ValueError(
                    f"override {pattern!r}: unknown group option(s) {sorted(unknown)}; "
                    f"allowed: {sorted(GROUP_OPTIONS)}"
                )
            option_overrides[pattern] = value
        else:
            role_overrides[pattern] = value
    layers = discover_layers(model, overrides=role_overrides or None, output=output)
    per_layer = _match_options(layers, option_overrides)
    with_momentum = _match_momentum_layers(layers, momentum_layers)

    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    for info in layers:
        group = _base_group(info, lr, lr_1d, weight_decay, momentum, roles, normalize)
        if info.name in with_momentum:
            group["momentum"] = momentum
        group.update(per_layer.get(info.name, {}))
        key = tuple(sorted((k, repr(v)) for k, v in group.items()))
        if key not in groups:
            groups[key] = {"params": [], "param_names": [], **group}
        groups[key]["params"].append(info.param)
        groups[key]["param_names"].append(info.name)
    return list(groups.values())


def _match_momentum_layers(layers: list[LayerInfo], patterns: Iterable[str]) -> set[str]:
    """Names of the matrices that ``patterns`` select; ``ValueError`` naming the patterns that
    select nothing (or only 1-D tensors)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    selected: set[str] = set()
    unmatched: list[str] = []
    only_vectors: list[str] = []
    for pattern in patterns:
        hits = [i for i in layers
                if any(fnmatch.fnmatchcase(n, pattern)
                       for n in (i.name, i.module_name, *i.aliases))]
        matrices = [i.name for i in hits if i.role is not Role.VECTOR]
        if not hits:
            unmatched.append(pattern)
        elif not matrices:
            only_vectors.append(pattern)
        selected.update(matrices)
    if unmatched:
        raise ValueError(
            f"momentum_layers: {unmatched} match no trainable parameter or layer; give layer "
            f"names or fnmatch globs such as {[i.module_name for i in layers[:3]]}"
        )
    if only_vectors:
        raise ValueError(
            f"momentum_layers: {only_vectors} match only 1-D parameters, which use AdamW (its "
            "momentum is betas[0]); name matrices"
        )
    return selected


def _momentum_roles(momentum_roles: Iterable[str | Role]) -> frozenset[Role]:
    roles = set()
    for r in momentum_roles:
        try:
            role = Role(r)
        except ValueError:
            raise ValueError(
                f"momentum_roles: unknown role {r!r}; use 'output', 'hidden' or 'embedding'"
            ) from None
        if role is Role.VECTOR:
            raise ValueError(
                "momentum_roles: 'vector' parameters use AdamW, whose momentum is betas[0]"
            )
        roles.add(role)
    return frozenset(roles)


def _base_group(
    info: LayerInfo,
    lr: float,
    lr_1d: float | None,
    weight_decay: float,
    momentum: float,
    momentum_roles: frozenset[Role],
    normalize: bool,
) -> dict[str, Any]:
    if info.role is Role.VECTOR:
        return dict(role=info.role.value, norm_dim=None, momentum=0.0, algorithm="adamw",
                    lr=lr, lr_1d=lr if lr_1d is None else lr_1d, weight_decay=weight_decay)
    return dict(
        role=info.role.value,
        norm_dim=info.norm_dim if normalize else None,
        momentum=momentum if info.role in momentum_roles else 0.0,
        algorithm="scale",
        lr=lr,
        weight_decay=weight_decay,
    )


def _match_options(
    layers: list[LayerInfo], option_overrides: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """``{name: options}`` from ``{pattern: options}``; later patterns win; no-match is an error."""
    resolved: dict[str, dict[str, Any]] = {}
    for pattern, options in option_overrides.items():
        hits = [
            i.name for i in layers
            if any(fnmatch.fnmatchcase(n, pattern) for n in (i.name, *i.aliases))
        ]
        if not hits:
            raise ValueError(
                f"override pattern {pattern!r} matches no trainable parameter; patterns are "
                f"fnmatch globs on names such as {[i.name for i in layers[:3]]}"
            )
        for name in hits:
            resolved.setdefault(name, {}).update(options)
    return resolved
