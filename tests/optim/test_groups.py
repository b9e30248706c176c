"""scale_param_groups: roles, axes, ties, frozen tensors, overrides and ablation options."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gradlens.data import build_llama
from gradlens.optim import SCALE, scale_param_groups


def by_role(groups: list[dict]) -> dict[str, dict]:
    return {g["role"]: g for g in groups}


def test_llama_groups_follow_the_published_recipe() -> None:
    model = build_llama("tiny", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = scale_param_groups(model, lr=1e-3, lr_1d=2e-2)
    g = by_role(groups)
    assert set(g) == {"embedding", "hidden", "output", "vector"}
    assert (g["embedding"]["norm_dim"], g["embedding"]["momentum"]) == (0, 0.0)
    assert (g["hidden"]["norm_dim"], g["hidden"]["momentum"]) == (1, 0.0)
    assert (g["output"]["norm_dim"], g["output"]["momentum"]) == (1, 0.9)
    assert g["vector"]["algorithm"] == "adamw" and g["vector"]["lr_1d"] == 2e-2
    assert {x["lr"] for x in groups} == {1e-3}
    assert g["output"]["param_names"] == ["lm_head.weight"]
    n_params = sum(len(x["params"]) for x in groups)
    assert n_params == len(list(model.parameters()))


def test_gpt2_tied_embedding_warns_once_and_appears_once() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = scale_param_groups(model)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and "tied" in messages[0]
    wte = model.transformer.wte.weight
    hits = [g for g in groups for p in g["params"] if p is wte]
    assert len(hits) == 1 and hits[0]["role"] == "output"
    all_params = [p for g in groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params})
    conv = by_role(groups)["hidden"]
    assert conv["norm_dim"] == 0  # Conv1D stores (in, out): reduce over dim 0
    SCALE(groups)  # no duplicate-parameter error


def test_frozen_parameters_are_excluded() -> None:
    model = build_llama("tiny", seed=0)
    model.model.embed_tokens.weight.requires_grad_(False)
    groups = scale_param_groups(model)
    assert "embedding" not in by_role(groups)
    assert all(p.requires_grad for g in groups for p in g["params"])


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, kernel_size=3)
        self.proj = nn.Linear(4, 8)


def test_model_without_output_layer_warns_how_to_name_it() -> None:
    model = ConvNet()
    with pytest.warns(UserWarning, match=r"output='<module name>'"):
        groups = scale_param_groups(model)
    g = by_role(groups)
    assert set(g) == {"hidden", "vector"}
    assert g["hidden"]["norm_dim"] == 1 and len(g["hidden"]["params"]) == 2


def test_output_argument_names_the_output_layer() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = scale_param_groups(ConvNet(), output="proj")
    assert by_role(groups)["output"]["param_names"] == ["proj.weight"]


def test_ndim4_weight_update_has_unit_rms_per_output_channel() -> None:
    model = ConvNet()
    with pytest.warns(UserWarning):
        opt = SCALE(scale_param_groups(model, lr=1.0))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = model.conv.weight.detach().clone()
    opt.step()
    delta = (before - model.conv.weight.detach()).reshape(4, -1)
    torch.testing.assert_close(delta.pow(2).mean(dim=1).sqrt(), torch.ones(4))


def test_role_and_option_overrides() -> None:
    model = build_llama("tiny", seed=0)
    groups = scale_param_groups(
        model,
        overrides={
            "model.layers.1.mlp.down_proj.weight": "output",
            "model.layers.0.*_proj.weight": {"lr": 5e-4, "momentum": 0.5},
        },
    )
    special = [g for g in groups if g["lr"] == 5e-4]
    assert len(special) == 1 and special[0]["momentum"] == 0.5
    assert len(special[0]["params"]) == 7
    outputs = [g for g in groups if g["role"] == "output" and g["lr"] != 5e-4]
    assert outputs[0]["param_names"] == ["model.layers.1.mlp.down_proj.weight", "lm_head.weight"]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"nope.*": "output"}, "matches no parameter"),
        ({"nope.*": {"lr": 1.0}}, "matches no trainable parameter"),
        ({"lm_head.weight": {"learning_rate": 1.0}}, "unknown group option"),
    ],
)
def test_bad_overrides_raise(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        scale_param_groups(build_llama("tiny", seed=0), overrides=overrides)


def test_ablation_options() -> None:
    model = build_llama("tiny", seed=0)
    none = by_role(scale_param_groups(model, momentum_roles=()))
    assert all(g["momentum"] == 0.0 for g in none.values())
    every = by_role(scale_param_groups(model, momentum_roles=("output", "hidden", "embedding")))
    assert all(every[r]["momentum"] == 0.9 for r in ("output", "hidden", "embedding"))
    sgd = by_role(scale_param_groups(model, normalize=False))
    assert all(sgd[r]["norm_dim"] is None for r in ("output", "hidden", "embedding"))
    assert sgd["output"]["momentum"] == 0.9
    with pytest.raises(ValueError, match="AdamW"):
        scale_param_groups(model, momentum_roles=("vector",))
    with pytest.raises(ValueError, match="unknown role"):
        scale_param_groups(model, momentum_roles=("lm_head",))


def test_momentum_layers_add_momentum_to_named_layers() -> None:
    model = build_llama("tiny", seed=0)
    groups = scale_param_groups(
        model, lr=1e-3, momentum=0.8,
        momentum_layers=["model.layers.0.mlp.down_proj", "*.layers.1.self_attn.[qk]_proj.weight"],
    )
    momentum = {n: g["momentum"] for g in groups for n in g["param_names"]}
    chosen = {"model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight",
              "model.layers.1.self_attn.k_proj.weight", "lm_head.weight"}
    assert {n for n, m in momentum.items() if m > 0} == chosen
    assert {momentum[n] for n in chosen} == {0.8}
    assert len(momentum) == len(list(model.parameters()))
    opt = SCALE(groups)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    names = dict(model.named_parameters())
    with_buffer = {n for n, p in names.items() if "momentum_buffer" in opt.state[p]}
    assert with_buffer == chosen  # exactly the chosen matrices carry SCALE's output-style EMA
    buf = opt.state[names["model.layers.0.mlp.down_proj.weight"]]["momentum_buffer"]
    torch.testing.assert_close(buf, torch.full_like(buf, 0.2))  # (1 - 0.8) * g after one step


def test_momentum_layers_errors_name_the_bad_patterns() -> None:
    model = build_llama("tiny", seed=0)
    with pytest.raises(ValueError, match=r"\['model.layers.9.mlp', 'nope\*'\] match no"):
        scale_param_groups(model, momentum_layers=["model.layers.0.mlp.up_proj",
                                                   "model.layers.9.mlp", "nope*"])
    with pytest.raises(ValueError, match=r"\['\*norm\*'\] match only 1-D"):
        scale_param_groups(model, momentum_layers=["*norm*"])
    # a pattern over whole blocks is fine: its 1-D tensors stay AdamW
    groups = scale_param_groups(model, momentum_layers=["model.layers.0.*"])
    vec = next(g for g in groups if g["role"] == "vector")
    assert vec["momentum"] == 0.0 and vec["algorithm"] == "adamw"
