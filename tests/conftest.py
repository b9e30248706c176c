"""Shared fixtures. Tests never touch the network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# Unit tests run tiny models: one thread is fastest, and immune to a busy machine.
torch.set_num_threads(1)


@pytest.fixture
def tiny_llama():
    """A 2-layer LLaMA (hidden 32, vocabulary 128), seeded."""
    from gradlens.data import build_llama

    return build_llama("tiny", seed=0)


@pytest.fixture
def corpus_file(tmp_path, monkeypatch):
    """A small text file of random words (and a private tokenizer cache): runs that train."""
    import numpy as np

    monkeypatch.setenv("GRADLENS_CACHE", str(tmp_path / "cache"))
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "mind"]
    rng = np.random.default_rng(0)
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words, 600)) for _ in range(4)))
    return path
