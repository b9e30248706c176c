"""gradlens with Lightning: one callback (needs the extra ``gradlens[lightning]``).

    python examples/lightning_module.py --steps 20 --out runs/lightning
    gradlens report runs/lightning/gradlens -o runs/lightning-report
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch

from gradlens import SCALE, scale_param_groups
from gradlens.data import build_llama
from gradlens.integrations.lightning import GradLensCallback


class LitLlama(pl.LightningModule):
    def __init__(self, size: str = "tiny") -> None:
        super().__init__()
        self.model = build_llama(size)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return SCALE(scale_param_groups(self.model, lr=1e-3, lr_1d=2e-2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--out", default="runs/lightning")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient_clip_val")
    args = parser.parse_args(argv)

    module = LitLlama(args.size)
    vocab = module.model.config.vocab_size
    data = torch.randint(0, vocab, (256, 32), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    trainer = pl.Trainer(
        max_steps=args.steps, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accumulate_grad_batches=2, log_every_n_steps=2, default_root_dir=args.out,
        gradient_clip_val=args.clip, callbacks=[GradLensCallback(preset="standard")],
    )
    trainer.fit(module, loader)
    print(f"wrote {args.out}/gradlens")


if __name__ == "__main__":
    main()
