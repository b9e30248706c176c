"""Estimators under real conditions against independent references: per-micro-batch and
per-example backward passes on a shadow copy of the model (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from gradlens import GradLens
from gradlens.data import build_llama

VOCAB = 128


def _batches(sizes, seed=0, seq=10):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (b, seq), generator=g) for b in sizes]


def _grads(model, ids, names):
    params = dict(model.named_parameters())
    loss = model(input_ids=ids, labels=ids).loss
    return dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names]), strict=True))


def _reference(sizes, names, seed=0):
    """Exact two-batch and per-example quantities of one step from a shadow model."""
    shadow = build_llama("tiny", seed=seed).double()
    micro = _batches(sizes, seed)
    B, K = sum(sizes), len(sizes)
    gk = [_grads(shadow, ids, names) for ids in micro]
    pe = [_grads(shadow, ids[b:b + 1], names) for ids in micro for b in range(ids.shape[0])]
    out = {}
    for n in names:
        G = sum(g[n] for g in gk) / K  # the 'mean' convention: p.grad = mean of micro means
        v = [1.0 / K] * K
        c = sum(vk * vk / b for vk, b in zip(v, sizes, strict=True))
        a = sum(b * float(g[n].pow(2).sum()) for b, g in zip(sizes, gk, strict=True))
        y = float(G.pow(2).sum())
        tr = (a - B * y) / (K - B * c)
        m = sum(float(g[n].pow(2).sum()) for g in pe) / B
        out[n] = {"twobatch_trace": tr, "twobatch_signal": y - c * tr,
                  "pe_trace": (m - y) / (1 - c), "grad_norm_preclip": math.sqrt(y)}
    return out


def _lens_step(sizes, *, clip=None, value_clip=None, seed=0, preset="full", scaler=None):
    model = build_llama("tiny", seed=seed).double()
    lens = GradLens(model, preset=preset, noise_ema=0.0)
    for ids in _batches(sizes, seed):
        loss = model(input_ids=ids, labels=ids).loss / len(sizes)
        loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    if value_clip is not None:
        torch.nn.utils.clip_grad_value_(model.parameters(), value_clip)
    lens.step()
    lens.flush()
    df = lens.memory.frame()
    events = list(lens.memory.events)
    names = [i.name for i in lens.layers]
    lens.close()
    return df, events, names


def _value(df, layer, stat):
    sel = df[(df.layer == layer) & (df.stat == stat)]
    assert len(sel) == 1, (layer, stat)
    return float(sel.value.iloc[0])


CHECKED = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
           "lm_head.weight", "model.embed_tokens.weight")


@pytest.mark.parametrize("sizes", [(4, 4), (4, 2), (3, 1, 2)])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_two_batch_and_per_example_exact(sizes, clip):
    """Even and uneven micro-batches, with and without norm clipping: the raw gradient's
    estimators equal the exact ones."""
    df, events, names = _lens_step(sizes, clip=clip)
    ref = _reference(sizes, names)
    for layer in CHECKED:
        for stat in ("twobatch_trace", "twobatch_signal", "pe_trace", "grad_norm_preclip"):
            want = ref[layer][stat]
            assert _value(df, layer, stat) == pytest.approx(want, rel=1e-5, abs=1e-12), \
                (sizes, clip, layer, stat)
    assert not [e for e in events if e.kind == "validity"]


def test_value_clipping_is_nan_with_a_reason():
    df, events, _ = _lens_step((4, 4), value_clip=1e-3)
    for stat in ("twobatch_trace", "noise_scale", "pe_trace"):
        vals = df[df.stat == stat].value
        assert vals.isna().all(), stat
    reasons = {(e.family, e.reason) for e in events if e.kind == "validity"}
    assert {f for f, _ in reasons} >= {"twobatch", "per_example"}
    assert all("not one common factor" in r for _, r in reasons)
    # norms still describe the consumed gradient; the pre-clip norm is measured
    assert df[df.stat == "grad_norm"].value.notna().all()
    assert df[df.stat == "grad_norm_preclip"].value.notna().all()


class _Twice(torch.nn.Module):
    """A Linear applied twice (shared weights), a LayerNorm with gain and bias, a biased head."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(6, 6)
        self.norm = torch.nn.LayerNorm(6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.norm(self.inner(torch.tanh(self.inner(x)))))


def _pe_reference(model, xs, loss_fn):
    """Exact pe_trace per parameter: own-loss gradient of every example, 'mean' convention."""
    params = dict(model.named_parameters())
    K = len(xs)
    out = {}
    per = {n: [] for n in params}
    mean = {n: 0.0 for n in params}
    for x in xs:
        g_mb = torch.autograd.grad(loss_fn(model(x)), list(params.values()))
        for n, g in zip(params, g_mb, strict=True):
            mean[n] = mean[n] + g / K
        for b in range(x.shape[0]):
            gb = torch.autograd.grad(loss_fn(model(x[b:b + 1])), list(params.values()))
            for n, g in zip(params, gb, strict=True):
                per[n].append(float(g.pow(2).sum()))
    sizes = [x.shape[0] for x in xs]
    c = sum((1 / K) ** 2 / b for b in sizes)
    for n in params:
        m, y = sum(per[n]) / sum(sizes), float(mean[n].pow(2).sum())
        out[n] = (m - y) / (1 - c)
    return out


@pytest.mark.parametrize("seq", [False, True])
def test_shared_module_and_vector_parameters_exact(seq):
    """A module called twice per micro-batch (cross terms between its calls), LayerNorm gain
    and bias, Linear biases: per-example traces equal brute force, uneven micro-batches."""
    torch.manual_seed(0)
    model = _Twice().double()
    shape = (lambda b: (b, 4, 6)) if seq else (lambda b: (b, 6))
    xs = [torch.randn(*shape(b), dtype=torch.float64) for b in (5, 3)]
    loss_fn = lambda y: y.pow(2).mean()  # noqa: E731
    want = _pe_reference(model, xs, loss_fn)
    lens = GradLens(model, preset="full")
    for x in xs:
        (loss_fn(model(x)) / len(xs)).backward()
    lens.step()
    lens.flush()
    df = lens.memory.frame()
    assert not [e for e in lens.memory.events if e.kind == "validity"]
    lens.close()
    for name, value in want.items():
        assert _value(df, name, "pe_trace") == pytest.approx(value, rel=1e-5), name


def test_gradient_checkpointing_counts_each_module_once():
    """HF gradient checkpointing re-runs block forwards in backward: the recomputation is not
    a second call, and the per-example and two-batch values equal the plain run's."""
    def run(checkpoint: bool):
        model = build_llama("tiny", seed=3).double()
        if checkpoint:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        lens = GradLens(model, preset="full", noise_ema=0.0)
        for ids in _batches((3, 2), seed=3):
            (model(input_ids=ids, labels=ids).loss / 2).backward()
        lens.step()
        lens.flush()
        df = lens.memory.frame()
        events = [e for e in lens.memory.events if e.kind == "validity"]
        lens.close()
        return df, events

    plain, _ = run(False)
    ckpt, events = run(True)
    assert not events
    for layer in CHECKED:
        for stat in ("pe_trace", "twobatch_trace"):
            assert _value(ckpt, layer, stat) == pytest.approx(_value(plain, layer, stat),
                                                              rel=1e-6), (layer, stat)


def test_keyword_call_and_padding_idx():
    """A Linear called as ``layer(input=x)`` works; nn.Embedding's padding_idx rows carry no
    per-example gradient (brute force)."""
    torch.manual_seed(1)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(11, 4, padding_idx=0)
            self.out = torch.nn.Linear(4, 3)

        def forward(self, ids):
            return self.out(input=self.emb(ids))

    model = Net().double()
    ids = torch.tensor([[0, 3, 4], [5, 0, 0], [6, 7, 8], [0, 1, 2]])
    lens = GradLens(model, preset="full")
    model(ids).pow(2).mean().backward()
    lens.step()
    lens.flush()
    df = lens.memory.frame()
    lens.close()
    params = dict(model.named_parameters())
    per = []
    for b in range(4):
        g = torch.autograd.grad(model(ids[b:b + 1]).pow(2).mean(), [params["emb.weight"]])[0]
        per.append(float(g.pow(2).sum()))
    G = torch.autograd.grad(model(ids).pow(2).mean(), [params["emb.weight"]])[0]
    y, m = float(G.pow(2).sum()), sum(per) / 4
    assert _value(df, "emb.weight", "pe_trace") == pytest.approx(4 / 3 * (m - y), rel=1e-6)
    assert math.isfinite(_value(df, "out.weight", "pe_trace"))


def test_grad_scaler_with_clipping_equals_plain():
    """fp32 GradScaler (no overflow) plus norm clipping after unscale_: the same estimates as
    the plain unclipped run (the raw, unscaled gradient)."""
    def run(use_scaler: bool):
        model = build_llama("tiny", seed=2)
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if use_scaler else None
        lens = GradLens(model, opt, preset="standard", scaler=scaler, noise_ema=0.0)
        for ids in _batches((4, 2), seed=2):
            loss = model(input_ids=ids, labels=ids).loss / 2
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        lens.flush()
        df = lens.memory.frame()
        lens.close()
        return df

    plain, scaled = run(False), run(True)
    for stat in ("twobatch_trace", "twobatch_signal", "unit_nsr_median"):
        for layer in CHECKED:
            assert _value(scaled, layer, stat) == pytest.approx(
                _value(plain, layer, stat), rel=1e-3), (stat, layer)


def test_gns_preset_tracks_norm_gains_only():
    """``preset="gns"``: standard plus per-example norms of the normalization gains only, and
    the critical batch size from them; equal to the full preset's values for those layers."""
    def run(preset):
        model = build_llama("tiny", seed=4).double()
        lens = GradLens(model, preset=preset, noise_ema=0.0)
        for ids in _batches((4, 4), seed=4):
            (model(input_ids=ids, labels=ids).loss / 2).backward()
        lens.step()
        lens.flush()
        df = lens.memory.frame()
        lens.close()
        return df

    gns, full = run("gns"), run("full")
    pe = gns[(gns.stat == "pe_trace") & gns.value.notna()]
    assert set(pe.layer) and all("norm" in n for n in pe.layer)
    for layer in pe.layer:
        assert _value(gns, layer, "pe_trace") == pytest.approx(_value(full, layer, "pe_trace"),
                                                               rel=1e-9)
    assert "unit_rms_cv" in set(gns.stat) and "temporal_var" not in set(gns.stat)
    crit = gns[(gns.stat == "critical_batch_size") & (gns.layer == "global")].value
    assert len(crit) == 1
