"""The one registry of optimizers gradlens compares: ``make_optimizer(name, model, lr)``.

    from gradlens.optim.registry import OPTIMIZERS, make_optimizer
    opt = make_optimizer("scale", model)            # the default lr of OPTIMIZERS["scale"]
    opt = make_optimizer("swan", model, lr=2e-3)

``gradlens demo`` and ``gradlens compare`` build their optimizers from it too
(:func:`gradlens.experiment.make_run_optimizer` adds their demo-tuned learning rates); add an
entry with :func:`register_optimizer`.

Default learning rates are for a small LLaMA (``build_llama("small")`` .. 60M) trained on
~1e5-1e6 tokens. Where a paper or its code publishes a setting it is used (``published=True``
in :data:`OPTIMIZERS`); the others are guesses, marked ``published=False``, with the reasoning
in their ``note``. Every entry defaults to no weight decay (SCALE's published runs use none), so
that comparisons share it; pass ``weight_decay=...`` to change it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from gradlens.optim.muon import muon_adamw
from gradlens.optim.scale import SCALE
from gradlens.optim.stable_spam import StableSPAM
from gradlens.optim.swan import SWAN, swan_param_groups
from gradlens.optim.variants import scale_variant_groups

__all__ = ["ADAMW_BETAS", "OPTIMIZERS", "OptimizerSpec", "make_optimizer", "register_optimizer"]

ADAMW_BETAS = (0.9, 0.95)
"""Betas of the ``adamw`` baseline: the LLaMA pretraining setting (Touvron et al. 2023). The
second moment then averages over ~20 steps, which suits runs of a few hundred to a few thousand
steps; pass ``betas=(0.9, 0.999)`` for torch's default (and SCALE's 1-D AdamW)."""

SCALE_LR_1D = 2e-2
"""Published 1-D AdamW lr of SCALE (60M..350M), used by every SCALE variant unless given."""

_SCALE_CTOR = frozenset({"betas", "eps", "foreach"})
_SWAN_CTOR = frozenset({"betas", "eps", "norm_dim", "ns_steps", "norm_eps", "rms_scale",
                        "foreach"})


@dataclass(frozen=True)
class OptimizerSpec:
    """One registry entry.

    Attributes:
        name: registry key.
        description: one line.
        lr: default (peak) learning rate for a small LLaMA on ~1e5-1e6 tokens.
        published: whether ``lr`` is a published setting (False: a guess, see ``note``).
        note: where ``lr`` comes from.
        build: ``(model, lr, **kw) -> Optimizer``.
    """

    name: str
    description: str
    lr: float
    published: bool
    note: str
    build: Callable[..., Optimizer]


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]  # parameters() dedups ties


def _adamw(model: nn.Module, lr: float, **kw: Any) -> Optimizer:
    kw.setdefault("betas", ADAMW_BETAS)
    kw.setdefault("weight_decay", 0.0)
    kw.setdefault("foreach", True)
    return torch.optim.AdamW(_trainable(model), lr=lr, **kw)


def _scale_variant(variant: str) -> Callable[..., Optimizer]:
    def build(model: nn.Module, lr: float, **kw: Any) -> Optimizer:
        lr_1d = kw.pop("lr_1d", SCALE_LR_1D)
        ctor = {k: kw.pop(k) for k in list(kw) if k in _SCALE_CTOR}
        return SCALE(scale_variant_groups(model, variant, lr=lr, lr_1d=lr_1d, **kw), **ctor)

    return build


def _swan(model: nn.Module, lr: float, **kw: Any) -> Optimizer:
    ctor = {k: kw.pop(k) for k in list(kw) if k in _SWAN_CTOR}
    return SWAN(swan_param_groups(model, lr=lr, **kw), **ctor)


def _stable_spam(model: nn.Module, lr: float, **kw: Any) -> Optimizer:
    return StableSPAM(_trainable(model), lr=lr, **kw)


def _muon(model: nn.Module, lr: float, **kw: Any) -> Optimizer:
    return muon_adamw(model, lr=lr, **kw)


def _sgd(model: nn.Module, lr: float, *, momentum: float = 0.9, nesterov: bool = False,
         weight_decay: float = 0.0, **kw: Any) -> Optimizer:
    kw.setdefault("foreach", True)
    return torch.optim.SGD(_trainable(model), lr=lr, momentum=momentum, nesterov=nesterov,
                           weight_decay=weight_decay, **kw)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec(
            "adamw", "AdamW on every parameter (torch.optim.AdamW, betas (0.9, 0.95), foreach)",
            1e-3, True, "Adam-family setting 1e-3 (LLaMA 60M..350M Adam baselines of the "
            "GaLore/SCALE line of work)",
            _adamw,
        ),
        OptimizerSpec(
            "scale", "SCALE: column-normalized SGD, output-layer momentum, AdamW on 1-D "
            "(arXiv 2506.16659)",
            1e-3, True, "published: lr 1e-3, 1-D lr 2e-2 (60M..350M)", _scale_variant("scale"),
        ),
        OptimizerSpec(
            "colnorm_sgd", "SCALE ablation: column-normalized SGD, no momentum anywhere",
            1e-3, False, "guess: SCALE's lr 1e-3 / 1-D 2e-2 (same normalized step size)",
            _scale_variant("colnorm_sgd"),
        ),
        OptimizerSpec(
            "colnorm_sgd_momentum_all", "SCALE ablation: column-normalized SGD, momentum on "
            "every matrix",
            1e-3, False, "guess: SCALE's lr 1e-3 / 1-D 2e-2 (same normalized step size)",
            _scale_variant("colnorm_sgd_momentum_all"),
        ),
        OptimizerSpec(
            "sgd_output_momentum", "SCALE ablation: plain SGD (no normalization), "
            "output-layer momentum",
            0.2, False, "guess: best of 0.1/0.2/0.5/2 in one 100-step run of llama-small "
            "(1e5 tokens; plain SGD needs lr ~ step / gradient RMS, and hidden-gradient RMS "
            "is 2e-5..2e-3 at init); 1-D lr 2e-2 as SCALE",
            _scale_variant("sgd_output_momentum"),
        ),
        OptimizerSpec(
            "swan", "SWAN: GradNorm + Newton-Schulz GradWhitening on hidden matrices, Adam "
            "elsewhere (arXiv 2412.13148)",
            1e-3, False, "guess: with rms_scale the matrix step has entry RMS lr, like SCALE's; "
            "Adam groups at the same 1e-3 (Adam-family)",
            _swan,
        ),
        OptimizerSpec(
            "stable_spam", "Stable-SPAM: AdaClip + AdaGN + momentum reset + AdamW "
            "(arXiv 2502.17055)",
            1e-3, False, "Adam-family 1e-3 (not a Stable-SPAM lr tuned for these sizes); "
            "g1/g2/g3/DeltaT are the published code defaults; the cosine decay of "
            "gamma1/beta1 is off unless total_T=<steps> is passed",
            _stable_spam,
        ),
        OptimizerSpec(
            "muon", "torch.optim.Muon on 2-D hidden matrices + AdamW elsewhere, as one optimizer",
            1e-3, False, "derived: Moonlight's match_rms_adamw scaling lets Muon reuse the "
            "Adam-family lr 1e-3 (arXiv 2502.16982); not tuned here",
            _muon,
        ),
        OptimizerSpec(
            "sgd", "torch.optim.SGD with heavy-ball momentum 0.9 (a reference point, not a "
            "contender)",
            0.1, False, "guess: a plain value, not tuned", _sgd,
        ),
    )
}
"""Every name :func:`make_optimizer` accepts, with its description and default lr."""


def make_optimizer(
    name: str, model: nn.Module, lr: float | None = None, **kw: Any
) -> Optimizer:
    """Build the optimizer ``name`` for ``model`` (a ``torch.optim.Optimizer``).

    Args:
        name: a key of :data:`OPTIMIZERS`: ``adamw``, ``scale``, ``colnorm_sgd``,
            ``colnorm_sgd_momentum_all``, ``sgd_output_momentum``, ``swan``, ``stable_spam``,
            ``muon``, ``sgd``, and whatever :func:`register_optimizer` added.
        model: the model; roles come from :func:`gradlens.roles.discover_layers` where the
            method needs them. Frozen parameters are left out.
        lr: peak learning rate (None: ``OPTIMIZERS[name].lr``).
        **kw: passed on: ``torch.optim.AdamW`` options (``adamw``); ``lr_1d`` and
            :func:`gradlens.optim.scale_param_groups` / :class:`gradlens.optim.SCALE` options
            (SCALE variants; ``lr_1d`` defaults to 2e-2); ``adam_lr`` and
            :func:`gradlens.optim.swan_param_groups` / :class:`gradlens.optim.SWAN` options
            (``swan``); :class:`gradlens.optim.StableSPAM` options (``stable_spam``);
            :func:`gradlens.optim.muon_adamw` options (``muon``); ``torch.optim.SGD`` options
            (``sgd``: ``momentum`` 0.9 by default).

    Raises:
        ValueError: unknown name (the message lists the names).
    """
    spec = OPTIMIZERS.get(name)
    if spec is None:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {list(OPTIMIZERS)}")
    return spec.build(model, spec.lr if lr is None else lr, **kw)


def register_optimizer(spec: OptimizerSpec) -> OptimizerSpec:
    """Add ``spec`` to :data:`OPTIMIZERS` under ``spec.name``; returns it.

    Raises:
        ValueError: the name is taken (``OPTIMIZERS.pop(name)`` first to replace an entry).
    """
    if spec.name in OPTIMIZERS:
        raise ValueError(f"optimizer {spec.name!r} is already registered")
    if not spec.lr > 0:
        raise ValueError(f"OptimizerSpec.lr must be > 0, got lr={spec.lr} for {spec.name!r}")
    OPTIMIZERS[spec.name] = spec
    return spec
