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
