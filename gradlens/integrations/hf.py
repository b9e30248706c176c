"""``transformers.Trainer`` callback: attach a GradLens with one line.

    trainer = Trainer(model, args, ..., callbacks=[GradLensCallback(preset="standard")])

What the lens sees: ``on_pre_optimizer_step`` runs after every micro-batch's backward and
**after clipping** (``max_grad_norm``): ``grad_norm`` is the clipped norm the optimizer
consumes; the lens measures the raw ``grad_norm_preclip`` itself (per layer and global, every
preset), which the spike detectors and the variance estimators read. The loss: a forward hook
takes the loss the model returns in training (``outputs["loss"]`` or ``outputs[0]``, as the
Trainer's ``compute_loss`` reads it; no copy, no sync), and the step's loss goes to the lens,
scaled as the Trainer scales it (for ``loss_z`` and loss spikes). Chosen over the Trainer's
logs (a host float averaged over ``logging_steps``) and its private running loss; a loss made
outside the model (``compute_loss_func``, label smoothing) is not seen. Statistics follow
``logging_steps`` and go to ``<output_dir>/gradlens`` unless ``logdir`` is given; only the
main process writes.

Loss convention: a model whose ``forward`` takes ``**kwargs`` (every HF LM; or whose
``accepts_loss_kwargs`` says so) gets ``num_items_in_batch``: each micro-batch's loss is its
token sum over the step's total, ``loss_reduction="global_mean"`` (chosen unless given; the
step's loss is the sum, times the ranks when the Trainer averages tokens across devices).
Otherwise the Trainer divides each micro-batch's mean loss by the accumulation steps:
``"mean"`` (the step's loss is the mean).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - transformers is a core dependency
    raise ImportError("GradLensCallback needs transformers: pip install 'gradlens[hf]'") from err

import torch

import gradlens.sinks  # noqa: F401  (installs the lens's default sinks)
from gradlens.core import distributed as D
from gradlens.core.lens import GradLens


def trainer_loss_reduction(model: Any) -> str:
    """The lens convention of the Trainer's loss for ``model``, decided as the Trainer does
    (``model_accepts_loss_kwargs``: the model's ``accepts_loss_kwargs``, else ``**kwargs`` in
    its ``forward``)."""
    model = getattr(model, "module", model)  # DDP / accelerate wrappers
    accepts = getattr(model, "accepts_loss_kwargs", None)
    if accepts is None:
        forward = getattr(model, "forward", None)
        try:
            params = inspect.signature(forward).parameters.values() if forward else ()
        except (TypeError, ValueError):
            params = ()
        accepts = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    return "global_mean" if accepts else "mean"


class GradLensCallback(TrainerCallback):
    """Create the lens at ``on_train_begin``, finalize each step at ``on_pre_optimizer_step``.

    Args:
        logdir: run directory (default ``<output_dir>/gradlens``).
        preset: lens preset; ``log_every`` defaults to the Trainer's ``logging_steps``.
        **lens_kwargs: any other :class:`~gradlens.GradLens` argument.
    """

    def __init__(self, logdir: str | Path | None = None, preset: str = "standard",
                 **lens_kwargs: Any) -> None:
        self.logdir = logdir
        self.preset = preset
        self.lens_kwargs = lens_kwargs
        self.lens: GradLens | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        logdir = self.logdir or Path(args.output_dir) / "gradlens"
        kwargs = dict(self.lens_kwargs)  # a second train() gets the same options
        log_every = kwargs.pop("log_every", None) or max(int(args.logging_steps), 1)
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
        kwargs.setdefault("loss_reduction", trainer_loss_reduction(model))
        self.lens = GradLens(
            model, inner, step_hook=False, logdir=logdir, preset=self.preset, log_every=log_every,
            meta={"framework": "transformers.Trainer", "max_grad_norm": args.max_grad_norm,
                  "gradient_accumulation_steps": args.gradient_accumulation_steps},
            **kwargs,
        )
        # resume_from_checkpoint: the lens step is the optimizer step, so it continues from
        # the Trainer's global step
        self.lens.step_count = int(state.global_step)
        self._losses: list[torch.Tensor] = []
        self._loss_factor = float(D.world_size()) if (
            kwargs["loss_reduction"] == "global_mean"
            and getattr(args, "average_tokens_across_devices", False)) else 1.0
        self._hook = model.register_forward_hook(self._on_forward)

    def _on_forward(self, module, args, outputs) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation
        loss = outputs.get("loss") if isinstance(outputs, dict) else (
            outputs[0] if isinstance(outputs, tuple) and outputs else None)
        if torch.is_tensor(loss) and loss.numel() == 1:
            self._losses.append(loss.detach())

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.lens is None:
            return
        if self._losses:  # the step's loss: summed shares (global_mean) or mean (mean)
            total = torch.stack(self._losses).sum()
            n = 1 if self.lens.config.loss_reduction == "global_mean" else len(self._losses)
            self.lens.observe_loss(total * (self._loss_factor / n))
            self._losses = []
        self.lens.step()

    def on_train_end(self, args, state, control, **kwargs):
        if self.lens is not None:
            self._hook.remove()
            self.lens.close()
