"""Layer discovery: roles, layouts and normalization axes on real model classes."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gradlens.roles import Role, discover_layers, output_units_view


def gpt2(tie: bool = True):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=8,
                     bos_token_id=0, eos_token_id=0, tie_word_embeddings=tie)
    return GPT2LMHeadModel(cfg)


def test_llama_roles(tiny_llama):
    infos = {i.name: i for i in discover_layers(tiny_llama)}
    assert infos["model.embed_tokens.weight"].role is Role.EMBEDDING
    assert infos["model.embed_tokens.weight"].norm_dim == 0
    assert infos["lm_head.weight"].role is Role.OUTPUT
    assert infos["lm_head.weight"].norm_dim == 1
    assert infos["model.layers.0.mlp.up_proj.weight"].role is Role.HIDDEN
    assert infos["model.norm.weight"].role is Role.VECTOR
    counts = {r: sum(i.role is r for i in infos.values()) for r in Role}
    assert counts == {Role.EMBEDDING: 1, Role.OUTPUT: 1, Role.HIDDEN: 14, Role.VECTOR: 5}


def test_gpt2_conv1d_and_tied_embeddings():
    model = gpt2(tie=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        infos = {i.name: i for i in discover_layers(model)}
    tied = [w for w in caught if "tied" in str(w.message)]
    assert len(tied) == 1
    wte = infos["transformer.wte.weight"]
    assert wte.role is Role.OUTPUT and wte.aliases == ("lm_head.weight",)
    assert "lm_head.weight" not in infos
    c_fc = infos["transformer.h.0.mlp.c_fc.weight"]
    assert c_fc.layout == "conv1d" and c_fc.param.shape == (16, 64)
    assert c_fc.norm_dim == 0  # stored (in, out): one RMS per output column
    view = output_units_view(c_fc.param, c_fc.layout)
    assert view.shape == (64, 16)
    assert infos["transformer.wpe.weight"].role is Role.EMBEDDING
    over = {i.name: i for i in discover_layers(model, overrides={"transformer.wte.weight":
                                                                    "embedding"}, warn=False)}
    assert over["transformer.wte.weight"].role is Role.EMBEDDING


def test_plain_module_output_guess_and_missing_output():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.conv = nn.Conv2d(1, 2, 3)
            self.head = nn.Linear(4, 10)

    infos = {i.name: i for i in discover_layers(Net())}
    assert infos["head.weight"].role is Role.OUTPUT
    assert infos["emb.weight"].role is Role.EMBEDDING
    assert infos["conv.weight"].layout == "other"
    assert output_units_view(infos["conv.weight"].param, "other").shape == (2, 9)
    with pytest.warns(UserWarning, match="output='<module name>'"):
        discover_layers(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)))
    named = discover_layers(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), output="1")
    assert [i.role for i in named if i.param.ndim == 2] == [Role.HIDDEN, Role.OUTPUT]


def test_frozen_and_bad_overrides(tiny_llama):
    tiny_llama.model.norm.weight.requires_grad_(False)
    names = [i.name for i in discover_layers(tiny_llama)]
    assert "model.norm.weight" not in names
    with pytest.raises(ValueError, match="matches no parameter"):
        discover_layers(tiny_llama, overrides={"nope*": "output"})
    with pytest.raises(ValueError, match="unknown role"):
        discover_layers(tiny_llama, overrides={"lm_head.weight": "head"})
    with pytest.raises(ValueError, match="not a module"):
        discover_layers(tiny_llama, output="decoder")
    with pytest.raises(ValueError, match="1-D"):
        discover_layers(tiny_llama, overrides={"model.layers.0.input_layernorm.weight": "hidden"})


def test_output_units_view_rejects_vectors():
    with pytest.raises(ValueError, match="matrix"):
        output_units_view(torch.zeros(3), "linear")
