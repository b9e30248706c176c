"""The per-example family's support rules, registration API, self-check and warning texts."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gradlens
from gradlens.families.per_example import CHECK_FAILED
from gradlens.families.per_example_rules import Outer, Summed, rule_for
from tests.conformance import _models as M


def _step(model, batches, loss_fn=None, lens=None, **kw):
    lens = lens or gradlens.GradLens(model, preset="full", noise_ema=0.0, **kw)
    for x in batches:
        out = model(x)
        loss = loss_fn(out) if loss_fn else out.square().mean()
        (loss / len(batches)).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lens.step()
        lens.flush()
    return lens, [str(w.message) for w in caught]


def _reasons(lens):
    return {e.layer: e.reason for e in lens.memory.events
            if e.kind == "validity" and e.family == "per_example"}


def _ids(*sizes, seq=5):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, M.VOCAB, (b, seq), generator=g) for b in sizes]


def test_rules_by_forward_not_name():
    assert rule_for(nn.Linear(2, 2))[0] is not None
    assert rule_for(M.PlainLinear(2, 2))[0] is not None  # keeps Linear's forward
    rule, why = rule_for(M.Linear(2, 2))  # torch's name, its own forward
    assert rule is None and "overrides forward" in why and "torch.nn.Linear" in why
    rule, why = rule_for(M.RawLinear(2, 2))
    assert rule is None and "RawLinear is not a module kind" in why


def test_register_refuses_silent_overwrite():
    class Mine(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2.0

    def rule(module, x, d):
        return {"weight": Outer(x, 2.0 * d), "bias": Summed(2.0 * d)}

    try:
        gradlens.register_per_example_rule(Mine, rule)
        assert rule_for(Mine(2, 2))[0] is rule
        with pytest.raises(ValueError, match="already has a per-example rule"):
            gradlens.register_per_example_rule(Mine, lambda m, x, d: {})
        with pytest.raises(ValueError, match="Linear already has a per-example rule"):
            gradlens.register_per_example_rule(nn.Linear, rule)
        gradlens.register_per_example_rule(Mine, rule)  # the same rule again: fine
        other = lambda m, x, d: {}  # noqa: E731
        gradlens.register_per_example_rule(Mine, other, replace=True)
        assert rule_for(Mine(2, 2))[0] is other
    finally:
        gradlens.unregister_per_example_rule(Mine)
    with pytest.raises(TypeError, match=r"cls must be an nn\.Module subclass"):
        gradlens.register_per_example_rule(int, rule)


def test_mup_example_matches_brute_force():
    """examples/mup_linear.py: the registered rule's pe_trace equals per-example autograd."""
    for name, (got, want) in M.mup_example().main().items():
        assert got == pytest.approx(want, rel=1e-5), name


def test_self_check_catches_a_wrong_rule():
    """A registered rule that forgets the multiplier: NaN with the self-check's reason."""
    ex = M.mup_example()
    gradlens.register_per_example_rule(
        ex.ScaledLinear, lambda m, x, d: {"weight": Outer(x, d), "bias": Summed(d)},
        replace=True)
    try:
        model = M.TokenMLP(ex.ScaledLinear).double()
        lens, _ = _step(model, _ids(3, 2))
    finally:
        ex.unregister()
    df = lens.memory.frame()
    r = _reasons(lens)
    for name in ("up.weight", "up.bias"):
        assert r[name] == CHECK_FAILED
        assert df[(df.layer == name) & (df.stat == "pe_trace")].value.isna().all()
    assert "down.weight" not in r  # the others pass the check


def test_self_check_every_tenth_logged_step_and_a_failure_stays(monkeypatch):
    """The check runs on logged steps 1, 11, 21 only (the others pay nothing for it), and a
    layer that failed stays NaN at every later step, checked or not."""
    from gradlens.families import per_example_check as C

    checked = []
    fails = C.DecompositionCheck._fails

    def spy(self, device, dtype):
        checked.append(self.logged)  # ``logged`` is already advanced: 1-based step number
        return fails(self, device, dtype)

    monkeypatch.setattr(C.DecompositionCheck, "_fails", spy)
    ex = M.mup_example()
    gradlens.register_per_example_rule(
        ex.ScaledLinear, lambda m, x, d: {"weight": Outer(x, d), "bias": Summed(d)},
        replace=True)
    try:
        model = M.TokenMLP(ex.ScaledLinear).double()
        lens = gradlens.GradLens(model, preset="full", noise_ema=0.0)
        for _ in range(25):
            _step(model, _ids(3, 2), lens=lens)
    finally:
        ex.unregister()
    assert checked == [1, 11, 21]
    df = lens.memory.frame()
    up = df[(df.layer == "up.weight") & (df.stat == "pe_trace")]
    down = df[(df.layer == "down.weight") & (df.stat == "pe_trace")]
    assert len(up) == 25 and up.value.isna().all()
    assert len(down) == 25 and down.value.notna().all()


def test_self_check_catches_a_weight_used_outside_its_module():
    model = M.TokenMLP().double()
    lens, _ = _step(model, _ids(3, 2),
                    loss_fn=lambda out: out.square().mean() + model.up.weight.square().sum())
    assert _reasons(lens) == {"up.weight": CHECK_FAILED}


def test_self_check_off():
    model = M.TokenMLP().double()
    lens, _ = _step(model, _ids(3, 2), per_example_check=False,
                    loss_fn=lambda out: out.square().mean() + model.up.weight.square().sum())
    assert "up.weight" not in _reasons(lens)  # the user's choice: not checked


def test_warnings_name_layers_few_then_count():
    lens, msgs = _step(M.NanoGPT().double(), _ids(3, 2, seq=4))
    ln = [m for m in msgs if "NanoLayerNorm" in m]
    assert len(ln) == 1 and "h.0.ln_1.weight, h.0.ln_1.bias, h.0.ln_2.weight and 7 more" in ln[0]
    wpe = [m for m in msgs if "built inside the model" in m]
    assert len(wpe) == 1 and "(wpe.weight)" in wpe[0]
    assert _reasons(lens)["wpe.weight"].startswith("the lookup's ids are built inside")


def test_batch_size_note_does_not_claim_nan():
    """A module seeing another batch size (wpe's (T,) ids): the note says how sizes were
    read, not that statistics are NaN."""
    _, msgs = _step(M.NanoGPT().double(), _ids(3, 2, seq=4))
    sizes = [m for m in msgs if "batch sizes" in m]
    assert sizes and all("NaN" not in m for m in sizes)
    assert sizes[0].startswith("gradlens: batch sizes: tracked layers saw different")


class Flatten(nn.Module):
    """An MLP over flattened tokens: its Linear sees (B*T, d) rows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.lin = nn.Embedding(M.VOCAB, 4), nn.Linear(4, 3)

    def forward(self, ids):
        return self.lin(self.emb(ids).reshape(-1, 4))


def test_flattened_tokens_reason_is_not_about_ids():
    lens, _ = _step(Flatten().double(), _ids(3, 2))
    why = _reasons(lens)["lin.weight"]
    assert "flattened tokens" in why and "expand" not in why
    assert "emb.weight" not in _reasons(lens)  # its ids are the model input: per-example


def test_frozen_mid_run_is_silent():
    model = M.TokenMLP().double()
    lens = gradlens.GradLens(model, preset="full", noise_ema=0.0)
    _step(model, _ids(3, 2), lens=lens)
    model.zero_grad(set_to_none=True)
    model.up.requires_grad_(False)
    _, msgs = _step(model, _ids(3, 2), lens=lens)
    assert not [m for m in msgs if "per_example" in m]
    assert not _reasons(lens)


def test_frozen_output_layer_warning():
    from gradlens.roles import discover_layers

    model = M.lora()
    with pytest.warns(UserWarning, match=r"the output layer \(.*lm_head.weight\) is frozen"):
        discover_layers(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        discover_layers(model)
    assert not [w for w in caught if "no output layer found" in str(w.message)]
