"""Synthetic long tables, spike logs and run directories with known answers (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

N_BLOCKS = 2
HIDDEN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
VECTORS = ("input_layernorm", "post_attention_layernorm")


def layers(n_blocks: int = N_BLOCKS) -> list[tuple[str, str, list[int]]]:
    """(name, role, shape) of a tiny LLaMA in model order."""
    out = [("model.embed_tokens.weight", "embedding", [128, 32])]
    for b in range(n_blocks):
        for h in HIDDEN:
            shape = [64, 32] if h in ("mlp.gate_proj", "mlp.up_proj") else (
                [32, 64] if h == "mlp.down_proj" else [32, 32])
            out.append((f"model.layers.{b}.{h}.weight", "hidden", shape))
        for v in VECTORS:
            out.append((f"model.layers.{b}.{v}.weight", "vector", [32]))
    out.append(("model.norm.weight", "vector", [32]))
    out.append(("lm_head.weight", "output", [128, 32]))
    return out


OUTPUT = "lm_head.weight"


def first_steps(n_steps: int, frac: float, seed: int) -> np.ndarray:
    """Boolean mask of exactly round(frac * n_steps) steps, at random positions."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(n_steps, bool)
    mask[rng.choice(n_steps, round(frac * n_steps), replace=False)] = True
    return mask


def make_table(
    n_steps: int = 50,
    *,
    seed: int = 0,
    output_first: float = 0.9,
    estimators: tuple[str, ...] = ("noise_scale", "var_per_element", "twobatch_trace",
                                   "unit_nsr_median"),
    columns: bool = True,
    loss_scale: float = 1.0,
) -> pd.DataFrame:
    """A long table ``step, layer, role, stat, value`` of one run.

    For every estimator the output layer is the largest in exactly ``output_first`` of the
    steps (by a factor 2 to 4) and below the largest other layer (by a factor 0.5 to 0.8) in the
    rest. Column spread: output > embedding > hidden, vectors have none.
    """
    rng = np.random.default_rng(seed)
    lay = layers()
    first = first_steps(n_steps, output_first, seed + 1)
    rows: list[tuple[int, str, str, str, float]] = []
    for t in range(n_steps):
        for est in estimators:
            base = {name: float(np.exp(rng.normal(0.0, 0.5))) for name, _, _ in lay}
            if est == "twobatch_trace":  # spans decades: log colour scale
                base = {k: v * 10.0 ** (i % 5) for i, (k, v) in enumerate(base.items())}
            top = max(v for k, v in base.items() if k != OUTPUT)
            base[OUTPUT] = top * (rng.uniform(2, 4) if first[t] else rng.uniform(0.5, 0.8))
            rows += [(t, name, role, est, base[name]) for name, role, _ in lay]
        for name, role, _ in lay:
            rows.append((t, name, role, "grad_norm", float(np.exp(rng.normal(0, 0.3)))))
            rows.append((t, name, role, "nonfinite_count", 0.0))
            if columns and role != "vector":
                level = {"output": 3.0, "embedding": 2.0, "hidden": 1.0}[role]
                rows.append((t, name, role, "unit_rms_cv", level * float(rng.uniform(0.9, 1.1))))
                rows.append((t, name, role, "unit_rms_gini", level / 10 * float(rng.uniform(0.9, 1.1))))
                rows.append((t, name, role, "fan_rms_cv", float(rng.uniform(0.5, 1.5))))
        rows.append((t, "global", "global", "loss", loss_scale * (5.0 * np.exp(-t / 30) + 1.0)))
        rows.append((t, "global", "global", "microbatches", 2.0))
    return pd.DataFrame(rows, columns=["step", "layer", "role", "stat", "value"])


def make_spikes() -> pd.DataFrame:
    """Four events: two global grad-norm spikes (attributed), a loss spike, a SPAM event."""
    rows = [
        dict(step=7, layer="global", kind="grad_norm_global", value=12.0, score=4.1,
             layers=[OUTPUT, "model.layers.1.mlp.down_proj.weight"]),
        dict(step=12, layer="model.layers.0.self_attn.q_proj.weight", kind="grad_norm",
             value=3.0, score=3.2, layers=[]),
        dict(step=20, layer="global", kind="grad_norm_global", value=15.0, score=5.0,
             layers=[OUTPUT, "model.embed_tokens.weight"]),
        dict(step=20, layer="global", kind="loss", value=9.0, score=3.0, layers=[]),
    ]
    return pd.DataFrame(rows, columns=["step", "layer", "kind", "value", "score", "layers"])


def write_run(path: Path, df: pd.DataFrame, spikes: pd.DataFrame | None, *, name: str,
              optimizer: str = "SCALE", preset: str = "standard") -> Path:
    """A run directory as the table sink writes it: run.json, stats.csv, spikes.jsonl."""
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "name": name, "gradlens_version": "0.1.0", "model": "LlamaForCausalLM",
        "optimizer": optimizer, "preset": preset, "log_every": 1, "world_size": 1,
        "layers": [dict(name=n, role=r, layout="vector" if len(s) == 1 else (
            "embedding" if r == "embedding" else "linear"), shape=s,
            numel=int(np.prod(s)), group=r) for n, r, s in layers()],
    }
    (path / "run.json").write_text(json.dumps(meta, indent=1))
    df[["step", "layer", "role", "stat", "value"]].to_csv(path / "stats.csv", index=False)
    with open(path / "spikes.jsonl", "w") as f:
        for rec in ([] if spikes is None else spikes.to_dict("records")):
            f.write(json.dumps(rec) + "\n")
    return path
