"""Synthetic lens run directories for the plugin tests (files as the table sink writes them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from gradlens.schema import STAT_COLUMNS


def synthetic_layers(n_layers: int) -> list[tuple[str, str]]:
    """(name, role) in model order: embedding, blocks of 4 hidden + 1 vector, norm, lm_head."""
    out = [("model.embed_tokens.weight", "embedding")]
    b = 0
    while len(out) < n_layers - 2:
        for leaf in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
            out.append((f"model.layers.{b}.{leaf}.weight", "hidden"))
        out.append((f"model.layers.{b}.input_layernorm.weight", "vector"))
        b += 1
    out = out[: n_layers - 2]
    return [*out, ("model.norm.weight", "vector"), ("lm_head.weight", "output")]


def write_run(run: Path, n_layers: int, steps: np.ndarray, stats: tuple[str, ...] = ("grad_norm",),
              seed: int = 0, name: str | None = None) -> dict[str, np.ndarray]:
    """Write run.json + stats.csv; returns ``{stat: layers x steps values}`` (model order)."""
    run.mkdir(parents=True, exist_ok=True)
    lay = synthetic_layers(n_layers)
    meta = {"name": name or run.name, "finished": True,
            "layers": [{"name": n, "role": r} for n, r in lay]}
    (run / "run.json").write_text(json.dumps(meta))
    rng = np.random.default_rng(seed)
    values = {}
    frames = []
    for stat in stats:
        v = np.exp(rng.normal(0, 2, size=(len(lay), len(steps))))
        values[stat] = v
        frames.append(pd.DataFrame({
            "step": np.tile(steps, len(lay)),
            "layer": np.repeat([n for n, _ in lay], len(steps)),
            "role": np.repeat([r for _, r in lay], len(steps)),
            "stat": stat, "value": v.ravel()}))
    pd.concat(frames)[list(STAT_COLUMNS)].to_csv(run / "stats.csv", index=False)
    return values
