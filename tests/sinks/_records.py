"""Records shared by the sink and report tests: a small LLaMA-like layer list, rows with NaN/inf, events."""

from __future__ import annotations

import math

from gradlens.schema import GLOBAL, SpikeEvent

LAYERS = [
    # name, role, layout, shape
    ("model.embed_tokens.weight", "embedding", "embedding", [128, 32]),
    ("model.layers.0.self_attn.q_proj.weight", "hidden", "linear", [32, 32]),
    ("model.layers.0.self_attn.k_proj.weight", "hidden", "linear", [32, 32]),
    ("model.layers.0.mlp.up_proj.weight", "hidden", "linear", [64, 32]),
    ("model.layers.0.mlp.down_proj.weight", "hidden", "linear", [32, 64]),
    ("model.layers.0.input_layernorm.weight", "vector", "vector", [32]),
    ("model.layers.0.post_attention_layernorm.weight", "vector", "vector", [32]),
    ("lm_head.weight", "output", "linear", [128, 32]),
]
GROUPS = {
    "model.embed_tokens.weight": "embedding",
    "model.layers.0.self_attn.q_proj.weight": "attention",
    "model.layers.0.self_attn.k_proj.weight": "attention",
    "model.layers.0.mlp.up_proj.weight": "mlp",
    "model.layers.0.mlp.down_proj.weight": "mlp",
    "model.layers.0.input_layernorm.weight": "norms",
    "model.layers.0.post_attention_layernorm.weight": "norms",
    "lm_head.weight": "output",
}


def layer_dicts() -> list[dict]:
    return [
        {"name": n, "role": r, "layout": lay, "shape": s, "numel": math.prod(s),
         "group": GROUPS[n]}
        for n, r, lay, s in LAYERS
    ]


def sample_rows(steps=(1, 2, 3)) -> list[tuple[int, str, str, str, float]]:
    """grad_norm for every layer and step, with a NaN, +inf and -inf; a global loss row."""
    rows = []
    for step in steps:
        for k, (name, role, _, _) in enumerate(LAYERS):
            rows.append((step, name, role, "grad_norm", 0.1 * (k + 1) * step + 1e-17))
        rows.append((step, GLOBAL, GLOBAL, "loss", 5.0 / step))
    rows[1] = (*rows[1][:4], math.nan)
    rows[2] = (*rows[2][:4], math.inf)
    rows[3] = (*rows[3][:4], -math.inf)
    return rows


def sample_events() -> list[SpikeEvent]:
    return [
        SpikeEvent(2, "model.layers.0.mlp.up_proj.weight", "grad_norm", 3.5, 7.25),
        SpikeEvent(2, "model.layers.0.self_attn.q_proj.weight", "grad_norm", 2.0, 9.5),
        SpikeEvent(3, GLOBAL, "grad_norm_global", 10.0, 6.0,
                   ("model.layers.0.mlp.up_proj.weight", "lm_head.weight")),
        SpikeEvent(3, "lm_head.weight", "nonfinite", math.nan, math.inf),
    ]


def same_values(a, b) -> bool:
    """Element-wise equality where NaN equals NaN."""
    return len(a) == len(b) and all(
        (math.isnan(x) and math.isnan(y)) if (isinstance(x, float) and math.isnan(x)) else x == y
        for x, y in zip(a, b, strict=True)
    )
