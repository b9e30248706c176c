"""SCALE's named ablations: their group options, and a float64 numpy reference of each rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradlens.data import build_llama
from gradlens.optim import SCALE, VARIANTS, scale_variant_groups
from tests.optim._helpers import backward_random_batch
from tests.optim._reference import RefParam, reference_step

LR, LR_1D, WD = 1e-2, 2e-2, 0.05

# variant -> (normalize matrices?, roles with momentum), written out from the documentation
RULES: dict[str, tuple[bool, set[str]]] = {
    "scale": (True, {"output"}),
    "colnorm_sgd": (True, set()),
    "colnorm_sgd_momentum_all": (True, {"embedding", "hidden", "output"}),
    "sgd_output_momentum": (False, {"output"}),
}


def role_of(name: str, p: torch.Tensor) -> str:
    """The LLaMA roles by parameter name (not via gradlens.roles)."""
    if p.ndim == 1:
        return "vector"
    if "embed_tokens" in name:
        return "embedding"
    if name.startswith("lm_head"):
        return "output"
    return "hidden"


def test_variants_are_the_documented_four() -> None:
    assert list(VARIANTS) == list(RULES)


@pytest.mark.parametrize("variant", list(RULES))
def test_group_options(variant: str) -> None:
    normalize, momentum_roles = RULES[variant]
    groups = scale_variant_groups(build_llama("tiny", seed=0), variant, lr=LR, lr_1d=LR_1D)
    by_role = {g["role"]: g for g in groups}
    assert set(by_role) == {"embedding", "hidden", "output", "vector"}
    expected_axis = {"embedding": 0, "hidden": 1, "output": 1}
    for role in ("embedding", "hidden", "output"):
        g = by_role[role]
        assert g["algorithm"] == "scale" and g["lr"] == LR
        assert g["norm_dim"] == (expected_axis[role] if normalize else None), role
        assert g["momentum"] == (0.9 if role in momentum_roles else 0.0), role
    assert by_role["vector"]["algorithm"] == "adamw" and by_role["vector"]["lr_1d"] == LR_1D


@pytest.mark.parametrize("variant", list(RULES))
def test_steps_match_numpy_reference(variant: str) -> None:
    """Three steps (so that the momentum EMA matters: its first normalized step equals the
    gradient's) of each variant against the float64 reference of its rule."""
    normalize, momentum_roles = RULES[variant]
    model = build_llama("tiny", seed=0).double()
    opt = SCALE(scale_variant_groups(model, variant, lr=LR, lr_1d=LR_1D, weight_decay=WD))
    ref: dict[str, RefParam] = {}
    for name, p in model.named_parameters():
        w = p.detach().numpy().copy()
        role = role_of(name, p)
        if role == "vector":
            ref[name] = RefParam(w, "adamw")
        else:
            axis = (0 if role == "embedding" else 1) if normalize else None
            ref[name] = RefParam(w, "scale", axis=axis,
                                 beta=0.9 if role in momentum_roles else 0.0)
    for step in range(3):
        backward_random_batch(model, seed=step)
        grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
        opt.step()
        reference_step(ref, grads, lr_t=LR, lr_1d_t=LR_1D, wd=WD)
        for name, p in model.named_parameters():
            np.testing.assert_allclose(p.detach().numpy(), ref[name].w, rtol=1e-12,
                                       atol=1e-14, err_msg=f"{variant}: {name}")
    with_buffer = {role_of(n, p) for n, p in model.named_parameters()
                   if "momentum_buffer" in opt.state[p]}
    assert with_buffer == momentum_roles


def test_unknown_variant_lists_the_names() -> None:
    with pytest.raises(ValueError, match="colnorm_sgd_momentum_all") as err:
        scale_variant_groups(build_llama("tiny", seed=0), "lion", lr=1e-3)
    assert "'lion'" in str(err.value)
    for name in VARIANTS:
        assert name in str(err.value)


def test_variant_options_cannot_be_overridden() -> None:
    with pytest.raises(ValueError, match="momentum_roles"):
        scale_variant_groups(build_llama("tiny", seed=0), "scale", lr=1e-3,
                             momentum_roles=("hidden",))


def test_other_options_pass_through() -> None:
    groups = scale_variant_groups(build_llama("tiny", seed=0), "colnorm_sgd_momentum_all",
                                  lr=1e-3, momentum=0.5, weight_decay=0.1)
    matrices = [g for g in groups if g["role"] != "vector"]
    assert {g["momentum"] for g in matrices} == {0.5}
    assert {g["weight_decay"] for g in groups} == {0.1}
