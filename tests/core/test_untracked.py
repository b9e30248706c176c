"""The one warning for a parameter with a gradient that the lens does not track: a frozen one
unfrozen later (seen at the next logged step), and one added to the model later (seen at the
next walk of the whole model, every ``WALK_EVERY`` logged steps)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from gradlens import GradLens
from gradlens.core.run import WALK_EVERY


def _step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()


def _untracked_warnings(caught: list) -> list[str]:
    return [str(w.message) for w in caught if "not tracked" in str(w.message)]


def test_unfrozen_parameter_warns_once_with_its_name() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))
    model[1].bias.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lens = GradLens(model, opt, preset="minimal")
        _step(model, opt)
        assert _untracked_warnings(caught) == []
        model[1].bias.requires_grad_(True)
        for _ in range(3):
            _step(model, opt)
        lens.close()
    found = _untracked_warnings(caught)
    assert len(found) == 1
    assert "1 parameter(s)" in found[0] and "1.bias" in found[0]


def test_parameter_added_later_is_found_by_the_next_walk() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lens = GradLens(model, opt, preset="minimal")
        _step(model, opt)
        model.register_parameter("extra", nn.Parameter(torch.ones(2)))
        model.forward = lambda x: nn.Sequential.forward(model, x) * model.extra  # type: ignore
        steps = 1
        while not _untracked_warnings(caught):
            _step(model, opt)
            steps += 1
            assert steps <= WALK_EVERY + 1, "no warning by the next walk"
        lens.close()
    found = _untracked_warnings(caught)
    assert len(found) == 1 and "extra" in found[0]
    assert steps == WALK_EVERY + 1  # found at the walk, not before
