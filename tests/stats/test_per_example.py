"""Per-example squared gradient norms against brute-force per-example autograd (float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from gradlens import stats as S
from gradlens.data import build_llama
from tests.stats._reference import np64

B, T = 3, 7
METHODS = ["gram", "direct", "auto"]
CHUNKS = [S.DEFAULT_CHUNK_ELEMS, 10]  # 10 forces time blocks, output blocks, one example/chunk


def example_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of one sequence."""
    return nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="mean")


@pytest.fixture(scope="module")
def llama_case():
    model = build_llama("tiny", seed=0).double()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (B, T), generator=gen)
    ids[:, 4] = ids[:, 1]  # repeated tokens within each sequence (embedding rows add up)
    ids[0, 6] = ids[0, 1]
    modules = {
        "q_proj": model.model.layers[0].self_attn.q_proj,
        "k_proj": model.model.layers[0].self_attn.k_proj,
        "lm_head": model.lm_head,
        "embed_tokens": model.model.embed_tokens,
    }
    captured: dict[str, list[torch.Tensor]] = {}

    def keep(name):
        def hook(module, inputs, output):
            captured[name] = [inputs[0].detach()]
            output.register_hook(lambda d: captured[name].append(d.detach()))
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in modules.items()]
    logits = model(input_ids=ids).logits
    sum(example_loss(logits[b], ids[b]) for b in range(B)).backward()
    for h in handles:
        h.remove()

    brute = {n: [] for n in modules}
    for b in range(B):
        model.zero_grad(set_to_none=True)
        example_loss(model(input_ids=ids[b:b + 1]).logits[0], ids[b]).backward()
        for n, m in modules.items():
            brute[n].append(float(m.weight.grad.square().sum()))
    return captured, {n: np.array(v) for n, v in brute.items()}


@pytest.mark.parametrize("name", ["q_proj", "lm_head"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_llama_linear_layers(llama_case, name, method, chunk):
    captured, brute = llama_case
    a, d = captured[name]
    got = S.per_example_sq_norms_linear(a, d, method=method, max_chunk_elems=chunk)
    assert got.shape == (B,) and got.dtype == torch.float64
    np.testing.assert_allclose(np64(got), brute[name], rtol=1e-10)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_llama_shared_input_gram(llama_case, method, chunk):
    """k_proj reads q_proj's input: the Gram matrices of that input serve both layers."""
    captured, brute = llama_case
    a_q, _ = captured["q_proj"]
    a_k, d_k = captured["k_proj"]
    assert torch.equal(a_q, a_k)
    gram = S.token_grams(a_q)
    assert gram.shape == (B, T, T)
    np.testing.assert_allclose(np64(gram), np.einsum("bti,bsi->bts", np64(a_q), np64(a_q)),
                               rtol=1e-12)
    got = S.per_example_sq_norms_linear(a_k, d_k, method=method, max_chunk_elems=chunk,
                                        a_gram=gram)
    np.testing.assert_allclose(np64(got), brute["k_proj"], rtol=1e-10)
    assert torch.equal(gram, S.token_grams(a_q))  # read, never written


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_llama_embedding(llama_case, method, chunk):
    captured, brute = llama_case
    ids, d = captured["embed_tokens"]
    got = S.per_example_sq_norms_embedding(ids, d, method=method, max_chunk_elems=chunk)
    np.testing.assert_allclose(np64(got), brute["embed_tokens"], rtol=1e-10)


class TwoConv1D(nn.Module):
    """GPT-2 style: Conv1D (weight (in, out)) -> tanh -> Conv1D."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c1 = Conv1D(9, 5)  # nf=out=9, nx=in=5
        self.c2 = Conv1D(3, 9)

    def forward(self, x):
        return self.c2(torch.tanh(self.c1(x)))


def conv1d_case():
    torch.manual_seed(1)
    net = TwoConv1D().double()
    for p in net.parameters():
        nn.init.normal_(p, std=0.5)
    x = torch.randn(4, 6, 5, dtype=torch.float64)
    w = torch.randn(6, 3, dtype=torch.float64)

    def loss_one(params, xb):
        out = functional_call(net, params, (xb.unsqueeze(0),))[0]
        return (out * w).sum() + out.square().sum()

    params = {k: v.detach() for k, v in net.named_parameters()}
    per_example = vmap(grad(loss_one), in_dims=(None, 0))(params, x)

    saved = {}

    def keep(module, inputs, output):
        saved["a"] = inputs[0].detach()
        output.register_hook(lambda d: saved.__setitem__("d", d.detach()))

    h = net.c1.register_forward_hook(keep)
    out = net(x)
    ((out * w).sum() + out.square().sum()).backward()
    h.remove()
    return saved, per_example


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_gpt2_conv1d_and_bias(method, chunk):
    saved, per_example = conv1d_case()
    weight_ref = per_example["c1.weight"].square().sum(dim=(1, 2))
    bias_ref = per_example["c1.bias"].square().sum(dim=1)
    got = S.per_example_sq_norms_linear(saved["a"], saved["d"], method=method,
                                        max_chunk_elems=chunk)
    np.testing.assert_allclose(np64(got), np64(weight_ref), rtol=1e-10)
    np.testing.assert_allclose(np64(S.per_example_sq_norms_bias(saved["d"])), np64(bias_ref),
                               rtol=1e-10)


def test_non_sequence_inputs_and_padding_idx():
    torch.manual_seed(2)
    lin = nn.Linear(6, 4).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    params = {k: v.detach() for k, v in lin.named_parameters()}
    per = vmap(grad(lambda p, xb: functional_call(lin, p, (xb,)).sin().sum()),
               in_dims=(None, 0))(params, x)
    y = lin(x)
    d = torch.autograd.grad(y.sin().sum(), y)[0]
    np.testing.assert_allclose(np64(S.per_example_sq_norms_linear(x, d)),
                               np64(per["weight"].square().sum((1, 2))), rtol=1e-10)

    emb = nn.Embedding(11, 3, padding_idx=0).double()
    ids = torch.tensor([[0, 3, 3, 5, 0], [1, 1, 1, 0, 2]])
    brute = []
    for b in range(2):
        emb.zero_grad()
        emb(ids[b]).pow(3).sum().backward()
        brute.append(float(emb.weight.grad.square().sum()))
    out = emb(ids)
    d = torch.autograd.grad(out.pow(3).sum(), out)[0]
    for method in ("gram", "direct"):
        got = S.per_example_sq_norms_embedding(ids, d, method=method, padding_idx=0)
        np.testing.assert_allclose(np64(got), brute, rtol=1e-10)


def test_nonfinite_stays_in_its_example():
    a = torch.randn(4, 5, 3)
    d = torch.randn(4, 5, 2)
    a[2, 1, 0] = math.nan
    for method in ("gram", "direct"):
        got = S.per_example_sq_norms_linear(a, d, method=method)
        assert torch.isfinite(got).tolist() == [True, True, False, True]
        ok = torch.tensor([0, 1, 3])
        assert float(S.finite_sum(got)) == pytest.approx(float(got[ok].sum()), rel=1e-6)


def test_bf16_inputs_accumulate_in_float32():
    a = torch.randn(2, 4, 8)
    d = torch.randn(2, 4, 6)
    ref = S.per_example_sq_norms_linear(a.bfloat16().double(), d.bfloat16().double())
    got = S.per_example_sq_norms_linear(a.bfloat16(), d.bfloat16())
    assert got.dtype == torch.float32
    np.testing.assert_allclose(np64(got), np64(ref), rtol=1e-5)


def test_method_choice_and_validation():
    assert S.choose_per_example_method(4096, 64, 64) == "direct"
    assert S.choose_per_example_method(16, 512, 32000) == "gram"
    assert S.choose_per_example_method(128, 256, 256) == "gram"  # a tie goes to Gram
    assert S.choose_per_example_method(300, 256, 256) == "direct"
    assert S.choose_per_example_method(300, 256, 256, input_gram=True) == "direct"
    assert S.choose_per_example_method(200, 256, 256, input_gram=True) == "gram"
    with pytest.raises(ValueError, match="a_gram"):
        S.per_example_sq_norms_linear(torch.ones(2, 3, 4), torch.ones(2, 3, 5),
                                      a_gram=torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match="method"):
        S.per_example_sq_norms_linear(torch.ones(2, 3, 4), torch.ones(2, 3, 5), method="x")
    with pytest.raises(ValueError, match="leading dims"):
        S.per_example_sq_norms_linear(torch.ones(2, 3, 4), torch.ones(2, 4, 5))
    with pytest.raises(ValueError, match="integer"):
        S.per_example_sq_norms_embedding(torch.ones(2, 3), torch.ones(2, 3, 5))
