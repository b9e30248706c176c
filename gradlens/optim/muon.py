"""``torch.optim.Muon`` on the hidden matrices + ``torch.optim.AdamW`` on the rest, as one.

Muon (Jordan et al. 2024; "Muon is Scalable for LLM Training", Liu et al., arXiv 2502.16982)
orthogonalizes the (Nesterov) momentum of each 2-D hidden matrix with a few quintic
Newton–Schulz iterations in bf16 and is meant for hidden layers only; the embedding, the output
layer and the 1-D tensors use AdamW. :func:`muon_adamw` builds both from gradlens's roles and
returns a :class:`~gradlens.optim.chained.ChainedOptimizer`, so schedulers, step hooks and
checkpoints see one optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gradlens.optim.chained import ChainedOptimizer
from gradlens.roles import Role, discover_layers

__all__ = ["muon_adamw"]


def muon_adamw(
    model: nn.Module,
    lr: float = 1e-3,
    adamw_lr: float | None = None,
    weight_decay: float = 0.0,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    adjust_lr_fn: str | None = "match_rms_adamw",
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    overrides: Mapping[str, str | Role] | None = None,
    output: str | None = None,
) -> ChainedOptimizer:
    """``torch.optim.Muon`` for the 2-D hidden matrices, ``torch.optim.AdamW`` for the rest.

    Roles come from :func:`gradlens.roles.discover_layers`: every ``hidden`` matrix with
    ``ndim == 2`` goes to Muon (``torch.optim.Muon`` takes 2-D tensors only; a hidden tensor with
    ndim > 2 goes to AdamW); the ``embedding``, ``output`` and ``vector`` tensors go to AdamW,
    one group per role. Every group carries ``role`` and ``param_names``. Frozen parameters are
    left out.

    Defaults: ``adjust_lr_fn="match_rms_adamw"`` scales Muon's step to ``0.2 sqrt(max(A, B))``
    times its lr, the Moonlight recipe (arXiv 2502.16982) under which Muon reuses AdamW's lr and
    weight decay; so ``adamw_lr`` defaults to ``lr``. Pass ``adjust_lr_fn="original"`` with
    ``lr`` ~ 0.02 for Keller Jordan's scaling. Momentum 0.95 with Nesterov and 5 Newton–Schulz
    steps are torch's (and Muon's published) defaults. Weight decay defaults to 0 (torch's Muon
    uses 0.1), like SCALE's published runs, so comparisons share it. AdamW uses
    ``betas=(0.9, 0.95)`` and ``foreach=True``.

    Pitfall: ``torch.optim.Muon`` runs its Newton–Schulz iterations in bf16, which CPUs without
    bf16 matrix units execute slowly (here a bf16 matmul is ~7x slower than fp32): one step of
    llama-small took ~28 s on one core of the 2-core dev machine, vs ~0.06 s for AdamW and
    ~1.7 s for SWAN. Compare Muon on a GPU.

    Args:
        model: any ``nn.Module``.
        lr: Muon learning rate.
        adamw_lr: AdamW learning rate (None: ``lr``).
        weight_decay: decoupled weight decay of both optimizers.
        momentum, nesterov, ns_steps, adjust_lr_fn: ``torch.optim.Muon`` options.
        betas, eps: ``torch.optim.AdamW`` options.
        overrides: ``{fnmatch pattern on parameter name: role}`` (see ``discover_layers``).
        output: qualified name of the output module when it cannot be detected.

    Raises:
        RuntimeError: this torch has no ``torch.optim.Muon``.
        ValueError: the model has no 2-D hidden matrix (nothing for Muon to do).
    """
    muon_cls = getattr(torch.optim, "Muon", None)
    if muon_cls is None:
        raise RuntimeError(
            f"torch.optim.Muon is not available in torch {torch.__version__}; upgrade torch, "
            "or compare with another optimizer"
        )
    muon_params: list[nn.Parameter] = []
    muon_names: list[str] = []
    adamw_groups: dict[str, dict[str, Any]] = {}
    for info in discover_layers(model, overrides=overrides, output=output):
        if info.role is Role.HIDDEN and info.param.ndim == 2:
            muon_params.append(info.param)
            muon_names.append(info.name)
            continue
        group = adamw_groups.setdefault(
            info.role.value, {"params": [], "param_names": [], "role": info.role.value}
        )
        group["params"].append(info.param)
        group["param_names"].append(info.name)
    if not muon_params:
        raise ValueError(
            "muon_adamw: the model has no 2-D hidden matrix for Muon; name roles with "
            "overrides=... or use AdamW alone"
        )
    children: list[torch.optim.Optimizer] = [
        muon_cls(
            [{"params": muon_params, "param_names": muon_names, "role": "hidden"}], lr=lr,
            weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
        )
    ]
    if adamw_groups:
        children.append(
            torch.optim.AdamW(
                list(adamw_groups.values()), lr=lr if adamw_lr is None else adamw_lr,
                betas=betas, eps=eps, weight_decay=weight_decay, foreach=True,
            )
        )
    return ChainedOptimizer(children)
