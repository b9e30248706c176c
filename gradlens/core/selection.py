"""Which discovered layers the lens tracks: name patterns and roles."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence

from gradlens.roles import LayerInfo, Role
from gradlens.schema import layer_name


def select_layers(
    infos: Sequence[LayerInfo],
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    roles: Sequence[Role | str] | None = None,
) -> list[LayerInfo]:
    """Keep layers whose name matches any ``include`` glob and no ``exclude`` glob, with a role
    in ``roles``. A pattern that matches no layer raises ``ValueError`` (a typo would otherwise
    silently track nothing)."""
    names = [i.name for i in infos]
    for label, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns or ():
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ValueError(
                    f"{label} pattern {pattern!r} matches no parameter; patterns are fnmatch "
                    f"globs on parameter names such as {names[:3]}"
                )
    wanted_roles = None
    if roles is not None:
        try:
            wanted_roles = {Role(r) for r in roles}
        except ValueError as err:
            raise ValueError(f"{err}; roles are {[r.value for r in Role]}") from None
    kept = []
    for info in infos:
        if include and not any(fnmatch.fnmatchcase(info.name, p) for p in include):
            continue
        if exclude and any(fnmatch.fnmatchcase(info.name, p) for p in exclude):
            continue
        if wanted_roles is not None and info.role not in wanted_roles:
            continue
        name = layer_name(info.name)
        kept.append(info if name == info.name else dataclasses.replace(info, name=name))
    if not kept:
        raise ValueError("the layer selection is empty: no parameter matches include/exclude/roles")
    return kept
