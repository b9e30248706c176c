"""The training loop shared by ``gradlens demo`` and ``gradlens compare``.

Pieces, each usable alone:

- :data:`OPTIMIZERS` / :func:`register_optimizer` / :func:`make_optimizer`: an explicit name ->
  factory registry (``adamw``, ``scale``, ``sgd``; later SWAN, Stable-SPAM, Muon, SCALE
  ablations register the same way);
- :func:`cosine_schedule`: linear warm-up then cosine decay to a floor (the SCALE paper's
  schedule), as a ``LambdaLR``;
- :func:`train`: the loop (micro-batches, optional clipping, an optional lens, tqdm progress,
  held-out loss at the end) returning a :class:`TrainResult`;
- :class:`RunConfig` / :func:`build_model` / :func:`run_experiment`: one optimizer's run from a
  config, with the same initialization and the same batches for every optimizer of a seed.

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
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "DEFAULT_LRS",
    "MODEL_PRESETS",
    "OPTIMIZERS",
    "RunConfig",
    "StepInfo",
    "TrainResult",
    "build_model",
    "cosine_lr_factor",
    "cosine_schedule",
    "default_lr",
    "evaluate",
    "make_optimizer",
    "optimizer_state_bytes",
    "register_optimizer",
    "run_experiment",
    "train",
]

# --------------------------------------------------------------------------- optimizers

OptimizerFactory = Callable[..., tuple[Optimizer, dict[str, Any]]]

OPTIMIZERS: dict[str, OptimizerFactory] = {}
"""Name -> ``factory(model, lr, **kw) -> (optimizer, info)``. Add entries with
:func:`register_optimizer`; ``info`` is a JSON-able dict of the hyperparameters used."""

DEFAULT_LRS: dict[str, float] = {
    "adamw": 5e-3, "scale": 3e-3, "sgd": 0.1,
    # the same family, the same centre (gradlens compare sweeps around these)
    "stable_spam": 5e-3, "colnorm_sgd": 3e-3, "colnorm_sgd_momentum_all": 3e-3, "swan": 3e-3,
}
"""Peak learning rates for the demo model (the :class:`RunConfig` defaults: 200 steps of
16 x 128 tokens of Shakespeare, seed 0). Held-out loss after a sweep of the peak lr:

- adamw (betas 0.9/0.95): 1e-3: 5.48, 2e-3: 5.29, 3e-3: 5.23, **5e-3: 5.18**, 7e-3: 5.23,
  1e-2: 5.55 (betas 0.9/0.999 at 5e-3: 5.25);
- scale (lr_1d = 20 lr): 1e-3: 5.02, **3e-3: 4.99**, 1e-2: 5.23.

The others are not tuned here: Stable-SPAM (AdamW underneath) takes AdamW's value; SCALE's
ablations and SWAN (whose whitened matrix steps have entry RMS ``lr``, as SCALE's normalized
ones) take SCALE's; ``sgd``'s value is a plain guess; anything else falls back to the optimizer
registry's published value. Other models and horizons need their own sweep."""


def register_optimizer(name: str) -> Callable[[OptimizerFactory], OptimizerFactory]:
    """Decorator adding ``factory`` to :data:`OPTIMIZERS` under ``name`` (lower case)."""

    def deco(factory: OptimizerFactory) -> OptimizerFactory:
        key = name.lower()
        if key in OPTIMIZERS:
            raise ValueError(f"optimizer {key!r} is already registered")
        OPTIMIZERS[key] = factory
        return factory

    return deco


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _from_registry(name: str) -> OptimizerFactory:
    """A factory over :func:`gradlens.optim.registry.make_optimizer` (one registry of
    optimizers for the whole package); SCALE and its variants get ``lr_1d = 20 * lr`` unless
    given, the ratio of the paper's 60M-350M runs (1e-3 / 2e-2)."""

    def factory(model: nn.Module, lr: float, **kw: Any) -> tuple[Optimizer, dict[str, Any]]:
        from gradlens.optim.registry import make_optimizer as build

        if name in _SCALE_FAMILY:
            kw.setdefault("lr_1d", 20.0 * lr)
        opt = build(name, model, lr, **kw)
        info: dict[str, Any] = dict(name=name, lr=lr)
        defaults = getattr(opt, "defaults", {}) or {}
        for k, v in {**defaults, **kw}.items():
            if k not in info and isinstance(v, (int, float, str, bool, tuple, type(None))):
                info[k] = list(v) if isinstance(v, tuple) else v
        return opt, info

    return factory


_SCALE_FAMILY = ("scale", "colnorm_sgd", "colnorm_sgd_momentum_all", "sgd_output_momentum")


def _register_field() -> None:
    from gradlens.optim.registry import OPTIMIZERS as FIELD

    for name in FIELD:
        register_optimizer(name)(_from_registry(name))


_register_field()


@register_optimizer("sgd")
def _sgd(model: nn.Module, lr: float, *, momentum: float = 0.9, nesterov: bool = False,
         weight_decay: float = 0.0, **kw: Any) -> tuple[Optimizer, dict[str, Any]]:
    """``torch.optim.SGD`` with heavy-ball momentum 0.9 (a reference point, not a contender)."""
    opt = torch.optim.SGD(_trainable(model), lr=lr, momentum=momentum, nesterov=nesterov,
                          weight_decay=weight_decay, foreach=True, **kw)
    return opt, dict(name="sgd", lr=lr, momentum=momentum, nesterov=nesterov,
                     weight_decay=weight_decay, **kw)


def default_lr(key: str) -> float:
    """The demo-tuned lr of :data:`DEFAULT_LRS`, else the optimizer registry's default."""
    from gradlens.optim.registry import OPTIMIZERS as FIELD

    if key in DEFAULT_LRS:
        return DEFAULT_LRS[key]
    if key in FIELD:
        return FIELD[key].lr
    raise ValueError(f"optimizer {key!r} has no default learning rate; pass lr=")


def make_optimizer(name: str, model: nn.Module, lr: float | None = None,
                   **kw: Any) -> tuple[Optimizer, dict[str, Any]]:
    """Build the optimizer registered as ``name`` for ``model``.

    Args:
        name: a key of :data:`OPTIMIZERS` (case-insensitive).
        model: the model whose trainable parameters it updates.
        lr: peak learning rate; None takes :data:`DEFAULT_LRS` (an error if it has none).
        **kw: passed to the factory (e.g. ``betas`` for adamw, ``lr_1d`` for scale).

    Returns:
        ``(optimizer, info)``, ``info`` a JSON-able dict of the hyperparameters.
    """
    key = name.lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    if lr is None:
        lr = default_lr(key)
    if not lr > 0:
        raise ValueError(f"learning rate must be > 0, got lr={lr}")
    return OPTIMIZERS[key](model, lr, **kw)


def optimizer_state_bytes(optimizer: Optimizer) -> int:
    """Bytes of the tensors held in ``optimizer.state`` (``numel * element_size``).

    0-dim tensors (step counters such as Adam's ``step``) are bookkeeping and left out, so
    AdamW's figure is exactly ``2 * params * element_size``. Lazily created state counts only
    after the first ``step()``.
    """
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0:
                total += value.numel() * value.element_size()
    return total


# --------------------------------------------------------------------------- schedule


def cosine_lr_factor(step: int, total_steps: int, warmup_frac: float = 0.1,
                     min_ratio: float = 0.1) -> float:
    """The multiplier of the peak lr at optimizer step ``step`` (0-based).

    With ``W = round(warmup_frac * total_steps)`` warm-up steps:

    - ``step < W``: linear warm-up ``(step + 1) / W`` (step 0 already moves; step W-1 is at peak);
    - then ``min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2`` with
      ``p = (step - W) / max(1, total_steps - 1 - W)``, clipped to [0, 1]: the peak at step W,
      ``min_ratio`` at the last step ``total_steps - 1`` and after it.
    """
    warmup = round(warmup_frac * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total_steps - 1 - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def cosine_schedule(optimizer: Optimizer, total_steps: int, warmup_frac: float = 0.1,
                    min_ratio: float = 0.1) -> LambdaLR:
    """``LambdaLR`` applying :func:`cosine_lr_factor` to every param group's lr.

    The SCALE paper's schedule: 10% linear warm-up, cosine decay to 0.1 x peak. Call
    ``scheduler.step()`` once after each ``optimizer.step()``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= warmup_frac < 1.0:
        raise ValueError(f"warmup_frac must be in [0, 1), got {warmup_frac}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    return LambdaLR(optimizer, lambda s: cosine_lr_factor(s, total_steps, warmup_frac, min_ratio))


# --------------------------------------------------------------------------- training


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
        optimizer_state_bytes: see :func:`optimizer_state_bytes`, after the last step.
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


# --------------------------------------------------------------------------- runs

MODEL_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    # the demo: "small" narrowed to hidden 128 so that two runs + the lens fit in minutes on
    # 2 CPU cores (1.8M parameters, 1.0M of them in the embedding and lm_head)
    "demo": ("small", dict(hidden_size=128, intermediate_size=344, num_attention_heads=4,
                           num_hidden_layers=4, vocab_size=4096)),
    # ``LLAMA_SIZES["tiny"]`` has 128 ids (unit tests feed it random ids); trained on text it
    # needs the byte-level tokenizer's minimum of 257, so the runs' "tiny" has 512
    "tiny": ("tiny", dict(vocab_size=512)),
}
"""Extra model sizes: ``name -> (LLAMA_SIZES key, overrides)``."""


def build_model(size: str = "demo", seed: int | None = 0,
                device: str | torch.device | None = None, **overrides: Any) -> nn.Module:
    """A LLaMA from :data:`MODEL_PRESETS` or ``gradlens.data.LLAMA_SIZES``; overrides win."""
    from gradlens.data.models import LLAMA_SIZES, build_llama

    if size in MODEL_PRESETS:
        base, preset = MODEL_PRESETS[size]
        return build_llama(base, device=device, seed=seed, **{**preset, **overrides})
    if size not in LLAMA_SIZES:
        raise ValueError(
            f"unknown model size {size!r}; choose one of {sorted([*MODEL_PRESETS, *LLAMA_SIZES])}"
        )
    return build_llama(size, device=device, seed=seed, **overrides)


def model_vocab_size(size: str, **overrides: Any) -> int:
    """The vocabulary size ``build_model(size, **overrides)`` would have."""
    from gradlens.data.models import LLAMA_SIZES

    if "vocab_size" in overrides:
        return int(overrides["vocab_size"])
    if size in MODEL_PRESETS:
        base, preset = MODEL_PRESETS[size]
        return int(preset.get("vocab_size", LLAMA_SIZES[base]["vocab_size"]))
    if size not in LLAMA_SIZES:
        raise ValueError(f"unknown model size {size!r}")
    return int(LLAMA_SIZES[size]["vocab_size"])


@dataclass
class RunConfig:
    """One comparison: the same model, data and seed for each optimizer in ``optimizers``.

    The defaults are the demo: the ``demo`` LLaMA (hidden 128, 4 layers, vocabulary 4096),
    batches of 16 x 128 tokens, 200 steps with 10% warm-up and cosine decay to 0.1 x peak, no
    clipping (as SCALE's published runs), Shakespeare, seed 0.

    Attributes:
        size: a :data:`MODEL_PRESETS` or ``LLAMA_SIZES`` name; ``model_overrides`` win.
        optimizers: names in :data:`OPTIMIZERS`, run one after the other.
        lrs: peak lr per optimizer; missing names take :data:`DEFAULT_LRS`.
        optimizer_kwargs: extra keywords per optimizer name.
        steps, batch_size, seq_len, grad_accum: the optimizer steps and their micro-batches.
        warmup_frac, min_lr_ratio: the schedule (:func:`cosine_schedule`).
        clip: global-norm clipping, None for none.
        eval_batches: held-out batches (of ``batch_size``) evaluated after training.
        eval_fraction: the held-out share of every document.
        vocab_size: tokenizer vocabulary; None uses the model's.
        seed: model initialization, batch order and torch RNG.
        corpus: see :func:`gradlens.data.corpus.load_corpus` (None: Shakespeare).
        cache_dir: tokenizer and token cache (None: ``$GRADLENS_CACHE`` or ``~/.cache``).
        out_dir: where a caller writes its runs (not used by :func:`run_experiment`).
        device: ``cpu``, ``cuda``...
        log_every: steps between progress-bar updates (host syncs).
    """

    size: str = "demo"
    optimizers: tuple[str, ...] = ("scale", "adamw")
    lrs: dict[str, float] = field(default_factory=dict)
    optimizer_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    warmup_frac: float = 0.1
    min_lr_ratio: float = 0.1
    clip: float | None = None
    eval_batches: int = 8
    eval_fraction: float = 0.05
    vocab_size: int | None = None
    seed: int = 0
    corpus: str | None = None
    cache_dir: str | None = None
    out_dir: str | None = None
    device: str = "cpu"
    log_every: int = 10

    def lr_for(self, name: str) -> float:
        """The peak lr of optimizer ``name``."""
        key = name.lower()
        if key in self.lrs:
            return float(self.lrs[key])
        return default_lr(key)

    def tokenizer_vocab_size(self) -> int:
        """``vocab_size`` or the model's; a ``ValueError`` below the tokenizer's minimum."""
        from gradlens.data.tokenizer import MIN_VOCAB_SIZE

        vocab = (self.vocab_size if self.vocab_size is not None
                 else model_vocab_size(self.size, **self.model_overrides))
        if vocab < MIN_VOCAB_SIZE:
            raise ValueError(
                f"model size {self.size!r} has a vocabulary of {vocab}, below the tokenizer's "
                f"minimum of {MIN_VOCAB_SIZE} (256 bytes + end of text); pass "
                f"model_overrides={{'vocab_size': {MIN_VOCAB_SIZE}}} or more"
            )
        return vocab

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (for run metadata)."""
        out = asdict(self)
        out["optimizers"] = list(self.optimizers)
        return out


def run_experiment(config: RunConfig, optimizer: str, data: Any | None = None, *,
                   lens_factory: Callable[[nn.Module, Optimizer], Any] | None = None,
                   on_step: Callable[[StepInfo], Any] | None = None,
                   progress: bool = True) -> tuple[nn.Module, TrainResult]:
    """Train a fresh model of ``config`` with ``optimizer``; ``(model, result)``.

    ``data`` is a :class:`gradlens.data.batches.DataBundle` (prepared from the config when
    None; pass it to share the tokenization between optimizers). Every optimizer of one config
    starts from the same initialization (``seed``) and sees the same batches in the same order.
    ``result.info`` holds the optimizer's hyperparameters, the config and the data summary.
    """
    from gradlens.data.batches import prepare_data

    if optimizer.lower() not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {sorted(OPTIMIZERS)}")
    if data is None:
        data = prepare_data(config.corpus, config.tokenizer_vocab_size(), config.cache_dir,
                            config.eval_fraction)
    model = build_model(config.size, seed=config.seed, device=config.device,
                        **config.model_overrides)
    vocab = model.get_input_embeddings().num_embeddings
    if data.vocab_size > vocab:
        raise ValueError(f"the tokenizer has {data.vocab_size} ids but the model only {vocab}; "
                         f"set vocab_size <= {vocab}")
    opt, info = make_optimizer(optimizer, model, config.lr_for(optimizer),
                               **config.optimizer_kwargs.get(optimizer.lower(), {}))
    sched = cosine_schedule(opt, config.steps, config.warmup_frac, config.min_lr_ratio)
    batches = data.train_batches(config.batch_size, config.seq_len, config.seed, config.device)
    evals = data.eval_batches(config.eval_batches, config.batch_size, config.seq_len,
                              config.device) if config.eval_batches > 0 else None
    result = train(
        model, opt, sched, batches, config.steps, grad_accum=config.grad_accum, clip=config.clip,
        eval_batches=evals, on_step=on_step, lens_factory=lens_factory, progress=progress,
        seed=config.seed, log_every=config.log_every, desc=optimizer,
    )
    result.info.update(
        optimizer=info, config=config.to_dict(), data=data.summary(),
        parameters=sum(p.numel() for p in model.parameters()),
    )
    return model, result


def save_result(result: TrainResult, path: str | Path) -> Path:
    """Write ``result.to_dict()`` as JSON to ``path``; returns the path."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_dict(), indent=1, default=str))
    return path
