"""Several optimizers stepping in turn (Muon on the hidden matrices + AdamW on the rest, each
stepping and zeroing its own parameters): every logged step against a float64 reference
computed from the weights of that step, and the layers the lens cannot see named."""

from __future__ import annotations

import math

import pytest
import torch

from gradlens import GradLens
from gradlens.data import build_llama
from gradlens.stats import SpikeConfig
from tests.conformance._harness import compare, validity, value
from tests.conformance._reference import Case, causal_shares, hf_loss, reference

VOCAB = 128
STEPS = 3
STATS = ("grad_norm", "grad_norm_preclip", "twobatch_trace", "twobatch_signal",
         "unit_nsr_median")


def _batches(step: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + step)
    start = torch.randint(0, VOCAB, (8, 1), generator=g)
    ids = (start + torch.arange(10)) % VOCAB
    return [{"input_ids": ids[:4], "labels": ids[:4]}, {"input_ids": ids[4:], "labels": ids[4:]}]


def _case(batches) -> Case:
    return Case(build=lambda: None, batches=batches, loss=hf_loss, shares=causal_shares,
                size=lambda b: int(b["input_ids"].shape[0]))


def _split(model):
    """Muon's 2-D hidden matrices and the rest (embedding, lm_head, norms) for AdamW."""
    hidden = [p for n, p in model.named_parameters()
              if p.ndim == 2 and "embed" not in n and "lm_head" not in n]
    ids = {id(p) for p in hidden}
    return hidden, [p for p in model.parameters() if id(p) not in ids]


def _train(give: str, order: str = "muon_first", clip: float | None = 1.0, preset="standard",
           zero_to_none: bool = True):
    """STEPS training steps of 2 micro-batches; each optimizer steps and zeroes its own
    parameters. ``give``: ``both`` or ``adamw`` (the optimizers handed to the lens)."""
    torch.manual_seed(0)
    model = build_llama("tiny", seed=7).double()
    hidden, rest = _split(model)
    muon = torch.optim.Muon(hidden, lr=0.02)
    adamw = torch.optim.AdamW(rest, lr=1e-2)
    given = [muon, adamw] if give == "both" else [adamw]
    lens = GradLens(model, given, preset=preset, noise_ema=0.0)
    pairs = [(muon, adamw), (adamw, muon)][order != "muon_first"]
    shadows = []
    for step in range(STEPS):
        shadow = build_llama("tiny", seed=7).double()
        shadow.load_state_dict(model.state_dict())  # this step's weights
        shadows.append(shadow)
        for batch in _batches(step):
            (model(**batch).loss / 2).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for opt in pairs:
            opt.step()
            opt.zero_grad(set_to_none=zero_to_none)
    lens.close()
    return lens, shadows


@pytest.mark.parametrize("order", ["muon_first", "adamw_first"])
def test_two_optimizers_each_zeroing_its_own(order):
    """Both optimizers given: one lens step per training step, every layer's row and the
    global rows (raw and consumed) equal the float64 reference of that step's weights: norms
    rel 1e-6 (float64 sums written as float32, rel 6e-8 per rounding), the variance
    estimators rel 1e-5 like the rest of the matrix (the per-unit ratios of differences
    amplify the float32 rounding of their terms)."""
    lens, shadows = _train("both", order)
    assert lens.step_count == STEPS
    df, events = lens.memory.frame(), list(lens.memory.events)
    assert not [e for e in events if e.kind == "validity"], validity(events)
    layers = [(i.name, i.layout) for i in lens.layers]
    for step, shadow in enumerate(shadows, start=1):
        ref = reference(_case(_batches(step - 1)), layers, clip=1.0, shadow=shadow)
        rows = df[df.step == step]
        compare(rows, events, lens, ref, tol=1e-5, stats=STATS, label=f"two-opt {order} {step}")
        for stat in ("grad_norm", "grad_norm_preclip"):
            want = math.sqrt(sum(r[stat] ** 2 for r in ref.values()))
            got = value(rows, "global", stat)
            assert abs(got - want) <= 1e-6 * want, (step, stat, got, want)


def test_layers_of_an_optimizer_not_given_are_named_and_global_is_nan():
    """Only AdamW given, Muon steps and zeroes first: the lens cannot see Muon's layers. The
    global rows are NaN (not a norm over part of the model), a validity event names the
    layers, and AdamW's layers are still right."""
    lens, shadows = _train("adamw", "muon_first")
    df, events = lens.memory.frame(), list(lens.memory.events)
    hidden_names = {i.name for i in lens.layers if i.layout != "vector" and "embed" not in i.name
                    and "lm_head" not in i.name}
    for step in range(1, STEPS + 1):
        rows = df[df.step == step]
        for stat in ("grad_norm", "grad_norm_preclip", "grad_norm_z"):
            assert math.isnan(value(rows, "global", stat)), (step, stat)
    reasons = [e for e in events if e.kind == "validity" and e.family == "norms"]
    # one event per layer the lens cannot see, each with the reason (which names a few)
    assert {e.layer for e in reasons} == hidden_names
    assert all("none of the optimizers given" in e.reason for e in reasons)
    assert "model.layers.0.self_attn.q_proj.weight" in reasons[0].reason
    ref = reference(_case(_batches(0)), [(i.name, i.layout) for i in lens.layers], clip=1.0,
                    shadow=shadows[0])
    rows = df[df.step == 1]
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        got = value(rows, name, "grad_norm_preclip")
        assert abs(got - ref[name]["grad_norm_preclip"]) <= 1e-6 * got, name
    for name in hidden_names:
        assert not (rows.layer == name).any() or rows[rows.layer == name].value.isna().all()


def test_gradient_set_to_none_after_backward_is_named():
    """The optimizers own everything, but the loop drops a layer's gradient after the
    backward (``minimal``: the backward passes are counted for several optimizers): that
    layer is named and the global rows are NaN."""
    model = build_llama("tiny", seed=7).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt2 = torch.optim.SGD(model.parameters(), lr=0.0)
    lens = GradLens(model, [opt, opt2], preset="minimal")
    for batch in _batches(0):
        (model(**batch).loss / 2).backward()
    model.lm_head.weight.grad = None
    opt.step()
    opt2.step()
    lens.close()
    df, events = lens.memory.frame(), list(lens.memory.events)
    assert lens.step_count == 1
    assert math.isnan(value(df, "global", "grad_norm"))
    why = [e for e in events if e.kind == "validity" and e.family == "norms"]
    assert len(why) == 1 and why[0].layer == "lm_head.weight"
    assert "backward pass reached them" in why[0].reason
    assert value(df, "model.norm.weight", "grad_norm") > 0


def test_optimizer_argument_is_checked():
    model = build_llama("tiny", seed=7)
    with pytest.raises(TypeError, match=r"optimizer\[1\] must be a torch.optim.Optimizer"):
        GradLens(model, [torch.optim.SGD(model.parameters(), lr=0.1), object()])
    with pytest.raises(ValueError, match="empty list"):
        GradLens(model, [])


def test_spam_fraction_reads_each_optimizers_state():
    """``spam_fraction`` with two AdamW on disjoint layers: each layer's fraction is computed
    from its own optimizer's ``exp_avg_sq`` before the step (numpy, float64, by hand), at a
    theta that gives fractions strictly between 0 and 1."""
    import numpy as np

    model = build_llama("tiny", seed=7).double()
    hidden, rest = _split(model)
    opt_a = torch.optim.AdamW(hidden, lr=1e-2)
    opt_b = torch.optim.AdamW(rest, lr=1e-2)
    seen: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def capture(opt, args, kwargs):  # registered first: runs before the lens's pre-hook
        for o in (opt_a, opt_b):
            for p in (q for g in o.param_groups for q in g["params"]):
                v = o.state.get(p, {}).get("exp_avg_sq")
                if v is not None and p.grad is not None and id(p) not in seen:
                    seen[id(p)] = (p.grad.numpy().copy(), v.numpy().copy())

    opt_a.register_step_pre_hook(capture)
    opt_b.register_step_pre_hook(capture)
    theta = 2.0
    lens = GradLens(model, [opt_a, opt_b], preset="minimal", spam=True,
                    spikes=SpikeConfig(spam_theta=theta))
    for step in range(2):
        seen.clear()
        for batch in _batches(step):
            (model(**batch).loss / 2).backward()
        for opt in (opt_b, opt_a):
            opt.step()
            opt.zero_grad()
    lens.close()
    rows = lens.memory.frame()
    rows = rows[(rows.step == 2) & (rows.stat == "spam_fraction")]
    checked = set()
    for info in lens.layers:
        g, v = seen[id(info.param)]
        want = float(np.mean(g.astype(np.float64) ** 2 > theta * v))
        got = value(rows, info.name, "spam_fraction")
        assert abs(got - want) <= 1e-7, (info.name, got, want)
        checked.add(any(info.param is p for p in hidden))
    assert checked == {True, False}  # layers of both optimizers
    fractions = rows.value.to_numpy()
    assert (fractions > 0).any() and (fractions < 1).any()
