"""make_optimizer / OPTIMIZERS: every name builds on a tiny LLaMA and takes a step."""

from __future__ import annotations

import pytest
import torch

from gradlens.data import build_llama
from gradlens.optim import OPTIMIZERS, OptimizerSpec, make_optimizer, register_optimizer
from tests.optim._helpers import backward_random_batch

NAMES = ["adamw", "scale", "colnorm_sgd", "colnorm_sgd_momentum_all", "sgd_output_momentum",
         "swan", "stable_spam", "muon", "sgd"]


def test_registry_lists_every_name_with_a_description_and_lr() -> None:
    assert list(OPTIMIZERS) == NAMES
    for name, spec in OPTIMIZERS.items():
        assert spec.name == name and spec.description and spec.note
        assert spec.lr > 0 and isinstance(spec.published, bool)
    assert OPTIMIZERS["scale"].published and OPTIMIZERS["scale"].lr == 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_every_name_builds_and_one_step_changes_every_parameter(name: str) -> None:
    if name == "muon" and not hasattr(torch.optim, "Muon"):
        pytest.skip("this torch has no torch.optim.Muon")
    model = build_llama("tiny", seed=0)
    opt = make_optimizer(name, model)
    assert isinstance(opt, torch.optim.Optimizer)
    assert {g["lr"] for g in opt.param_groups} >= {OPTIMIZERS[name].lr}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    backward_random_batch(model)
    opt.step()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
        assert not torch.equal(p.detach(), before[n]), f"{name}: {n} did not move"


def test_lr_and_options_are_passed_on() -> None:
    model = build_llama("tiny", seed=0)
    opt = make_optimizer("scale", model, lr=5e-4, lr_1d=1e-2, foreach=False)
    assert {g["lr"] for g in opt.param_groups} == {5e-4}
    assert {g["foreach"] for g in opt.param_groups} == {False}
    assert next(g for g in opt.param_groups if g["role"] == "vector")["lr_1d"] == 1e-2
    opt = make_optimizer("swan", model, lr=2e-3, adam_lr=1e-4, ns_steps=4)
    assert {(g["role"], g["lr"]) for g in opt.param_groups} == {
        ("hidden", 2e-3), ("embedding", 1e-4), ("vector", 1e-4), ("output", 1e-4)}
    assert {g["ns_steps"] for g in opt.param_groups} == {4}
    opt = make_optimizer("adamw", model, betas=(0.9, 0.999))
    assert opt.param_groups[0]["betas"] == (0.9, 0.999) and opt.param_groups[0]["foreach"]
    opt = make_optimizer("stable_spam", model, update_interval=500)
    assert opt.param_groups[0]["update_interval"] == 500


def test_unknown_name_lists_the_names() -> None:
    with pytest.raises(ValueError, match="unknown optimizer 'lion'") as err:
        make_optimizer("lion", build_llama("tiny", seed=0))
    for name in NAMES:
        assert name in str(err.value)


def test_register_optimizer_adds_one_entry_and_refuses_a_clash() -> None:
    spec = OptimizerSpec("adagrad_test", "torch.optim.Adagrad", 0.05, False, "a test entry",
                         lambda model, lr, **kw: torch.optim.Adagrad(model.parameters(), lr=lr))
    try:
        assert register_optimizer(spec) is spec
        opt = make_optimizer("adagrad_test", build_llama("tiny", seed=0))
        assert isinstance(opt, torch.optim.Adagrad) and opt.param_groups[0]["lr"] == 0.05
        with pytest.raises(ValueError, match="'adagrad_test' is already registered"):
            register_optimizer(spec)
    finally:
        OPTIMIZERS.pop("adagrad_test", None)
    with pytest.raises(ValueError, match="lr must be > 0"):
        register_optimizer(OptimizerSpec("bad_lr", "", 0.0, False, "", spec.build))
    assert "bad_lr" not in OPTIMIZERS
