"""GradLens end to end on a tiny LLaMA: numbers against references computed here from p.grad,
per-micro-batch gradients and brute-force per-example gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradlens import GradLens
from gradlens.data import build_llama
from gradlens.roles import output_units_view
from tests.stats._reference import scale_normalize, temporal_reference

VOCAB = 128


def batches(n: int, batch: int = 4, seq: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n)]


def frame(lens: GradLens):
    lens.flush()
    return lens.memory.frame()


def value(df, step, layer, stat) -> float:
    sel = df[(df.step == step) & (df.layer == layer) & (df.stat == stat)]
    assert len(sel) == 1, (step, layer, stat, len(sel))
    return float(sel.value.iloc[0])


def train(model, lens=None, steps=3, micro=1, lr=1e-2, data=None, inject=None):
    """SGD loop with optional gradient accumulation; returns the grads seen at each step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    data = data or batches(steps * micro)
    seen = []
    for s in range(steps):
        for k in range(micro):
            ids = data[s * micro + k]
            loss = model(input_ids=ids, labels=ids).loss / micro
            loss.backward()
        if inject is not None:
            inject(s + 1, model)
        seen.append({n: p.grad.detach().clone() for n, p in model.named_parameters()
                     if p.grad is not None})
        if lens is not None:
            lens.step()
        for p in model.parameters():  # a NaN the test injected must not reach the weights
            if p.grad is not None:
                p.grad.nan_to_num_(0.0, 0.0, 0.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return seen


def test_norms_and_columns_match_reference():
    model = build_llama("tiny", seed=1)
    lens = GradLens(model, preset="standard")
    grads = train(model, lens, steps=2)
    df = frame(lens)
    for step, g in enumerate(grads, start=1):
        total = 0.0
        for info in lens.layers:
            ref = g[info.name].double().numpy()
            total += (ref**2).sum()
            assert value(df, step, info.name, "grad_norm") == pytest.approx(
                np.linalg.norm(ref), rel=1e-5)
            assert value(df, step, info.name, "grad_max_abs") == pytest.approx(
                np.abs(ref).max(), rel=1e-6)
            assert value(df, step, info.name, "nonfinite_count") == 0
            if info.layout == "vector":
                continue
            units = output_units_view(torch.from_numpy(ref), info.layout).numpy()
            r = np.sqrt((units**2).mean(axis=1))
            assert value(df, step, info.name, "unit_rms_cv") == pytest.approx(
                r.std() / r.mean(), rel=1e-4)
            assert value(df, step, info.name, "unit_rms_max_min") == pytest.approx(
                r.max() / r.min(), rel=1e-4)
            fan = np.sqrt((units**2).mean(axis=0))
            assert value(df, step, info.name, "fan_rms_cv") == pytest.approx(
                fan.std() / fan.mean(), rel=1e-4)
        assert value(df, step, "global", "grad_norm") == pytest.approx(math.sqrt(total), rel=1e-5)
    lens.close()


def test_lens_changes_nothing():
    base = build_llama("tiny", seed=2)
    watched = build_llama("tiny", seed=2)
    data = batches(6)
    train(base, None, steps=3, micro=2, data=data)
    with GradLens(watched, preset="full") as lens:
        train(watched, lens, steps=3, micro=2, data=data)
    for (n, p), (_, q) in zip(base.named_parameters(), watched.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_two_batch_estimator_matches_exact_computation():
    torch.manual_seed(0)
    model = build_llama("tiny", seed=3)
    micro, bs = 4, 2
    data = batches(micro, batch=bs, seed=5)
    # reference: the micro-batch mean gradients G_k, and G = mean_k G_k
    per_micro = []
    for ids in data:
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        per_micro.append({n: p.grad.double().clone() for n, p in model.named_parameters()})
    model.zero_grad()
    lens = GradLens(model, preset="standard", noise_ema=0.0)
    train(model, lens, steps=1, micro=micro, data=data)
    df = frame(lens)
    b_small, b_big = bs, bs * micro
    for info in lens.layers:
        gs = [m[info.name] for m in per_micro]
        big = torch.stack(gs).mean(0)
        small_sq = float(np.mean([float((g**2).sum()) for g in gs]))
        big_sq = float((big**2).sum())
        trace = (small_sq - big_sq) / (1 / b_small - 1 / b_big)
        signal = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
        assert value(df, 1, info.name, "twobatch_trace") == pytest.approx(trace, rel=1e-3)
        assert value(df, 1, info.name, "twobatch_signal") == pytest.approx(
            signal, rel=1e-3, abs=1e-3 * abs(trace) / b_big)
        ns = value(df, 1, info.name, "noise_scale")
        if signal > 0:
            assert ns == pytest.approx(trace / signal, rel=2e-3)
        else:  # no positive signal estimate: no noise scale
            assert math.isnan(ns)
        assert value(df, 1, info.name, "var_per_element") == pytest.approx(
            trace / info.numel, rel=1e-3)
    assert value(df, 1, "global", "microbatches") == micro
    lens.close()


def test_per_example_variance_matches_brute_force():
    model = build_llama("tiny", seed=4).double()
    ids = batches(1, batch=4, seed=7)[0]
    # brute force: one backward per example (loss of that example alone)
    per_ex = []
    for b in range(ids.shape[0]):
        model.zero_grad()
        x = ids[b:b + 1]
        model(input_ids=x, labels=x).loss.backward()
        per_ex.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad()
    lens = GradLens(model, preset="full")
    train(model, lens, steps=1, data=[ids])
    df = frame(lens)
    n = ids.shape[0]
    checked = 0
    for info in lens.layers:
        sel = df[(df.layer == info.name) & (df.stat == "pe_trace")]
        if sel.empty or not np.isfinite(sel.value.iloc[0]):
            continue
        gs = torch.stack([e[info.name] for e in per_ex])
        mean = gs.mean(0)
        ref = n / (n - 1) * (float((gs**2).sum() / n) - float((mean**2).sum()))
        assert float(sel.value.iloc[0]) == pytest.approx(ref, rel=1e-6), info.name
        checked += 1
    names = set(df[df.stat == "pe_trace"].layer)
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert checked >= 15
    lens.close()


def test_temporal_variance_matches_weighted_reference():
    """Every tracked matrix exact by default: temporal_var / temporal_var_normalized equal
    the EMA-weighted variance of the gradients the steps saw (float64 numpy, from the
    definition)."""
    model = build_llama("tiny", seed=6)
    lens = GradLens(model, preset="full", temporal_beta=0.8)
    seen = train(model, lens, steps=5)
    df = frame(lens)
    assert all(st["sketch_dim"] is None for st in lens.family("temporal").buffers.values())
    for info in lens.layers:
        if info.layout == "vector":
            continue
        gs = [step[info.name].double().numpy() for step in seen]
        ref, _ = temporal_reference(gs, 0.8, unbiased=True)
        assert value(df, 5, info.name, "temporal_var") == pytest.approx(ref, rel=2e-4), \
            info.name
        ref_n, _ = temporal_reference([scale_normalize(g, info.layout) for g in gs], 0.8,
                                      unbiased=True)
        assert value(df, 5, info.name, "temporal_var_normalized") == pytest.approx(
            ref_n / info.numel, rel=2e-4), info.name
    lens.close()


def test_temporal_budget_keeps_output_exact_and_sketches_the_rest():
    model = build_llama("tiny", seed=6)
    out_bytes = 2 * 4 * model.lm_head.weight.numel()
    lens = GradLens(model, preset="full", temporal_budget_bytes=out_bytes, sketch_dim=64)
    train(model, lens, steps=2)
    exact = {lens.layers[k].name for k, st in lens.family("temporal").buffers.items() if st["sketch_dim"] is None}
    assert exact == {"lm_head.weight"}
    assert all(st["mean"].shape == (64,) for k, st in lens.family("temporal").buffers.items()
               if lens.layers[k].name != "lm_head.weight")
    lens.close()


def test_nonfinite_gradient_is_an_event_not_a_poisoned_average():
    model = build_llama("tiny", seed=5)
    lens = GradLens(model, preset="standard")
    target = "model.layers.1.mlp.up_proj.weight"

    def inject(step, m):
        if step == 3:
            dict(m.named_parameters())[target].grad[0, :3] = float("nan")

    train(model, lens, steps=30, lr=0.0, inject=inject)
    df = frame(lens)
    assert value(df, 3, target, "nonfinite_count") == 3
    assert math.isfinite(value(df, 3, target, "grad_norm"))
    assert math.isfinite(value(df, 3, "global", "grad_norm"))
    assert math.isfinite(value(df, 30, target, "grad_norm_z"))  # armed after the warm-up
    assert all(math.isfinite(v) for v in df[(df.stat == "grad_norm")].value)
    events = [e for e in lens.memory.events if e.kind == "nonfinite"]
    assert [(e.step, e.layer, e.value) for e in events] == [(3, target, 3.0)]
    lens.close()


def test_spike_reported_at_its_step_and_layer_and_clean_run_is_quiet():
    model = build_llama("tiny", seed=6)
    target = "model.layers.0.self_attn.v_proj.weight"
    data = batches(8, seed=11)
    data = [data[i % 8] for i in range(240)]

    step = [0]

    def inject(s, m):
        step[0] = s + 1  # the next step's backward

    # the spike is in the raw gradient (the detectors read it): made by the backward itself
    dict(model.named_parameters())[target].register_hook(
        lambda g: g * 100.0 if step[0] == 200 else None)
    step[0] = 1
    lens = GradLens(model, preset="minimal", log_every=10)
    train(model, lens, steps=240, lr=1e-3, data=data, inject=inject)
    lens.flush()
    events = lens.memory.events
    assert [e for e in events if e.step != 200] == []
    layer_events = [e for e in events if e.kind == "grad_norm"]
    assert [(e.step, e.layer) for e in layer_events] == [(200, target)]
    glob = [e for e in events if e.kind == "grad_norm_global"]
    assert len(glob) == 1 and glob[0].layers[0] == target
    lens.close()


class _NoSync:
    """Make every tensor-to-Python conversion raise while active."""

    names = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.names}

        def boom(*a, **k):
            raise AssertionError("host sync in the hot path")

        for n in self.names:
            setattr(torch.Tensor, n, boom)

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("preset", ["minimal", "standard", "full"])
def test_no_host_sync_outside_flush(preset, clip):
    """Backward (the raw norms measured at its end while the loop clips) and the step."""
    model = build_llama("tiny", seed=7)
    lens = GradLens(model, preset=preset, log_every=3)
    data = batches(12, seed=3)
    for s in range(6):
        losses = []
        for k in range(2):
            ids = data[2 * s + k]
            loss = model(input_ids=ids, labels=ids).loss / 2
            losses.append(loss)
            if (s + 1) % 3 == 0:
                loss.backward()
                lens.observe_loss(loss)
            else:
                with _NoSync():
                    loss.backward()
                    lens.observe_loss(loss)
        if (s + 1) % 3 == 0:
            lens.step()  # the flush step may convert
        else:
            with _NoSync():
                if clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                lens.step()
        with torch.no_grad():
            for p in model.parameters():
                p.grad = None
    df = frame(lens)
    assert sorted(df.step.unique()) == [3, 6]
    assert len(df[(df.stat == "grad_norm_preclip") & (df.layer == "global")]) == 2
    lens.close()


def test_unused_and_frozen_parameters():
    model = build_llama("tiny", seed=8)
    model.model.layers[1].mlp.down_proj.weight.requires_grad_(False)
    lens = GradLens(model, preset="standard")
    assert all(i.name != "model.layers.1.mlp.down_proj.weight" for i in lens.layers)

    def drop(step, m):
        if step == 2:
            m.model.layers[0].self_attn.q_proj.weight.grad = None

    train(model, lens, steps=3, inject=drop)
    df = frame(lens)
    q = df[df.layer == "model.layers.0.self_attn.q_proj.weight"]
    assert sorted(q.step.unique()) == [1, 3]
    lens.close()


def test_state_dict_resumes_detectors():
    data = batches(4, seed=9)
    data = [data[i % 4] for i in range(40)]
    m1 = build_llama("tiny", seed=9)
    l1 = GradLens(m1, preset="minimal")
    train(m1, l1, steps=40, data=data)
    m2 = build_llama("tiny", seed=9)
    l2 = GradLens(m2, preset="minimal")
    train(m2, l2, steps=25, data=data[:25])
    saved = l2.state_dict()
    l3 = GradLens(m2, preset="minimal")
    l3.load_state_dict(saved)
    l2.close()
    train(m2, l3, steps=15, data=data[25:])
    a = frame(l1)
    b = frame(l3)
    za = a[(a.stat == "grad_norm_z") & (a.step > 25)].sort_values(["step", "layer"])
    zb = b[b.stat == "grad_norm_z"].sort_values(["step", "layer"])
    assert list(za.step) == list(zb.step)
    np.testing.assert_allclose(za.value.to_numpy(), zb.value.to_numpy(), rtol=1e-5)
    l1.close()
    l3.close()


@pytest.mark.parametrize("budget", [None, 40_000])
def test_state_dict_resumes_temporal_states(budget):
    """The temporal EMAs (stacked per shape; with a small budget some layers sketched) saved
    mid-run and loaded into a new lens continue as in an uninterrupted run."""
    data = batches(4, seed=5)
    data = [data[i % 4] for i in range(12)]
    opts = dict(preset="minimal", temporal=True, temporal_budget_bytes=budget)
    m1 = build_llama("tiny", seed=5)
    l1 = GradLens(m1, **opts)
    train(m1, l1, steps=12, data=data)
    m2 = build_llama("tiny", seed=5)
    l2 = GradLens(m2, **opts)
    train(m2, l2, steps=6, data=data[:6])
    saved = l2.state_dict()
    l2.close()
    l3 = GradLens(m2, **opts)
    l3.load_state_dict(saved)
    again = l3.state_dict()["families"]["temporal"]  # saved again before any step
    assert again.keys() == saved["families"]["temporal"].keys()
    for name, st in saved["families"]["temporal"].items():
        torch.testing.assert_close(again[name]["mean"], st["mean"], rtol=0, atol=0)
    train(m2, l3, steps=6, data=data[6:])
    fam = l3.family("temporal")
    assert (budget is None) == all(st["sketch_dim"] is None for st in fam.buffers.values())
    a, b = frame(l1), frame(l3)
    for stat in ("temporal_var", "temporal_var_normalized"):
        va = a[(a.stat == stat) & (a.step > 6)].sort_values(["step", "layer"])
        vb = b[b.stat == stat].sort_values(["step", "layer"])
        assert list(va.layer) == list(vb.layer) and len(va) > 0
        np.testing.assert_allclose(va.value.to_numpy(), vb.value.to_numpy(), rtol=1e-5)
    l1.close()
    l3.close()


def test_close_removes_hooks_and_is_idempotent():
    model = build_llama("tiny", seed=10)
    before = sum(len(p._backward_hooks or {}) for p in model.parameters())
    lens = GradLens(model, preset="full")
    lens.close()
    lens.close()
    after = sum(len(p._backward_hooks or {}) for p in model.parameters())
    assert before == after
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_bad_input_is_a_clear_error():
    model = build_llama("tiny", seed=0)
    with pytest.raises(ValueError, match="matches no parameter"):
        GradLens(model, include=["*nonexistent*"])
    with pytest.raises(ValueError, match="unknown preset"):
        GradLens(model, preset="everything")
    with pytest.raises(ValueError, match="log_every"):
        GradLens(model, log_every=0)
