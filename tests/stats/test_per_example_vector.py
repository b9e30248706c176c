"""Per-example squared norms of norm gains and biases against brute-force per-example autograd
(float64, one ``torch.autograd.grad`` per example of its own loss) and against Opacus."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from transformers.pytorch_utils import Conv1D

from gradlens import stats as S
from tests.stats._reference import np64

B, T, D_IN, D, V = 4, 6, 5, 8, 11
NORMS = {
    "layer_norm": lambda: nn.LayerNorm(D, eps=1e-5),
    "rms_norm": lambda: nn.RMSNorm(D, eps=1e-6),
    "rms_norm_eps_none": lambda: nn.RMSNorm(D),
    "llama_rms_norm": lambda: LlamaRMSNorm(D, eps=1e-6),
    "qwen2_rms_norm": lambda: Qwen2RMSNorm(D, eps=1e-5),
}


class TokenwiseNet(nn.Module):
    """Linear(+bias) -> norm -> Conv1D(+bias) -> tanh -> Linear: no mixing across tokens, so a
    token's loss only reaches its own output gradients (needed by the token-mask test)."""

    def __init__(self, norm: str) -> None:
        super().__init__()
        self.inp = nn.Linear(D_IN, D)
        self.norm = NORMS[norm]()
        self.mid = Conv1D(D, D)
        self.head = nn.Linear(D, V, bias=False)
        with torch.no_grad():  # non-trivial gains and biases (defaults are ones and zeros)
            self.norm.weight.uniform_(0.5, 1.5)
            if getattr(self.norm, "bias", None) is not None:
                self.norm.bias.uniform_(-0.5, 0.5)
            self.mid.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.norm(self.inp(x)))))


def example_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) sum of token cross entropies per example; labels -100 are padding (ignored)."""
    ce = nn.functional.cross_entropy(logits.reshape(-1, V), labels.reshape(-1),
                                     reduction="none", ignore_index=-100)
    return ce.reshape(labels.shape).reshape(labels.shape[0], -1).sum(dim=1)


def make_case(norm: str, seq: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = TokenwiseNet(norm).double()
    shape = (B, T) if seq else (B,)
    x = torch.randn(*shape, D_IN, dtype=torch.float64) * 2.0
    labels = torch.randint(0, V, shape)
    if seq:
        labels[0, -2:] = -100  # right padding of example 0
        labels[2, 0] = -100
    return model, x, labels


def capture(model: TokenwiseNet, x: torch.Tensor, labels: torch.Tensor) -> dict:
    """Inputs and output gradients of every module, from hooks (sum-reduced loss: the hooks see
    each example's own gradient)."""
    got: dict[str, torch.Tensor] = {}

    def fwd(name):
        def hook(module, inputs, output):
            got[f"{name}.in"] = inputs[0].detach()
            output.register_hook(lambda g: got.__setitem__(f"{name}.d", g.detach()))
        return hook

    handles = [getattr(model, n).register_forward_hook(fwd(n)) for n in ("inp", "norm", "mid")]
    example_losses(model(x), labels).sum().backward()
    for h in handles:
        h.remove()
    model.zero_grad()
    return got


def brute_force(model: nn.Module, x: torch.Tensor, labels: torch.Tensor,
                params: dict[str, nn.Parameter], keep: torch.Tensor | None = None) -> dict:
    """||dL_b/dp||^2 per example from autograd of each example's own loss (optionally only
    over the kept tokens)."""
    out = {k: [] for k in params}
    for b in range(x.shape[0]):
        lab = labels[b:b + 1].clone()
        if keep is not None:
            lab[~keep[b:b + 1]] = -100
        loss = example_losses(model(x[b:b + 1]), lab).sum()
        grads = torch.autograd.grad(loss, list(params.values()))
        for k, g in zip(params, grads, strict=True):
            out[k].append(float(g.square().sum()))
    return {k: np.array(v) for k, v in out.items()}


def rel_err(a, b) -> float:
    a, b = np64(a), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.abs(b)))


def kernels(model: TokenwiseNet, got: dict, keep: torch.Tensor | None = None) -> dict:
    x_hat = S.normalized_input(model.norm, got["norm.in"])
    out = {
        "norm.weight": S.per_example_sq_norms_norm_gain(x_hat, got["norm.d"], token_mask=keep),
        "inp.bias": S.per_example_sq_norms_bias(got["inp.d"], token_mask=keep),
        "mid.bias": S.per_example_sq_norms_bias(got["mid.d"], token_mask=keep),
    }
    if getattr(model.norm, "bias", None) is not None:
        out["norm.bias"] = S.per_example_sq_norms_bias(got["norm.d"], token_mask=keep)
    return out


@pytest.mark.parametrize("seq", [True, False], ids=["BTd", "Bd"])
@pytest.mark.parametrize("norm", list(NORMS))
def test_against_per_example_autograd(norm: str, seq: bool):
    model, x, labels = make_case(norm, seq)
    ours = kernels(model, capture(model, x, labels))
    named = dict(model.named_parameters())
    ref = brute_force(model, x, labels, {k: named[k] for k in ours})
    assert set(ours) >= {"norm.weight", "inp.bias", "mid.bias"}
    for k in ours:
        assert ours[k].shape == (x.shape[0],) and ours[k].dtype == torch.float64
        assert rel_err(ours[k], ref[k]) < 1e-10, k
        assert np.all(ref[k] > 0), k  # padding did not zero an example: the check is real


def test_padding_needs_no_mask_and_mask_matches_dropped_tokens():
    """Labels -100 zero the padded tokens' output gradients (no mask needed); a token mask on
    an unpadded loss equals the per-example gradient of the loss over the kept tokens only."""
    model, x, labels = make_case("layer_norm", True, seed=3)
    labels[labels < 0] = 0  # no padding in the loss itself
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, -3:] = False
    keep[3, 0] = False
    ours = kernels(model, capture(model, x, labels), keep=keep)
    named = dict(model.named_parameters())
    ref = brute_force(model, x, labels, {k: named[k] for k in ours}, keep=keep)
    for k in ours:
        assert rel_err(ours[k], ref[k]) < 1e-10, k
    full = kernels(model, capture(model, x, labels))
    assert rel_err(full["norm.weight"][1], ours["norm.weight"][1]) > 1e-3  # the mask mattered


def test_gain_gradients_are_per_example_vectors():
    model, x, labels = make_case("rms_norm", True, seed=1)
    got = capture(model, x, labels)
    g = S.per_example_grads_norm_gain(S.normalized_input(model.norm, got["norm.in"]),
                                      got["norm.d"])
    for b in range(B):
        loss = example_losses(model(x[b:b + 1]), labels[b:b + 1]).sum()
        (ref,) = torch.autograd.grad(loss, [model.norm.weight])
        assert torch.allclose(g[b], ref, rtol=1e-12, atol=1e-14)


def test_multi_dim_normalized_shape():
    norm = nn.LayerNorm((3, 4)).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(B, T, 3, 4, dtype=torch.float64)
    w = torch.randn(B, T, 3, 4, dtype=torch.float64)
    y = norm(x)
    (d,) = torch.autograd.grad((y * w).sum(), [y])
    ours = S.per_example_sq_norms_norm_gain(S.normalized_input(norm, x), d, feature_ndim=2)
    ref = [float(torch.autograd.grad((norm(x[b]) * w[b]).sum(), [norm.weight])[0].square().sum())
           for b in range(B)]
    assert rel_err(ours, ref) < 1e-10


def test_normalized_input_kinds_and_unknown():
    assert S.norm_kind(nn.LayerNorm(4)) == "layer_norm"
    assert S.norm_kind(nn.RMSNorm(4)) == "rms_norm"
    assert S.norm_kind(LlamaRMSNorm(4)) == "hf_rms_norm"
    assert S.norm_kind(nn.Linear(4, 4)) is None
    assert S.normalized_input(nn.Linear(4, 4), torch.randn(2, 4)) is None
    # bf16 HF RMSNorm: normalized in float32, cast back to bf16 before the gain, like forward
    norm = LlamaRMSNorm(8).to(torch.bfloat16)
    x = torch.randn(3, 5, 8).to(torch.bfloat16)
    x_hat = S.normalized_input(norm, x)
    assert x_hat.dtype == torch.bfloat16
    assert torch.equal(norm(x), norm.weight * x_hat)


def test_shape_errors():
    with pytest.raises(ValueError, match="one shape"):
        S.per_example_sq_norms_norm_gain(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="token_mask"):
        S.per_example_sq_norms_bias(torch.zeros(2, 3, 4), token_mask=torch.ones(2, 4))


# ----------------------------------------------------------------------------- Opacus


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize("seq", [True, False], ids=["BTd", "Bd"])
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm", "llama_rms_norm"])
def test_against_opacus_grad_sample(norm: str, seq: bool):
    """Opacus's per-example ``grad_sample`` agrees with the kernels: its own LayerNorm, RMSNorm
    and Linear samplers, and its functorch fallback for HF ``LlamaRMSNorm`` (the Conv1D bias
    is left to the brute-force test)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D_IN, D), NORMS[norm](), nn.Tanh(), nn.Linear(D, V)).double()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
    shape = (B, T) if seq else (B,)
    x = torch.randn(*shape, D_IN, dtype=torch.float64)
    labels = torch.randint(0, V, shape)
    got: dict[str, torch.Tensor] = {}

    def hook(name):
        def fwd(module, inputs, output):
            got[f"{name}.in"] = inputs[0].detach()
            output.register_hook(lambda g: got.__setitem__(f"{name}.d", g.detach()))
        return fwd

    handles = [net[0].register_forward_hook(hook("inp")),
               net[1].register_forward_hook(hook("norm"))]
    example_losses(net(x), labels).sum().backward()  # our kernels' inputs, outside Opacus
    for h in handles:  # (Opacus's functorch fallback replays forward under vmap)
        h.remove()
    net.zero_grad()
    gsm = GradSampleModule(net, batch_first=True, loss_reduction="sum")
    example_losses(gsm(x), labels).sum().backward()
    ours = {
        "1.weight": S.per_example_sq_norms_norm_gain(S.normalized_input(net[1], got["norm.in"]),
                                                     got["norm.d"]),
        "0.bias": S.per_example_sq_norms_bias(got["inp.d"]),
    }
    if getattr(net[1], "bias", None) is not None:
        ours["1.bias"] = S.per_example_sq_norms_bias(got["norm.d"])
    named = dict(net.named_parameters())
    for k, v in ours.items():
        gs = named[k].grad_sample
        ref = gs.reshape(gs.shape[0], -1).square().sum(dim=1)
        assert rel_err(v, ref) < 1e-10, k
    gsm._close()
