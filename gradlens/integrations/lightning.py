"""Lightning callback (extra ``gradlens[lightning]``).

    trainer = L.Trainer(..., callbacks=[GradLensCallback()])

What the lens sees: ``on_before_optimizer_step`` runs once per optimizer step, after every
micro-batch's backward (``accumulate_grad_batches``), **after AMP unscaling and before gradient
clipping**: statistics describe the unscaled, unclipped gradient. The lens gets the Trainer's
optimizer (for ``spam_fraction`` and run.json). The loss of each
backward (as Lightning passes it to ``on_before_backward``) is handed to the lens for the
loss-spike detector. Statistics follow the
Trainer's ``log_every_n_steps`` and go to ``<log_dir or default_root_dir>/gradlens``; only
global rank zero writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as err:
    raise ImportError(
        "gradlens.integrations.lightning needs Lightning: pip install 'gradlens[lightning]'"
    ) from err

import gradlens.sinks  # noqa: F401  (installs the lens's default sinks)
from gradlens.core.lens import GradLens


class GradLensCallback(pl.Callback):
    """Create the lens at ``on_fit_start``; finalize each step before the optimizer runs."""

    def __init__(self, logdir: str | Path | None = None, preset: str = "standard",
                 **lens_kwargs: Any) -> None:
        self.logdir = logdir
        self.preset = preset
        self.lens_kwargs = lens_kwargs
        self.lens: GradLens | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        root = trainer.log_dir or trainer.default_root_dir
        kwargs = dict(self.lens_kwargs)  # a second fit() gets the same options
        log_every = kwargs.pop("log_every", None) or max(trainer.log_every_n_steps, 1)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.lens = GradLens(
            pl_module, optimizer, step_hook=False, logdir=self.logdir or Path(root) / "gradlens", preset=self.preset,
            log_every=log_every,
            meta={"framework": "lightning", "precision": str(trainer.precision),
                  "accumulate_grad_batches": trainer.accumulate_grad_batches},
            **kwargs,
        )
        self.lens.step_count = int(trainer.global_step)  # a resumed fit continues its steps

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self.lens is not None:
            self.lens.observe_loss(loss)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.lens is not None:
            self.lens.step()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.lens is not None:
            self.lens.close()
