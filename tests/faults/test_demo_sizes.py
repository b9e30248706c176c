"""Every documented model size builds, gets a tokenizer and trains a step; the demo runs at
``--size tiny``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gradlens.cli import main, model_sizes
from gradlens.data.batches import prepare_data
from gradlens.data.tokenizer import MIN_VOCAB_SIZE
from gradlens.experiment import RunConfig, build_model, run_experiment

TRAINABLE_HERE = ("demo", "tiny", "small")
PAPER_SIZES = ("60m", "130m", "350m", "1b")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    words = ["thou", "art", "the", "king", "of", "night", "and", "day", "my", "lord", "sweet"]
    rng = np.random.default_rng(0)
    text = tmp_path_factory.mktemp("corpus") / "play.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(words, 1500)) for _ in range(3)))
    return text


def test_the_documented_sizes_are_the_cli_choices() -> None:
    assert set(model_sizes()) == {*TRAINABLE_HERE, *PAPER_SIZES}


@pytest.mark.parametrize("size", TRAINABLE_HERE)
def test_size_trains_one_step(size: str, corpus: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = RunConfig(size=size, steps=1, batch_size=2, seq_len=16, eval_batches=0,
                    corpus=str(corpus), cache_dir=str(tmp_path))
    assert cfg.tokenizer_vocab_size() >= MIN_VOCAB_SIZE
    model, result = run_experiment(cfg, "adamw", progress=False)
    assert model.get_input_embeddings().num_embeddings == cfg.tokenizer_vocab_size()
    assert len(result.losses) == 1 and math.isfinite(result.losses[0])


def test_paper_sizes_build_and_get_a_tokenizer(corpus: Path, tmp_path: Path) -> None:
    for size in PAPER_SIZES:
        cfg = RunConfig(size=size, corpus=str(corpus), cache_dir=str(tmp_path))
        model = build_model(size, device="meta")  # no memory: a config check
        assert model.get_input_embeddings().num_embeddings == cfg.tokenizer_vocab_size() == 32000
    data = prepare_data(str(corpus), 32000, str(tmp_path), 0.05)
    assert MIN_VOCAB_SIZE <= data.vocab_size <= 32000


def test_too_small_a_vocabulary_is_a_clear_error() -> None:
    cfg = RunConfig(size="tiny", model_overrides={"vocab_size": 128})
    with pytest.raises(ValueError, match=r"vocabulary of 128, below the tokenizer's minimum of "
                                         r"257 .* model_overrides=\{'vocab_size': 257\}"):
        cfg.tokenizer_vocab_size()


def test_demo_cli_at_size_tiny(corpus: Path, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("GRADLENS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    rc = main(["demo", "--size", "tiny", "--steps", "5", "--corpus", str(corpus), "--out",
               str(out), "--optimizers", "adamw", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert (out / "report" / "report.html").is_file()
    assert list((out / "runs" / "adamw").glob("stats-*.parquet"))
