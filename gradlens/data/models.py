"""LLaMA models built from configs (no weights are ever downloaded).

``LLAMA_SIZES`` holds the configs of the SCALE / GaLore papers (60M .. 1B, vocabulary 32000)
and small ones for this machine. ``build_llama`` instantiates one, on any device (``"meta"``
builds a model that takes no memory, for parameter counting).
"""

from __future__ import annotations

from typing import Any

import torch

LLAMA_SIZES: dict[str, dict[str, int]] = {
    # unit tests: a few thousand parameters
    "tiny": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 num_hidden_layers=2, vocab_size=128),
    # demo and benchmarks on 2 CPU cores
    "small": dict(hidden_size=256, intermediate_size=688, num_attention_heads=4,
                  num_hidden_layers=4, vocab_size=4096),
    # the papers' sizes (t5 tokenizer, vocabulary 32000)
    "60m": dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8,
                num_hidden_layers=8, vocab_size=32000),
    "130m": dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12,
                 num_hidden_layers=12, vocab_size=32000),
    "350m": dict(hidden_size=1024, intermediate_size=2736, num_attention_heads=16,
                 num_hidden_layers=24, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5461, num_attention_heads=32,
               num_hidden_layers=24, vocab_size=32000),
}


def llama_config(size: str = "small", **overrides: Any):
    """A ``transformers.LlamaConfig`` for one of ``LLAMA_SIZES``; keyword overrides win."""
    from transformers import LlamaConfig

    if size not in LLAMA_SIZES:
        raise ValueError(f"unknown LLaMA size {size!r}; choose one of {sorted(LLAMA_SIZES)}")
    kwargs: dict[str, Any] = dict(LLAMA_SIZES[size])
    kwargs.setdefault("max_position_embeddings", 1024)
    kwargs.setdefault("tie_word_embeddings", False)
    kwargs.setdefault("rms_norm_eps", 1e-6)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_llama(size: str = "small", device: str | torch.device | None = None,
                seed: int | None = 0, **overrides: Any):
    """Instantiate ``LlamaForCausalLM`` from ``llama_config(size, **overrides)``.

    ``seed`` makes the initialization reproducible; ``device="meta"`` allocates nothing.
    """
    from transformers import LlamaForCausalLM

    config = llama_config(size, **overrides)
    if seed is not None:
        torch.manual_seed(seed)
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            return LlamaForCausalLM(config)
    model = LlamaForCausalLM(config)
    return model.to(device) if device is not None else model
