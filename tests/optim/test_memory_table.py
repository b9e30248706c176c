"""The paper's memory table (weights + optimizer state, bf16) and live state counts."""

from __future__ import annotations

import pytest
import torch

from gradlens.data import build_llama
from gradlens.optim import (
    SCALE,
    optimizer_state_numel,
    predicted_state_bytes,
    role_numels,
    scale_param_groups,
    weights_plus_state_ratio,
)


@pytest.mark.parametrize(
    ("size", "percent"), [("60m", 42.7), ("130m", 39.5), ("350m", 36.3), ("1b", 35.0)]
)
def test_paper_memory_ratios(size: str, percent: float) -> None:
    numels = role_numels(build_llama(size, device="meta"))
    assert round(100 * weights_plus_state_ratio(numels), 1) == percent


def test_60m_counts() -> None:
    numels = role_numels(build_llama("60m", device="meta"))
    total = sum(numels.values())
    assert round(total / 1e6) == 58
    assert round(numels["output"] / total, 2) == 0.28
    assert predicted_state_bytes(numels, "adam") == 4 * total
    assert predicted_state_bytes(numels, "scale") == 2 * (numels["output"] + 2 * numels["vector"])
    with pytest.raises(ValueError, match="'adam' or 'scale'"):
        predicted_state_bytes(numels, "sgd")


def test_live_state_matches_the_formula() -> None:
    model = build_llama("tiny", seed=0)
    numels = role_numels(model)
    scale = SCALE(scale_param_groups(model))
    adamw = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    scale.step()
    adamw.step()
    assert optimizer_state_numel(scale) == predicted_state_bytes(numels, "scale", 1)
    assert optimizer_state_numel(adamw) == predicted_state_bytes(numels, "adam", 1)
    n_vectors = sum(1 for p in model.parameters() if p.ndim == 1)
    assert optimizer_state_numel(scale, include_step=True) == (
        optimizer_state_numel(scale) + n_vectors
    )
