"""Small models for the coverage cells (``test_coverage``): built from configs, no downloads."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

VOCAB = 64
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mup_linear.py"


def mup_example():
    """examples/mup_linear.py, loaded once (its ScaledLinear is the class the rule is for)."""
    name = "gradlens_example_mup_linear"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


class NanoLayerNorm(nn.Module):
    """nanoGPT's LayerNorm (optional bias): the math of nn.LayerNorm under another class."""

    def __init__(self, d: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class NanoBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = NanoLayerNorm(d), NanoLayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)  # fused q, k, v
        self.attn_proj = nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """nanoGPT's layout: tied wte / lm_head, fused qkv, ``wpe(arange(T))`` (no batch dim)."""

    def __init__(self, d: int = 16, layers: int = 2, heads: int = 2, block: int = 16) -> None:
        super().__init__()
        torch.manual_seed(31)
        self.wte, self.wpe = nn.Embedding(VOCAB, d), nn.Embedding(block, d)
        self.h = nn.ModuleList(NanoBlock(d, heads) for _ in range(layers))
        self.ln_f = NanoLayerNorm(d)
        self.lm_head = nn.Linear(d, VOCAB, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class PlainLinear(nn.Linear):
    """A project's own Linear that keeps nn.Linear's forward."""


class Linear(nn.Linear):
    """A project's own ``Linear`` (torch's class name) with a muP multiplier in forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 0.4


class RawLinear(nn.Module):
    """A raw parameter used through F.linear (no Linear module)."""

    def __init__(self, fan_in: int, fan_out: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(fan_out, fan_in) / fan_in**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w)


class TokenMLP(nn.Module):
    """Embedding, a hidden layer of ``hidden`` class, a head; ``ckpt``: the hidden blocks under
    reentrant checkpointing (torch.utils.checkpoint, ``use_reentrant=True``)."""

    def __init__(self, hidden: type[nn.Module] = nn.Linear, d: int = 12, ckpt: bool = False,
                 act: str = "tanh", seed: int = 33) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, d)
        self.norm = nn.LayerNorm(d)
        self.up, self.down = hidden(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, VOCAB)
        self.ckpt, self.act = ckpt, act

    def block(self, h: torch.Tensor) -> torch.Tensor:
        z = self.up(self.norm(h))
        z = torch.relu(z) if self.act == "relu" else torch.tanh(z)
        return h + self.down(z)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        if self.ckpt:
            h = torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=True)
        else:
            h = self.block(h)
        return self.head(h)


def token_shares(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Each example's share of a next-token token-mean loss (float64)."""
    logits = model(ids).double()
    tok = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return tok.sum(1) / tok.numel()


def seq2seq_shares(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each example's share of an encoder-decoder's token-mean loss (labels -100 ignored)."""
    logits = model(**batch).logits.double()
    labels = batch["labels"]
    tok = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return tok.sum(1) / (labels != -100).sum()


def t5(seed: int = 41) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_decoder_layers=1,
        num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0))


def bart(seed: int = 42) -> nn.Module:
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=24,
        decoder_ffn_dim=24, max_position_embeddings=32, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, forced_eos_token_id=None))


def mixtral(seed: int = 43) -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=32, tie_word_embeddings=False,
        experts_implementation="eager"))


def lora(dora: bool = False, seed: int = 44) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    from gradlens.data import build_llama

    base = build_llama("tiny", seed=seed, vocab_size=VOCAB)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj"],
                                            use_dora=dora, init_lora_weights=False))
    return model
