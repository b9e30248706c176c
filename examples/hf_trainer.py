"""gradlens with the Hugging Face Trainer: one callback.

    python examples/hf_trainer.py --steps 20 --out runs/hf
    gradlens report runs/hf/gradlens -o runs/hf-report
"""

from __future__ import annotations

import argparse

import torch
from transformers import Trainer, TrainingArguments

from gradlens.data import build_llama
from gradlens.integrations.hf import GradLensCallback


class RandomTokens(torch.utils.data.Dataset):
    """Random token windows: enough to show the wiring (use your own dataset in practice)."""

    def __init__(self, vocab: int, n: int = 256, seq: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--out", default="runs/hf_trainer")
    args = parser.parse_args(argv)

    model = build_llama(args.size)
    training_args = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, logging_steps=2, learning_rate=1e-3,
        max_grad_norm=1.0, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training_args,
                      train_dataset=RandomTokens(model.config.vocab_size),
                      callbacks=[GradLensCallback(preset="standard")])
    trainer.train()
    print(f"wrote {args.out}/gradlens")


if __name__ == "__main__":
    main()
