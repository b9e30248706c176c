"""HF ``resume_from_checkpoint``: the lens continues from the Trainer's global step, the
loader keeps every row, and a second ``train()`` keeps the callback's options."""

from __future__ import annotations

import pytest

pytest.importorskip("accelerate")

from transformers import Trainer, TrainingArguments

from gradlens.data import build_llama
from gradlens.integrations.hf import GradLensCallback
from gradlens.report import load_run


def _trainer(out, steps, callback):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "hf_example", Path(__file__).resolve().parents[2] / "examples" / "hf_trainer.py")
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    model = build_llama("tiny", seed=0)
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, logging_steps=1, learning_rate=1e-3, report_to=[],
        save_strategy="steps", save_steps=2, use_cpu=True, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=ex.RandomTokens(128, n=64, seq=8),
                   callbacks=[callback])


def test_resume_continues_the_numbering(tmp_path):
    logdir = tmp_path / "lens"
    _trainer(tmp_path / "out", 2, GradLensCallback(logdir=logdir, log_every=1)).train()
    _trainer(tmp_path / "out", 4, GradLensCallback(logdir=logdir, log_every=1)).train(
        resume_from_checkpoint=True)
    df = load_run(logdir)
    assert sorted(df.step.unique()) == [1, 2, 3, 4]


def test_second_train_keeps_log_every(tmp_path):
    cb = GradLensCallback(logdir=tmp_path / "lens", log_every=3)
    trainer = _trainer(tmp_path / "out", 3, cb)
    trainer.train()
    assert cb.lens.config.log_every == 3
    trainer.train()
    assert cb.lens.config.log_every == 3
