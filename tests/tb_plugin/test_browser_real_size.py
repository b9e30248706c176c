"""The gradlens tab at real model size (111 and 291 tensors), rendered by headless Chromium.

Every drawn row carries a label (a tensor, or a collapsed block naming its block and size);
the view controls (sort, filter, step range, colour clipping) work from the page's query. Set
``GRADLENS_SCREENSHOTS=<dir>`` to keep the screenshots (the docs/ images come from here).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gradlens.schema import STAT_COLUMNS
from tests.tb_plugin.test_browser import CHROMIUM, _chromium, serving

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                       "(apt-get install chromium)"),
]

STEPS = np.arange(1, 301)
SPIKE_STEP = 150


_LEAVES = [("input_layernorm", "vector"), ("self_attn.q_proj", "hidden"),
           ("self_attn.k_proj", "hidden"), ("self_attn.v_proj", "hidden"),
           ("self_attn.o_proj", "hidden"), ("post_attention_layernorm", "vector"),
           ("mlp.gate_proj", "hidden"), ("mlp.up_proj", "hidden"), ("mlp.down_proj", "hidden")]


def llama_layers(n_blocks: int) -> list[tuple[str, str]]:
    """A LLaMA's tensors in model order: 9 per block, 9 * n_blocks + 3 in all."""
    blocks = [(f"model.layers.{b}.{leaf}.weight", role) for b in range(n_blocks)
              for leaf, role in _LEAVES]
    return [("model.embed_tokens.weight", "embedding"), *blocks, ("model.norm.weight", "vector"),
            ("lm_head.weight", "output")]


def _run(run: Path, n_blocks: int) -> None:
    """A synthetic LLaMA run: log-normal grad norms, one x1e4 spike step with its events."""
    run.mkdir(parents=True)
    lay = llama_layers(n_blocks)
    meta = {"name": run.name, "finished": True, "layers": [{"name": n, "role": r} for n, r in lay]}
    (run / "run.json").write_text(json.dumps(meta))
    rng = np.random.default_rng(n_blocks)
    level = rng.normal(0, 1.5, size=(len(lay), 1))  # each tensor its own scale
    v = np.exp(level + 0.3 * rng.normal(size=(len(lay), len(STEPS))) - np.log1p(STEPS / 100))
    v[:, STEPS == SPIKE_STEP] *= 1e4
    pd.DataFrame({"step": np.tile(STEPS, len(lay)), "layer": np.repeat([n for n, _ in lay], len(STEPS)),
                  "role": np.repeat([r for _, r in lay], len(STEPS)), "stat": "grad_norm",
                  "value": v.ravel()})[list(STAT_COLUMNS)].to_csv(run / "stats.csv", index=False)
    rows = [{"step": SPIKE_STEP, "layer": "global", "kind": "grad_norm_global", "value": 1.0,
             "score": 9.0, "layers": []},
            {"step": SPIKE_STEP, "layer": "lm_head.weight", "kind": "grad_norm", "value": 1.0,
             "score": 9.0, "layers": []}]
    (run / "spikes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("board")
    logdir = tmp / "runs"
    _run(logdir / "llama12", 12)
    _run(logdir / "llama32", 32)
    with serving(logdir) as base:
        yield base, tmp


def _page(board: tuple[str, Path], name: str, query: str, size: str) -> str:
    base, tmp = board
    shot = tmp / f"{name}.png"
    dom = _chromium(f"{base}/data/plugin_entry.html?name=gradlens&{query}", tmp, shot, size=size)
    keep = os.environ.get("GRADLENS_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
    return dom


def _labels(dom: str) -> tuple[list[str], list[tuple[str, int]]]:
    layers = [html.unescape(x) for x in re.findall(r'class="gl-label"[^>]*data-layer="([^"]+)"', dom)]
    groups = [(g, int(n)) for g, n in re.findall(
        r'class="gl-label gl-group-row"[^>]*data-group-row="([^"]+)" data-rows="(\d+)"', dom)]
    return layers, groups


def _rows_shown(dom: str) -> tuple[int, int]:
    m = re.search(r"(\d+) rows shown of (\d+) tensors", dom)
    assert m, dom[:3000]
    return int(m.group(1)), int(m.group(2))


@pytest.mark.parametrize(("run", "n"), [("llama12", 111), ("llama32", 291)])
def test_every_row_is_labelled_at_real_size(board: tuple[str, Path], run: str, n: int) -> None:
    # expanded: one label per tensor, each tensor once, block headers between blocks
    dom = _page(board, f"plugin_{n}_tensors", f"gl_expand=1&gl_run={run}", "1400,3800")
    layers, groups = _labels(dom)
    names = [name for name, _ in llama_layers((n - 3) // 9)]
    assert sorted(layers) == sorted(names) and not groups
    assert _rows_shown(dom) == (n, n)
    # each label has text and a row of its own (no two labels at one height)
    texts = re.findall(r'class="gl-label"[^>]*>([^<]*)<', dom)
    tops = re.findall(r'class="gl-label"[^>]*style="[^"]*top: ?(\d+)px', dom)
    assert len(texts) == n and all(t.strip() for t in texts)
    assert len(set(tops)) == n
    n_blocks = (n - 3) // 9
    heads = re.findall(r'class="gl-group"[^>]*data-group="([^"]+)"', dom)
    assert len(heads) == n_blocks + 3  # embedding, the blocks, then vector and output
    assert heads[0] == "embedding" and heads[1] == "block 0"


def test_collapsed_blocks_name_every_block(board: tuple[str, Path]) -> None:
    # 111 rows are drawn expanded by default; 291 start collapsed, one labelled row per block
    dom = _page(board, "plugin_111_tensors_default", "gl_run=llama12", "1400,1900")
    layers, groups = _labels(dom)
    assert len(layers) == 111 and not groups
    dom = _page(board, "plugin_291_tensors_default", "gl_run=llama32", "1400,1100")
    layers, groups = _labels(dom)
    assert not layers and sum(k for _, k in groups) == 291
    assert len(groups) == 32 + 3  # embedding, 32 blocks, the final norm, output
    dom = _page(board, "plugin_collapsed", "gl_expand=0&gl_run=llama12", "1400,1100")
    layers, groups = _labels(dom)
    assert not layers and sum(k for _, k in groups) == 111
    assert [g for g, _ in groups][:3] == ["embedding", "block 0", "block 1"]
    assert all(re.fullmatch(r"block \d+|embedding|norms|output", g) for g, _ in groups)


def test_filter_sort_zoom_and_clip(board: tuple[str, Path]) -> None:
    # filter: the q_proj rows only, sorted by their median over steps 100..200
    dom = _page(board, "plugin_filtered", "gl_run=llama12&gl_filter=q_proj&gl_order=value&gl_from=100&gl_to=200"
                "&gl_clip=5,95", "1400,1000")
    layers, groups = _labels(dom)
    assert layers and all(x.endswith("q_proj.weight") for x in layers) and not groups
    assert _rows_shown(dom) == (len(layers), 111)
    # the sort: recompute the medians from the written table (flagged step 150 left out)
    df = pd.read_csv(board[1] / "runs" / "llama12" / "stats.csv")
    sel = df[df["layer"].str.endswith("q_proj.weight") & df["step"].between(100, 200)
             & (df["step"] != SPIKE_STEP)]
    med = sel.groupby("layer")["value"].median().sort_values(ascending=False)
    assert layers == list(med.index)
    assert "steps 100–200: 101 columns of 300 logged steps" in dom
    assert "percentiles 5–95 of the shown cells, flagged steps left out" in dom
    # the colour limits are the 5th/95th percentiles of log10 of the shown clean cells
    ticks = [float(t) for t in re.findall(r'class="gl-legend-tick"[^>]*>([^<]+)<', dom)]
    logs = np.log10(sel["value"].to_numpy())
    lo, hi = np.percentile(logs, [5, 95])
    assert ticks[0] == pytest.approx(10 ** lo, rel=1e-3)
    assert ticks[2] == pytest.approx(10 ** hi, rel=1e-3)
    # with flagged steps included the spike (x1e4) lifts the top of the scale
    dom = _page(board, "plugin_flagged_in", "gl_run=llama12&gl_filter=q_proj&gl_from=100&gl_to=200"
                "&gl_clip=0,100&gl_flagged=1", "1400,1000")
    top_clean = float(re.findall(r'class="gl-legend-tick"[^>]*>([^<]+)<', dom)[2])
    dom = _page(board, "plugin_flagged_in", "gl_run=llama12&gl_filter=q_proj&gl_from=100&gl_to=200"
                "&gl_clip=0,100&gl_flagged=0", "1400,1000")
    top_all = float(re.findall(r'class="gl-legend-tick"[^>]*>([^<]+)<', dom)[2])
    sel_all = df[df["layer"].str.endswith("q_proj.weight") & df["step"].between(100, 200)]
    assert top_clean == pytest.approx(sel["value"].max(), rel=1e-3)
    assert top_all == pytest.approx(sel_all["value"].max(), rel=1e-3)
