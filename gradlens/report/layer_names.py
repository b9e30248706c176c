"""Layers in model order and their short labels (``model.layers.0.self_attn.q_proj.weight``
-> ``L0.attn.q``), shared by the rankings, the verdicts, the figures and the plugin."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from gradlens.report.verdicts.base import layer_roles
from gradlens.schema import GLOBAL

__all__ = ["layer_order", "short_labels", "short_layer_name"]


def _block_index(name: str) -> float:
    m = re.search(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)", name)
    return float(m.group(1)) if m else math.inf


_ATTN = {"self_attn", "attn", "attention"}
_MLP = {"mlp", "feed_forward", "ffn"}
_LEAF_RANK = {n: i for i, n in enumerate((
    "q_proj", "query", "k_proj", "key", "v_proj", "value", "c_attn", "query_key_value",
    "qkv_proj", "o_proj", "out_proj", "gate_proj", "gate_up_proj", "up_proj", "c_fc",
    "down_proj", "c_proj", "input_layernorm", "ln_1", "post_attention_layernorm", "ln_2",
))}


def layer_order(
    df: pd.DataFrame | None = None,
    meta: Mapping[str, Any] | None = None,
    layers: Iterable[str] | None = None,
) -> list[str]:
    """Layers in model order, ``global`` excluded.

    The order of ``meta["layers"]`` (run.json, written in ``named_parameters`` order) wins; layers
    it does not list follow, sorted by (embedding first, block index, output last), then within
    a block attention before MLP before the rest, projections in their usual order (q, k, v, o;
    gate, up, down), ties kept in order of first appearance.
    """
    if layers is None:
        layers = [] if df is None or df.empty else pd.unique(df["layer"].astype(str))
    present = [str(x) for x in layers if str(x) != GLOBAL]
    seen = set(present)
    roles = layer_roles(df) if df is not None and not df.empty else {}
    ordered: list[str] = []
    if meta and isinstance(meta.get("layers"), Sequence):
        for d in meta["layers"]:
            name = d.get("name") if isinstance(d, Mapping) else None
            if name in seen and name not in ordered:
                ordered.append(name)
            if isinstance(d, Mapping):
                roles.setdefault(str(name), str(d.get("role", "")))
    rest = [x for x in present if x not in set(ordered)]

    def key(item: tuple[int, str]) -> tuple[int, float, int, int, int]:
        pos, name = item
        role = roles.get(name) or {"embed": "embedding", "pos_embed": "embedding",
                                   "lm_head": "output"}.get(short_layer_name(name), "")
        group = 0 if role == "embedding" else 2 if role == "output" else 1
        parts = name.split(".")
        part = 0 if any(p in _ATTN for p in parts) else 1 if any(p in _MLP for p in parts) else 2
        leaf = min((_LEAF_RANK[p] for p in parts if p in _LEAF_RANK), default=99)
        return group, _block_index(name), part, leaf, pos

    rest = [name for _, name in sorted(enumerate(rest), key=key)]
    return ordered + rest


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
    s = re.sub(r"^(?:layers|layer|h|blocks|block)\.(\d+)\.", r"L\1.", s)
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
