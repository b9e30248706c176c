"""One optimizer's run from a config, as ``gradlens demo`` and ``gradlens compare`` make them.

- :class:`RunConfig` / :func:`build_model` / :func:`run_experiment`: the same initialization and
  the same batches for every optimizer of a seed;
- :func:`make_run_optimizer`: an optimizer of the one registry
  (:data:`gradlens.optim.registry.OPTIMIZERS`) at the demo-tuned :data:`DEFAULT_LRS`, with the
  JSON-able record of its hyperparameters that the run files keep.

The loop itself is :func:`gradlens.training.train`; the schedule
:func:`gradlens.optim.schedule.cosine_schedule`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from gradlens.optim.registry import OPTIMIZERS, make_optimizer
from gradlens.optim.schedule import cosine_schedule
from gradlens.training import StepInfo, TrainResult, train

__all__ = [
    "DEFAULT_LRS",
    "MODEL_PRESETS",
    "RunConfig",
    "build_model",
    "default_lr",
    "make_run_optimizer",
    "model_vocab_size",
    "run_experiment",
    "save_result",
]

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

_SCALE_FAMILY = ("scale", "colnorm_sgd", "colnorm_sgd_momentum_all", "sgd_output_momentum")


def default_lr(key: str) -> float:
    """The demo-tuned lr of :data:`DEFAULT_LRS`, else the optimizer registry's default."""
    if key in DEFAULT_LRS:
        return DEFAULT_LRS[key]
    if key in OPTIMIZERS:
        return OPTIMIZERS[key].lr
    raise ValueError(f"optimizer {key!r} has no default learning rate; pass lr=")


def make_run_optimizer(name: str, model: nn.Module, lr: float | None = None,
                       **kw: Any) -> tuple[Optimizer, dict[str, Any]]:
    """The optimizer ``name`` of :data:`gradlens.optim.registry.OPTIMIZERS` for a run.

    Differs from :func:`gradlens.optim.registry.make_optimizer` in the defaults of a run:
    ``name`` is case-insensitive, ``lr=None`` takes :data:`DEFAULT_LRS` (the demo's tuned
    values), and SCALE and its variants get ``lr_1d = 20 * lr`` unless given (the ratio of the
    paper's 60M-350M runs, 1e-3 / 2e-2).

    Args:
        name: a key of the registry (case-insensitive).
        model: the model whose trainable parameters it updates.
        lr: peak learning rate; None takes :func:`default_lr`.
        **kw: passed to the registry's builder (e.g. ``betas`` for adamw, ``lr_1d`` for scale).

    Returns:
        ``(optimizer, info)``, ``info`` a JSON-able dict of the hyperparameters: ``name``,
        ``lr``, then those of the optimizer's defaults and ``kw`` that are JSON scalars or
        lists of them.
    """
    key = name.lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    if lr is None:
        lr = default_lr(key)
    if not lr > 0:
        raise ValueError(f"learning rate must be > 0, got lr={lr}")
    if key in _SCALE_FAMILY:
        kw.setdefault("lr_1d", 20.0 * lr)
    opt = make_optimizer(key, model, lr, **kw)
    info: dict[str, Any] = dict(name=key, lr=lr)
    defaults = getattr(opt, "defaults", {}) or {}
    for k, v in {**defaults, **kw}.items():
        if k not in info and (_json_scalar(v) or (isinstance(v, (list, tuple))
                              and all(_json_scalar(x) for x in v))):
            info[k] = list(v) if isinstance(v, (list, tuple)) else v
    return opt, info


def _json_scalar(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool, type(None)))


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
        optimizers: names in :data:`gradlens.optim.registry.OPTIMIZERS`, run one
            after the other.
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
    opt, info = make_run_optimizer(optimizer, model, config.lr_for(optimizer),
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
