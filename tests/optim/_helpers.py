"""Shared test helpers for the optimizer tests."""

from __future__ import annotations

import torch
from torch import nn


def backward_random_batch(model: nn.Module, seed: int = 0) -> None:
    """Fresh gradients of an HF causal LM on a seeded random (2, 12) token batch."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=gen)
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
