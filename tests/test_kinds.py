"""One vocabulary of layer kinds and one colour per kind: the lens writes kinds, old runs'
role names are mapped when read, and every screen takes its colours from gradlens.kinds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import torch

from gradlens import GradLens
from gradlens.data import build_llama
from gradlens.kinds import KIND_COLORS, KINDS, layer_kind, with_kinds
from gradlens.report import plots
from gradlens.report.load import load_run
from gradlens.schema import GLOBAL, LAYER_GROUPS

LLAMA = {
    "model.embed_tokens.weight": ("embedding", "embedding"),
    "model.layers.0.self_attn.q_proj.weight": ("hidden", "attention"),
    "model.layers.0.mlp.down_proj.weight": ("hidden", "mlp"),
    "model.layers.0.input_layernorm.weight": ("vector", "norms"),
    "model.norm.weight": ("vector", "norms"),
    "lm_head.weight": ("output", "output"),
    "classifier.bias": ("vector", "other"),
}


def test_old_roles_map_to_kinds_and_kinds_stay():
    for name, (role, kind) in LLAMA.items():
        assert layer_kind(name, role) == kind
        assert layer_kind(name, kind) == kind
    assert KINDS == LAYER_GROUPS and set(KIND_COLORS) == {*KINDS, GLOBAL}
    assert len(set(KIND_COLORS.values())) == len(KIND_COLORS)  # one colour each


def test_with_kinds_maps_an_old_table_only():
    old = pd.DataFrame({"step": 1, "layer": list(LLAMA), "role": [r for r, _ in LLAMA.values()],
                        "stat": "grad_norm", "value": 1.0})
    new = with_kinds(old)
    assert list(new["role"]) == [k for _, k in LLAMA.values()]
    assert list(old["role"]) == [r for r, _ in LLAMA.values()]  # the input is not changed
    assert with_kinds(new) is new


def test_the_lens_writes_kinds(tmp_path: Path):
    torch.manual_seed(0)
    model = build_llama("tiny", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    with GradLens(model, opt, logdir=tmp_path, preset="minimal", tensorboard=False,
                  background_io=False) as lens:
        for _ in range(2):
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    df = load_run(tmp_path)
    assert set(df["role"]) == {"embedding", "attention", "mlp", "norms", "output", GLOBAL}
    meta = json.loads((tmp_path / "run.json").read_text())
    for layer, info in zip(meta["layers"], lens.layers, strict=True):
        assert layer["role"] == layer["group"] == layer_kind(info.name, info.role.value)
        assert layer["scale_role"] == info.role.value  # the optimizer's, kept apart


def test_one_colour_map_everywhere():
    assert plots.ROLE_COLORS is KIND_COLORS
    static = Path(plots.__file__).parents[1] / "tensorboard" / "plugin" / "static"
    # the plugin's defaults are the kinds' colours, and the colours served with each heatmap's
    # bands and each role chart replace them
    heat = (static / "heatmap.js").read_text()
    body = re.search(r"export const ROLE_COLOURS = \{(.*?)\};", heat, re.S).group(1)
    defaults = dict(re.findall(r'(\w+): "(#[0-9a-f]{6})"', body))
    assert defaults == {k: v for k, v in KIND_COLORS.items() if k != GLOBAL}
    index = (static / "index.js").read_text()
    assert "ROLE_COLOURS[b.role] = b.color" in index and "s.color ||" in index
    for old in ('hidden:', 'vector:'):  # the internal roles are not kinds
        assert old not in heat + index
