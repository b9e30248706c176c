"""Fixtures of the sink tests (the records live in ``_records.py``)."""

from __future__ import annotations

import pytest

from gradlens.schema import SpikeEvent
from tests.sinks._records import layer_dicts, sample_events, sample_rows


@pytest.fixture
def meta() -> dict:
    return {"name": "test", "model": "Toy", "optimizer": "AdamW", "preset": "standard",
            "gradlens_version": "0", "layers": layer_dicts()}


@pytest.fixture
def rows() -> list[tuple[int, str, str, str, float]]:
    return sample_rows()


@pytest.fixture
def events() -> list[SpikeEvent]:
    return sample_events()
