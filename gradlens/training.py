"""The training loop shared by ``gradlens demo`` and ``gradlens compare``.

:func:`train` runs micro-batches, optional clipping, an optional lens, a tqdm progress bar and a
held-out loss at the end, and returns a :class:`TrainResult`; :func:`evaluate` is the held-out
loss alone.

Host syncs: the loop keeps the loss on the device. It reads it on the host (``.item()``) only
every ``log_every`` steps, for the progress bar and the divergence check, plus once at the end
(the loss history, one transfer) and in the final evaluation.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from gradlens.optim.memory import optimizer_state_bytes

__all__ = ["StepInfo", "TrainResult", "causal_lm_loss", "evaluate", "train", "warmup_steps"]


@dataclass
class StepInfo:
    """What ``on_step`` receives after every optimizer step (no host sync to build it).

    Attributes:
        step: 0-based index of the optimizer step just taken.
        loss: the step's training loss, a detached device tensor (mean over micro-batches).
        lr: the first param group's lr used by that step.
        tokens: predicted tokens seen so far.
    """

    step: int
    loss: torch.Tensor
    lr: float
    tokens: int


def warmup_steps(n_steps: int) -> int:
    """Steps a steady-state timing leaves out: ``min(max(1, n // 10), 10)``, none for a single
    step."""
    return 0 if n_steps <= 1 else min(max(1, n_steps // 10), 10)


@dataclass
class TrainResult:
    """What :func:`train` measured.

    Attributes:
        losses: training loss of each optimizer step (mean over its micro-batches).
        lrs: first param group's lr at each step.
        eval_loss: mean held-out cross-entropy (nats/token), None without eval batches.
        steps: optimizer steps taken (fewer than asked when the run diverged).
        tokens_seen: predicted tokens consumed (``steps * grad_accum * batch * seq_len``).
        total_s: wall time of the loop (evaluation excluded).
        first_step_s: wall time of the first step (warm-up: allocation, lazy state, hooks).
        mean_step_s: mean wall time of the other steps (None with a single step).
        step_times: host wall time of each step (exact on the CPU; with CUDA only the mean is,
            because steps are not synchronized).
        optimizer_state_bytes: :func:`gradlens.optim.memory.optimizer_state_bytes` after the
            last step.
        diverged: a non-finite loss was seen at a check (every ``log_every`` steps).
        info: hyperparameters and anything the caller attached (JSON-able).
    """

    losses: list[float]
    lrs: list[float]
    eval_loss: float | None
    steps: int
    tokens_seen: int
    total_s: float
    first_step_s: float
    mean_step_s: float | None
    step_times: list[float]
    optimizer_state_bytes: int
    diverged: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def eval_ppl(self) -> float | None:
        """``exp(eval_loss)``."""
        return None if self.eval_loss is None else math.exp(min(self.eval_loss, 700.0))

    @property
    def tokens_per_s(self) -> float:
        """Training throughput over the whole loop (warm-up included)."""
        return self.tokens_seen / self.total_s if self.total_s > 0 else float("nan")

    @property
    def median_step_s(self) -> float | None:
        """Median wall time of the steady-state steps: ``median(step_times[w:])`` with
        ``w = warmup_steps(steps)`` warm-up steps left out (lazy optimizer state, allocator,
        hook set-up). The median also ignores the few steps slowed by another process, so two
        runs measured one after the other on a busy machine compare fairly. With a single step
        it is that step's time; None without steps."""
        if not self.step_times:
            return None
        w = warmup_steps(len(self.step_times))
        return float(statistics.median(self.step_times[w:]))

    @property
    def median_tokens_per_s(self) -> float:
        """Steady-state throughput: ``(tokens_seen / steps) / median_step_s``."""
        med = self.median_step_s
        if not med or self.steps <= 0:
            return float("nan")
        return self.tokens_seen / self.steps / med

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (with ``eval_ppl`` and ``tokens_per_s``)."""
        out = asdict(self)
        out["eval_ppl"] = self.eval_ppl
        out["tokens_per_s"] = self.tokens_per_s
        out["median_step_s"] = self.median_step_s
        out["median_tokens_per_s"] = self.median_tokens_per_s
        return out


Batch = torch.Tensor | Mapping[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy of an HF causal LM.

    A tensor batch is passed as ``input_ids=batch, labels=batch`` (the model shifts the labels);
    a mapping is passed as keyword arguments.
    """
    out = model(**batch) if isinstance(batch, Mapping) else model(input_ids=batch, labels=batch)
    return out.loss if hasattr(out, "loss") else out[0]


def _predicted_tokens(batch: Batch) -> int:
    ids = batch["input_ids"] if isinstance(batch, Mapping) else batch
    return int(ids.shape[0]) * max(0, int(ids.shape[-1]) - 1)


def _to(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, Mapping):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn | None = None) -> float:
    """Mean loss over ``batches`` (token mean when every batch has the same shape).

    The model is put in eval mode and restored to its previous mode. One host sync at the end.
    """
    loss_fn = loss_fn or causal_lm_loss
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        total = torch.zeros((), device=device, dtype=torch.float64)
        n = 0
        for batch in batches:
            total += loss_fn(model, _to(batch, device)).double()
            n += 1
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluate() got no batches")
    return total.item() / n  # host sync: once per evaluation


def train(
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: Any | None,
    data: Iterable[Batch],
    steps: int,
    *,
    grad_accum: int = 1,
    clip: float | None = None,
    eval_batches: Iterable[Batch] | None = None,
    on_step: Callable[[StepInfo], Any] | None = None,
    lens_factory: Callable[[nn.Module, Optimizer], Any] | None = None,
    progress: bool = True,
    seed: int | None = None,
    log_every: int = 10,
    loss_fn: LossFn | None = None,
    desc: str | None = None,
) -> TrainResult:
    """Train ``model`` for ``steps`` optimizer steps.

    One step: ``grad_accum`` micro-batches from ``data``, each ``loss / grad_accum`` backward
    (so gradients are the mean over micro-batches), optional global-norm clipping, then
    ``optimizer.step()``, ``scheduler.step()``, ``zero_grad(set_to_none=True)``.

    Args:
        model: moved nowhere; batches are moved to its device.
        optimizer, scheduler: ``scheduler`` may be None (constant lr).
        data: an iterable of batches (``(B, T + 1)`` token tensors or dicts for the model);
            it is iterated once, and must yield at least ``steps * grad_accum`` batches.
        steps: optimizer steps.
        grad_accum: micro-batches per step.
        clip: max global gradient norm (``clip_grad_norm_``), None for no clipping. A lens sees
            the gradients *after* clipping (it runs in the optimizer's step pre-hook).
        eval_batches: held-out batches, evaluated once after training (lens closed).
        on_step: called with a :class:`StepInfo` after every step.
        lens_factory: ``(model, optimizer) -> context manager or None``, entered before the
            first step and closed after the last. If the entered object (or the returned one)
            has ``observe_loss``, it gets each micro-batch's ``loss / grad_accum`` (a detached
            tensor; summed over the step they are the step's mean loss).
        progress: show a tqdm bar with the loss and tokens/s.
        seed: ``torch.manual_seed(seed)`` before the first step (dropout etc.), if given.
        log_every: steps between host reads of the loss (progress bar, divergence check).
        loss_fn: ``(model, batch) -> scalar loss``; default :func:`causal_lm_loss`.
        desc: progress-bar label.

    Returns:
        A :class:`TrainResult`. A non-finite loss seen at a check stops the run early with
        ``diverged=True``.
    """
    from tqdm.auto import tqdm

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    loss_fn = loss_fn or causal_lm_loss
    device = next(model.parameters()).device
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if seed is not None:
        torch.manual_seed(seed)
    it: Iterator[Batch] = iter(data)
    losses = torch.zeros(steps, device=device, dtype=torch.float32)
    lrs: list[float] = []
    step_times: list[float] = []
    tokens = 0
    diverged = False
    done = 0
    first_step_s = 0.0
    t_after_first = 0.0

    model.train()
    bar = tqdm(total=steps, disable=not progress, desc=desc, dynamic_ncols=True, leave=True)
    with contextlib.ExitStack() as stack:
        lens = lens_factory(model, optimizer) if lens_factory is not None else None
        observer = None
        if lens is not None:
            entered = stack.enter_context(lens) if hasattr(lens, "__enter__") else lens
            observer = next((o for o in (entered, lens) if hasattr(o, "observe_loss")), None)
        t_start = time.perf_counter()
        t_log, tokens_log = t_start, 0
        for step in range(steps):
            t0 = time.perf_counter()
            step_loss = torch.zeros((), device=device, dtype=torch.float32)
            for _ in range(grad_accum):
                try:
                    batch = next(it)
                except StopIteration:
                    raise ValueError(
                        f"data ran out at step {step}: it must yield steps * grad_accum = "
                        f"{steps * grad_accum} batches"
                    ) from None
                batch = _to(batch, device)
                loss = loss_fn(model, batch) / grad_accum
                if observer is not None:
                    observer.observe_loss(loss.detach())
                loss.backward()
                step_loss += loss.detach().float()
                tokens += _predicted_tokens(batch)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
            lrs.append(float(optimizer.param_groups[0]["lr"]))
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses[step] = step_loss
            done = step + 1
            if on_step is not None:
                on_step(StepInfo(step, step_loss, lrs[-1], tokens))
            if step == 0:
                _sync(device)  # one sync: the warm-up step is timed apart
                t_after_first = time.perf_counter()
                first_step_s = t_after_first - t_start
            step_times.append(time.perf_counter() - t0)
            if done % log_every == 0 or done == steps:
                value = step_loss.item()  # host sync: every log_every steps, for the bar
                now = time.perf_counter()
                rate = (tokens - tokens_log) / max(now - t_log, 1e-9)
                t_log, tokens_log = now, tokens
                bar.set_postfix(loss=f"{value:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
                bar.update(done - bar.n)
                if not math.isfinite(value):
                    diverged = True
                    break
        _sync(device)
        t_end = time.perf_counter()
    bar.close()

    loss_list = losses[:done].tolist()  # host transfer: once, at the end
    mean_step = (t_end - t_after_first) / (done - 1) if done > 1 else None
    eval_loss = None
    if eval_batches is not None and not diverged:
        eval_loss = evaluate(model, eval_batches, loss_fn)
    return TrainResult(
        losses=loss_list, lrs=lrs, eval_loss=eval_loss, steps=done, tokens_seen=tokens,
        total_s=t_end - t_start, first_step_s=first_step_s, mean_step_s=mean_step,
        step_times=step_times, optimizer_state_bytes=optimizer_state_bytes(optimizer),
        diverged=diverged,
    )
