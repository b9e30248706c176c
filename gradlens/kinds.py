"""One vocabulary of layer names: the kinds, one colour per kind, short labels, block order.

Every screen and file classifies and labels a parameter from its name here (the structural
:class:`gradlens.roles.Role` of a parameter comes from the model's modules instead, and the
kind refines it with the name).

A tracked parameter is one of

    embedding   the token (or position) embedding
    attention   the attention block's projections (and their biases)
    mlp         the MLP / feed-forward block's matrices (and their biases)
    norms       the gains (and biases) of RMSNorm / LayerNorm modules
    output      the output layer (lm_head)
    other       anything else (a stray bias, a classifier's pooler, ...)

The table's ``role`` column, run.json's ``layers[].role``, TensorBoard's by-group charts, the
plugin's bands and the report's figures use these names and :data:`KIND_COLORS`. The lens's
internal roles (``hidden`` / ``vector``: matrix or 1-D, what SCALE's parameter groups and the
spike guard's role policies use) stay internal; runs written before the kinds carried them in
their ``role`` column, and :func:`layer_kind` maps them when the runs are read.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from gradlens.schema import GLOBAL, LAYER_GROUPS

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "KINDS",
    "KIND_COLORS",
    "block_index",
    "in_block_rank",
    "kind_color",
    "layer_group",
    "layer_kind",
    "short_labels",
    "short_layer_name",
    "with_kinds",
]

KINDS: tuple[str, ...] = LAYER_GROUPS
KIND_COLORS: dict[str, str] = {
    "embedding": "#1f77b4", "attention": "#ff7f0e", "mlp": "#2ca02c", "norms": "#9467bd",
    "output": "#d62728", "other": "#7f7f7f", GLOBAL: "#000000",
}


def kind_color(kind: str) -> str:
    """The colour of a kind (grey for an unknown name)."""
    return KIND_COLORS.get(kind, "#7f7f7f")


# Components of a parameter name that say where the parameter sits (lower-cased, compared
# with the dot-separated parts of the name).
_ATTENTION_NAMES = frozenset({
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "qkv", "query", "key", "value",
    "c_attn", "query_key_value", "out_proj", "wq", "wk", "wv",
})
_MLP_NAMES = frozenset({
    "gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "c_fc", "w1", "w2",
    "w3", "fc_in", "fc_out", "intermediate", "dense_h_to_4h", "dense_4h_to_h", "experts",
    "densereludense", "dense_relu_dense",
})


def _is_norm(part: str) -> bool:
    return "norm" in part or part.startswith("ln")


def _block_kind(part: str) -> str | None:
    if "attn" in part or "attention" in part or part in _ATTENTION_NAMES:
        return "attention"
    if any(h in part for h in ("mlp", "ffn", "feed_forward", "feedforward")) or part in _MLP_NAMES:
        return "mlp"
    return None


@functools.lru_cache(maxsize=1 << 16)  # a pure function of two strings; every flush asks it
def layer_kind(name: str, role: str) -> str:
    """The kind of a parameter: one of :data:`KINDS`.

    ``role`` is a kind already (returned as it is), or the lens's internal role (``embedding``,
    ``output``, ``hidden``: a matrix, ``vector``: 1-D), which is also what runs written before
    the kinds carry in their ``role`` column. ``embedding`` and ``output`` come from the role.
    Otherwise the name decides:

    - a 1-D parameter (role ``vector``) of a module named like a norm (``input_layernorm``,
      ``post_attention_layernorm``, ``ln_1``, ``norm``) is ``norms``;
    - else the outermost name component that looks like an attention block (``self_attn``,
      ``attention``, ``q_proj``, ``c_attn``) or an MLP block (``mlp``, ``feed_forward``,
      ``up_proj``, ``fc1``, ``experts``) decides: ``attention`` or ``mlp`` (GPT-2's ``c_proj``
      follows its parent ``attn``/``mlp``; biases follow their module);
    - anything else, and the run-level ``global`` pseudo-layer, is ``other``.
    """
    if role in KINDS:
        return role
    if role == "embedding":
        return "embedding"
    if role == "output":
        return "output"
    if role == GLOBAL or name == GLOBAL:
        return "other"
    parts = name.lower().split(".")
    modules = parts[:-1] or parts
    if role == "vector" and any(_is_norm(p) for p in modules):
        return "norms"
    for part in modules:
        kind = _block_kind(part)
        if kind is not None:
            return kind
    return "other"


layer_group = layer_kind  # the dashboards' name for it


def with_kinds(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` (a long table) with its ``role`` column in kinds: runs written before the
    kinds carry the internal roles (``hidden``, ``vector``), mapped here per layer."""
    if "role" not in df.columns or df.empty:
        return df
    old = ~df["role"].isin([*KINDS, GLOBAL])
    if not old.any():
        return df
    pairs = df.loc[old, ["layer", "role"]].drop_duplicates()
    kind = {(n, r): layer_kind(str(n), str(r)) for n, r in pairs.itertuples(index=False)}
    df = df.copy()
    df["role"] = df["role"].astype(object)
    df.loc[old, "role"] = [kind[(n, r)] for n, r in zip(df.loc[old, "layer"],
                                                        df.loc[old, "role"], strict=True)]
    return df


_BLOCKS = r"(?:layers|layer|h|blocks|block)"  # the container of a model's transformer blocks


def block_index(name: str) -> float:
    """The transformer block a parameter sits in (``model.layers.3...`` -> 3.0), inf outside."""
    m = re.search(rf"(?:^|\.){_BLOCKS}\.(\d+)(?:\.|$)", name)
    return float(m.group(1)) if m else math.inf


_LEAF_RANK = {n: i for i, n in enumerate((
    "q_proj", "query", "k_proj", "key", "v_proj", "value", "c_attn", "query_key_value",
    "qkv_proj", "o_proj", "out_proj", "gate_proj", "gate_up_proj", "up_proj", "c_fc",
    "down_proj", "c_proj", "input_layernorm", "ln_1", "post_attention_layernorm", "ln_2",
))}


def in_block_rank(name: str, role: str = "vector") -> tuple[int, int]:
    """Order inside a block: attention before MLP before the rest (:func:`layer_kind`), then
    the projections in their usual order (q, k, v, o; gate, up, down; the norms)."""
    kind = layer_kind(name, role)
    part = 0 if kind == "attention" else 1 if kind == "mlp" else 2
    parts = name.split(".")
    return part, min((_LEAF_RANK[p] for p in parts if p in _LEAF_RANK), default=99)


_PREFIXES = ("_orig_mod.", "module.", "base_model.model.", "model.", "transformer.",
             "gpt_neox.", "decoder.")
_SEGMENTS = {
    "self_attn": "attn", "attention": "attn", "attn": "attn",
    "feed_forward": "mlp", "ffn": "mlp", "mlp": "mlp",
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "out_proj": "o",
    "query": "q", "key": "k", "value": "v",
    "c_attn": "qkv", "query_key_value": "qkv", "qkv_proj": "qkv", "Wqkv": "qkv",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "gate_up_proj": "gate_up",
    "input_layernorm": "ln_in", "post_attention_layernorm": "ln_post",
    "embed_tokens": "embed", "wte": "embed", "tok_embeddings": "embed",
    "word_embeddings": "embed", "embed_in": "embed", "wpe": "pos_embed",
    "embed_out": "lm_head",
}


def short_layer_name(name: str) -> str:
    """A short label: ``model.layers.0.self_attn.q_proj.weight`` -> ``L0.attn.q``.

    ``model.embed_tokens.weight`` -> ``embed``, ``lm_head.weight`` -> ``lm_head``; a ``.bias``
    becomes ``.b``. Unknown names are only stripped of common prefixes and ``.weight``.
    """
    s = str(name)
    if s == GLOBAL:
        return s
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if s.startswith(p) and len(s) > len(p):
                s, changed = s[len(p):], True
    bias = s.endswith(".bias")
    if s.endswith(".weight"):
        s = s[: -len(".weight")]
    elif bias:
        s = s[: -len(".bias")]
    s = re.sub(rf"^{_BLOCKS}\.(\d+)\.", r"L\1.", s)
    parts = [_SEGMENTS.get(p, p) for p in s.split(".")]
    if parts[:1] == ["embeddings"] and len(parts) > 1:
        parts = parts[1:]
    s = ".".join(parts)
    return s + ".b" if bias else s


def short_labels(names: Iterable[str]) -> dict[str, str]:
    """``{name: short label}``; names whose short labels collide keep their full name."""
    names = [str(n) for n in names]
    short = {n: short_layer_name(n) for n in names}
    counts = Counter(short.values())
    return {n: (s if counts[s] == 1 else n) for n, s in short.items()}
