"""core.packing: what a family hands to the flush's one collective is checked against its
catalog declaration (names, shapes, steps), and in one process reaches ``emit`` as returned
(no copy, no collective). The reductions across ranks are tested in ``tests/distributed``."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch

import gradlens
from gradlens.catalog import Partial
from gradlens.core.packing import Packing


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def _run(family: gradlens.Statistic, steps: int = 1, log_every: int = 1) -> Any:
    model = _model()
    lens = gradlens.GradLens(model, preset="minimal", log_every=log_every,
                             statistics=[family])
    try:
        for _ in range(steps):
            model(torch.randn(5, 4)).pow(2).sum().backward()
            lens.step()
            model.zero_grad()
        lens.flush()
        return lens.memory.frame()
    finally:
        lens._deferred.clear()
        lens.close()


class Peak(gradlens.Statistic):
    """Largest |g| per layer through a declared ``max`` partial; returns what ``returns``
    names (a test sets it), and keeps the view ``emit`` got."""

    name = "test_packing_peak"
    emits = ("test_packing_peak",)
    needs = frozenset({"step_grad"})
    partial_specs = (Partial("peak", "max"), Partial("count", "sum", shape="scalar"))
    returns: ClassVar[tuple[str, ...]] = ("peak",)
    every_step = False

    def observe(self, ctx) -> None:
        if ctx.grads is not None:
            ctx.data[self.name] = torch.stack([g.abs().max() for g in ctx.grads])

    def partials(self, ctx) -> dict[str, Any]:
        self.given = {n: (ctx.data[self.name] if n != "count" else torch.ones(()))
                      for n in self.returns}
        if "bad_shape" in self.returns:
            self.given = {"peak": ctx.data[self.name][:1]}
        return self.given

    def emit(self, ctx, red, out) -> None:
        self.got = red
        out[self.emits[0]] = red["peak"]


def test_one_process_hands_the_returned_values_to_emit():
    fam = Peak()
    df = _run(fam)
    assert fam.got is fam.given and fam.got["peak"] is fam.given["peak"]  # no copy
    rows = df[df.stat == "test_packing_peak"].set_index("layer").value
    want = df[(df.stat == "grad_max_abs") & (df.layer != "global")].set_index("layer").value
    assert len(rows) == 4 and (rows > 0).all()
    assert rows.sort_index().tolist() == want.sort_index().tolist()  # max is exact


def test_an_undeclared_partial_is_an_error_naming_family_and_partial():
    class Stray(Peak):
        name = "test_packing_stray"
        emits = ("test_packing_stray",)
        returns = ("peak", "spread")

    with pytest.raises(ValueError, match=r"family 'test_packing_stray' returned the partial "
                                         r"'spread', which its catalog declaration does not "
                                         r"list \(declared: \['count', 'peak'\]\)"):
        _run(Stray())


def test_a_partial_of_the_wrong_shape_is_an_error():
    class Short(Peak):
        name = "test_packing_short"
        emits = ("test_packing_short",)
        returns = ("bad_shape",)

    with pytest.raises(ValueError, match=r"'test_packing_short': partial 'peak' must have "
                                         r"shape \(4,\)"):
        _run(Short())


def test_a_logged_step_partial_at_an_unlogged_step_is_an_error():
    class Eager(Peak):
        name = "test_packing_eager"
        emits = ("test_packing_eager",)
        every_step = True

    with pytest.raises(ValueError, match="declared for logged steps only"):
        _run(Eager(), steps=2, log_every=2)


def test_packing_in_one_process_packs_nothing():
    p = Packing(world=1, layers=2)
    values = {"sq": torch.ones(2)}
    assert p.add(0, "norms", values, logged=True) is values
    assert p.pack is None
    p.reduce()  # nothing to do, no collective
