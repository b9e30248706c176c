"""Layer discovery: which parameter plays which role, and along which axis its output units lie.

Every tracked parameter gets one :class:`Role`:

- ``embedding``: the input embedding ``(vocab, d)`` (and other ``nn.Embedding`` tables);
- ``output``: the output layer (``lm_head``), ``(vocab, d)``;
- ``hidden``: every other matrix (attention and MLP projections, GPT-2 ``Conv1D``, ndim > 2);
- ``vector``: 1-D parameters (norm gains, biases).

Roles drive SCALE's parameter groups, its normalization axis, the lens's grouping and the report.
Detection order: the model's own ``get_input_embeddings()`` / ``get_output_embeddings()`` (every
HF model has them), then module types, then names (``lm_head``, ``output``, ``head``, ...) as a
last resort. Users override any of it with name patterns.

Output units and the normalization axis (PyTorch layouts):

========================  ===========  =========  ================================
layout                    stored as    unit_dim   one RMS per ...
========================  ===========  =========  ================================
``linear``                (out, in)    0          output row (reduce over dim 1)
``conv1d`` (GPT-2)        (in, out)    1          output column (reduce over dim 0)
``embedding``             (vocab, d)   1          feature (reduce over the vocabulary)
``other`` (ndim > 2)      (s0, ...)    0          slice ``[i]``, viewed as (s0, -1)
========================  ===========  =========  ================================

The embedding's axis follows the SCALE authors' code (one scale per feature, across the whole
vocabulary). The output layer is a ``linear`` layout: one scale per vocabulary row.

Tied input/output embeddings are one parameter in two roles. Rule: the tied tensor takes the
``output`` role with the ``linear`` layout (one scale per vocabulary row, and SCALE's momentum),
because the output layer is where SCALE puts its only momentum buffer; a warning says so once
per discovery, and ``overrides={"<name>": "embedding"}`` chooses the other reading.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

__all__ = ["LayerInfo", "Role", "discover_layers", "output_units_view"]

OUTPUT_NAME_HINTS = ("lm_head", "output", "head", "classifier", "fc_out", "out_proj_vocab")


class Role(str, Enum):
    """What a parameter does in a language model."""

    EMBEDDING = "embedding"
    OUTPUT = "output"
    HIDDEN = "hidden"
    VECTOR = "vector"

    def __str__(self) -> str:
        return self.value


_LAYOUT_UNIT_DIM = {"linear": 0, "conv1d": 1, "embedding": 1, "other": 0}


@dataclass(frozen=True)
class LayerInfo:
    """One tracked parameter.

    Attributes:
        name: qualified parameter name (``model.layers.0.self_attn.q_proj.weight``); for a tied
            tensor, the first name ``named_parameters`` gives.
        param: the parameter itself.
        role: its :class:`Role`.
        layout: ``linear``, ``conv1d``, ``embedding``, ``other`` or ``vector``.
        module_name: qualified name of the module that owns it.
        module_type: class name of that module (``Linear``, ``Conv1D``, ``Embedding``, ...).
        aliases: every other name of the same tensor (tied weights), possibly empty.
    """

    name: str
    param: nn.Parameter
    role: Role
    layout: str
    module_name: str
    module_type: str
    aliases: tuple[str, ...] = ()

    @property
    def unit_dim(self) -> int | None:
        """Axis that indexes output units (None for 1-D parameters)."""
        return _LAYOUT_UNIT_DIM.get(self.layout)

    @property
    def norm_dim(self) -> int | None:
        """Axis SCALE reduces over: the RMS along it gives one scale per output unit."""
        unit = self.unit_dim
        return None if unit is None else 1 - unit

    @property
    def numel(self) -> int:
        return self.param.numel()


def output_units_view(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """View ``tensor`` as a 2-D ``(units, fan)`` matrix: one row per output unit.

    ``linear``/``other`` (ndim > 2 flattened to ``(size0, -1)``) are already unit-major;
    ``conv1d`` and ``embedding`` are transposed (a view, no copy).
    """
    if tensor.ndim < 2:
        raise ValueError(f"output_units_view needs a matrix, got shape {tuple(tensor.shape)}")
    if tensor.ndim > 2:
        tensor = tensor.reshape(tensor.shape[0], -1)
    if _LAYOUT_UNIT_DIM[layout] == 1:
        return tensor.t()
    return tensor


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, recognized without importing transformers.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _hf_embeddings(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    inp = out = None
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    try:
        inp = get_in() if callable(get_in) else None
    except (NotImplementedError, AttributeError):
        inp = None
    try:
        out = get_out() if callable(get_out) else None
    except (NotImplementedError, AttributeError):
        out = None
    return inp, out


def _guess_output_module(model: nn.Module, embedding_rows: set[int]) -> nn.Module | None:
    """Last resort: a Linear named like an output head, preferring one with vocab-size rows."""
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in OUTPUT_NAME_HINTS:
            candidates.append((module.out_features in embedding_rows, module))
    if not candidates:
        return None
    candidates.sort(key=lambda c: c[0], reverse=True)
    return candidates[0][1]


def _match_overrides(
    names: Iterable[str], overrides: Mapping[str, Role | str]
) -> dict[str, Role]:
    """Resolve ``{pattern: role}`` to ``{name: role}``; a pattern matching nothing is an error."""
    names = list(names)
    resolved: dict[str, Role] = {}
    for pattern, role in overrides.items():
        try:
            role = Role(role)
        except ValueError:
            raise ValueError(
                f"override {pattern!r}: unknown role {role!r}; use one of "
                f"{[r.value for r in Role]}"
            ) from None
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(
                f"override pattern {pattern!r} matches no parameter; patterns are fnmatch globs "
                f"on parameter names such as {names[:3]}"
            )
        for n in hits:
            resolved[n] = role
    return resolved


def discover_layers(
    model: nn.Module,
    overrides: Mapping[str, Role | str] | None = None,
    output: str | None = None,
    include_frozen: bool = False,
    warn: bool = True,
) -> list[LayerInfo]:
    """Find every parameter of ``model`` and give it a role.

    Args:
        model: any ``nn.Module``; HF models are recognized by their embedding accessors.
        overrides: ``{fnmatch pattern on parameter name: role}``, applied last. A pattern that
            matches nothing raises ``ValueError``.
        output: qualified name of the output module (``"decoder.proj"``) when it cannot be
            detected.
        include_frozen: keep parameters with ``requires_grad=False`` (default: skip them).
        warn: emit the tied-weights / no-output-layer warnings.

    Returns:
        One :class:`LayerInfo` per distinct tensor, in ``named_parameters`` order.
    """
    modules = dict(model.named_modules())
    emb_module, out_module = _hf_embeddings(model)
    if output is not None:
        if output not in modules:
            raise ValueError(
                f"output={output!r} is not a module of the model; module names look like "
                f"{[n for n in modules if n][:5]}"
            )
        out_module = modules[output]
    embedding_modules = {id(m) for m in modules.values() if isinstance(m, nn.Embedding)}
    if emb_module is not None:
        embedding_modules.add(id(emb_module))
    if out_module is None:
        rows = {m.num_embeddings for m in modules.values() if isinstance(m, nn.Embedding)}
        out_module = _guess_output_module(model, rows)
    out_weight = getattr(out_module, "weight", None) if out_module is not None else None

    infos: list[LayerInfo] = []
    by_id: dict[int, int] = {}
    aliases: dict[int, list[str]] = {}
    for module_name, module in modules.items():
        for pname, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if id(param) in by_id:
                aliases[id(param)].append(full)
                continue
            if not param.requires_grad and not include_frozen:
                continue
            if param.ndim <= 1:
                role, layout = Role.VECTOR, "vector"
            elif out_weight is not None and param is out_weight:
                role, layout = Role.OUTPUT, "linear"
            elif id(module) in embedding_modules:
                role, layout = Role.EMBEDDING, "embedding"
            elif _is_conv1d(module):
                role, layout = Role.HIDDEN, "conv1d"
            elif isinstance(module, nn.Linear) and param.ndim == 2:
                role, layout = Role.HIDDEN, "linear"
            else:
                role, layout = Role.HIDDEN, "other"
            by_id[id(param)] = len(infos)
            aliases[id(param)] = []
            infos.append(
                LayerInfo(full, param, role, layout, module_name, type(module).__name__)
            )

    # A tied tensor (one Parameter reached through two modules) takes the output role.
    tied_names: list[str] = []
    if out_weight is not None and id(out_weight) in by_id and aliases[id(out_weight)]:
        tied_names = [infos[by_id[id(out_weight)]].name, *aliases[id(out_weight)]]
    infos = [
        LayerInfo(i.name, i.param, i.role, i.layout, i.module_name, i.module_type,
                  tuple(aliases[id(i.param)]))
        for i in infos
    ]
    if warn and tied_names:
        warnings.warn(
            f"gradlens: input and output embeddings are tied ({' = '.join(tied_names)}); the "
            "tensor is treated as the output layer (role 'output', one scale per vocabulary "
            f"row). Pass overrides={{{tied_names[0]!r}: 'embedding'}} to treat it as the "
            "embedding instead.",
            UserWarning,
            stacklevel=2,
        )
    if overrides:
        resolved = _match_overrides([i.name for i in infos], overrides)
        new_infos = []
        for i in infos:
            role = resolved.get(i.name, i.role)
            layout = i.layout
            if role is not i.role:
                if role is Role.VECTOR:
                    layout = "vector"
                elif i.param.ndim < 2:
                    raise ValueError(f"{i.name} is 1-D and can only have role 'vector'")
                elif role is Role.EMBEDDING:
                    layout = "embedding"
                elif role is Role.OUTPUT:
                    layout = "linear"
                elif i.layout in ("embedding", "vector"):
                    layout = "linear" if i.param.ndim == 2 else "other"
            new_infos.append(LayerInfo(i.name, i.param, role, layout, i.module_name,
                                       i.module_type, i.aliases))
        infos = new_infos
    frozen_out = out_weight is not None and not out_weight.requires_grad and not include_frozen
    if warn and frozen_out:
        name = next((f"{n}.weight" for n, m in modules.items() if m is out_module), "?")
        warnings.warn(
            f"gradlens: the output layer ({name}) is frozen (requires_grad=False), so no "
            "tracked parameter has role 'output' (statistics cover the trainable parameters, "
            "e.g. adapters): nothing to do unless it is meant to train.",
            UserWarning,
            stacklevel=2,
        )
    elif warn and not any(i.role is Role.OUTPUT for i in infos):
        warnings.warn(
            "gradlens: no output layer found (no get_output_embeddings(), no Linear named "
            f"{'/'.join(OUTPUT_NAME_HINTS)}). Name it with output='<module name>' or "
            "overrides={'<param name>': 'output'}; until then no parameter has role 'output'.",
            UserWarning,
            stacklevel=2,
        )
    return infos
