"""Write docs/report_heatmap_{111,291}_tensors.png: the report's heatmap at real model size.

Synthetic LLaMA-shaped tables (12 and 32 blocks: 111 and 291 tensors, 60 logged steps) of a
signed statistic with one value of -160,000, drawn by gradlens.report.plots.plot_heatmap (the
symmetric-log colour scale keeps the other values apart). Run from the repository root:
``python scripts/docs_report_heatmaps.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from gradlens.report.plots import plot_heatmap

LEAVES = (("input_layernorm", "vector"), ("self_attn.q_proj", "hidden"),
          ("self_attn.k_proj", "hidden"), ("self_attn.v_proj", "hidden"),
          ("self_attn.o_proj", "hidden"), ("post_attention_layernorm", "vector"),
          ("mlp.gate_proj", "hidden"), ("mlp.up_proj", "hidden"), ("mlp.down_proj", "hidden"))


def table(n_blocks: int, n_steps: int = 60, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    lay = [("model.embed_tokens.weight", "embedding"),
           *((f"model.layers.{b}.{leaf}.weight", role) for b in range(n_blocks)
             for leaf, role in LEAVES),
           ("model.norm.weight", "vector"), ("lm_head.weight", "output")]
    rng = np.random.default_rng(seed)
    level = np.exp(rng.normal(0, 1, size=(len(lay), 1)))
    v = level * (1 + 0.3 * rng.normal(size=(len(lay), n_steps)))  # a few values below zero
    v[len(lay) // 2, n_steps // 2] = -160_000.0
    steps = np.arange(1, n_steps + 1) * 5
    df = pd.DataFrame({"step": np.tile(steps, len(lay)),
                       "layer": np.repeat([n for n, _ in lay], n_steps),
                       "role": np.repeat([r for _, r in lay], n_steps),
                       "stat": "noise_scale", "value": v.ravel()})
    return df, {"layers": [{"name": n, "role": r} for n, r in lay]}


def main() -> None:
    for n_blocks in (12, 32):
        df, meta = table(n_blocks)
        fig = plot_heatmap(df, "noise_scale", meta=meta,
                           title=f"noise_scale per layer and step ({len(meta['layers'])} tensors)")
        out = Path("docs") / f"report_heatmap_{len(meta['layers'])}_tensors.png"
        fig.savefig(out, dpi=100)
        print(out)


if __name__ == "__main__":
    main()
