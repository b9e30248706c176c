r"""SWAN: SGD with Whitening And Normalization (stateless on hidden matrices), plus its groups.

Ma, Gong, Scetbon, Meeds, "SWAN: SGD with Normalization and Whitening Enables Stateless LLM
Training", arXiv 2412.13148. The matrix rule and its numerics are documented in
:mod:`gradlens.optim.swan_functional`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor, nn

from gradlens.optim._base import (
    AdamWLists,
    GroupwiseOptimizer,
    params_with_grad,
    uses_adamw,
    validate_adamw_split,
)
from gradlens.optim.functional import adamw_update
from gradlens.optim.swan_functional import NORM_EPS, NS_STEPS, swan_update
from gradlens.roles import Role, discover_layers

__all__ = ["SWAN", "SWAN_ALGORITHMS", "swan_param_groups"]

SWAN_ALGORITHMS = ("auto", "swan", "adamw")
"""``auto``: ``swan`` for ndim >= 2, ``adamw`` for ndim <= 1."""

_SPARSE_ERROR = "SWAN does not support sparse gradients; build the embedding with sparse=False"


class SWAN(GroupwiseOptimizer):
    r"""SWAN on hidden matrices (no state), Adam(W) on the embedding, output layer and 1-D tensors.

    Hidden matrices (``algorithm="swan"``; gradient ``G`` viewed as ``(m, n) = (size0, -1)``)::

        N = (G - mean_row(G)) / max(std_row(G), norm_eps)         GradNorm (per output row)
        U = (N N^T)^(-1/2) N                                      GradWhitening, ns_steps
                                                                  Newton–Schulz iterations in
                                                                  fp32, on the smaller side
        W <- W * (1 - lr * wd) - lr * sqrt(max(m, n)) * U         (the factor: ``rms_scale``)

    No optimizer state is created for these tensors. Everything else (``algorithm="adamw"``) is
    AdamW with the kernel SCALE uses (:func:`gradlens.optim.adamw_update`: ``eps`` added to
    ``sqrt(v)`` before the bias correction; it differs from ``torch.optim.AdamW`` by O(eps)).

    The paper's recipe is SWAN on the hidden matrices and Adam on the embedding, the output layer
    and the 1-D tensors: :func:`swan_param_groups` builds those groups from a model. A plain
    parameter list gets ``algorithm="auto"``: SWAN on every matrix (the embedding and lm_head
    included), AdamW on 1-D tensors.

    Param-group options: ``lr``, ``weight_decay`` (decoupled, times the current lr),
    ``algorithm`` (``auto``/``swan``/``adamw``), ``norm_dim`` (axis GradNorm reduces over: 1 for
    ``(out, in)`` weights, 0 for ``(in, out)`` layouts such as GPT-2 ``Conv1D``, None skips
    GradNorm), ``ns_steps``, ``norm_eps``, ``rms_scale``, ``betas``, ``eps``, ``role``
    (informational), ``foreach``, ``step_gate`` (None, or a 0-d device tensor: 0.0 skips the
    group's step on device, no host sync, leaving the parameters and the AdamW moments and
    step counters bit-identical; the counters then live on the device and the bias
    corrections are computed there; :mod:`gradlens.optim.gate`).

    Pitfalls:
        - Stateless and scale-invariant per matrix: mean vs sum loss reduction, the number of
          accumulated micro-batches and an un-unscaled AMP loss scale do not change the matrix
          update (they do change AdamW's ``eps`` balance). Accumulate the full gradient before
          ``step()``: whitening each micro-batch and summing is a different method.
        - Global gradient clipping is a no-op on the matrices (a common factor is removed by
          GradNorm).
        - Every ``step()`` runs ``ns_steps`` pairs of matmuls per hidden matrix: on a large model
          this dominates the optimizer time (see :mod:`gradlens.optim.swan_functional`).
        - Whitening needs each whole matrix: with FSDP or tensor parallelism the gradient of a
          hidden matrix must be gathered before the step (GradNorm's row statistics too).
        - A parameter whose ``grad`` is None is skipped and its state is left untouched.

    Args:
        params: parameters or param-group dicts (or ``(name, tensor)`` pairs).
        lr: learning rate (with ``rms_scale``, the RMS size of each matrix step).
        weight_decay: decoupled weight decay.
        betas: AdamW ``(b1, b2)``.
        eps: AdamW epsilon.
        algorithm: default per-tensor rule (``auto``, ``swan`` or ``adamw``).
        norm_dim: default GradNorm axis (0, 1, or None to skip GradNorm).
        ns_steps: Newton–Schulz iterations (default 10, ``swan_functional.NS_STEPS``).
        norm_eps: lower clamp of GradNorm's standard deviation.
        rms_scale: scale the whitened matrix to entry RMS 1 (see the module docstring of
            :mod:`gradlens.optim.swan_functional`; False: the bare formula).
        foreach: True or None (default): batched path (equal-shape matrices stacked, one batched
            Newton–Schulz per shape; ``torch._foreach_*`` AdamW); False: per-tensor loop.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        algorithm: str = "auto",
        norm_dim: int | None = 1,
        ns_steps: int = NS_STEPS,
        norm_eps: float = NORM_EPS,
        rms_scale: bool = True,
        *,
        foreach: bool | None = None,
    ) -> None:
        defaults: dict[str, Any] = dict(
            lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, algorithm=algorithm,
            norm_dim=norm_dim, ns_steps=ns_steps, norm_eps=norm_eps, rms_scale=rms_scale,
            role=None, foreach=foreach,
        )
        _validate(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; missing options come from the constructor, then are validated."""
        _validate({**self.defaults, **param_group})
        super().add_param_group(param_group)
        self._require_matrices("swan")

    def _step_group(self, group: dict[str, Any]) -> None:
        mats: list[Tensor] = []
        mat_grads: list[Tensor] = []
        vectors = AdamWLists()
        gate = group.get("step_gate")
        for p in params_with_grad(group, _SPARSE_ERROR):
            if uses_adamw(group["algorithm"], p):
                vectors.add(p, self.state[p], gated=gate is not None)  # matrices: no state
            else:
                mats.append(p)
                mat_grads.append(p.grad)
        foreach = group["foreach"] is not False
        swan_update(
            mats, mat_grads, lr=group["lr"], weight_decay=group["weight_decay"],
            norm_dim=group["norm_dim"], ns_steps=group["ns_steps"], norm_eps=group["norm_eps"],
            rms_scale=group["rms_scale"], foreach=foreach, step_gate=gate,
        )
        beta1, beta2 = group["betas"]
        adamw_update(
            *vectors.lists(), lr=group["lr"],
            weight_decay=group["weight_decay"], beta1=beta1, beta2=beta2, eps=group["eps"],
            foreach=foreach, step_gate=gate,
        )


def swan_param_groups(
    model: nn.Module,
    lr: float = 1e-3,
    adam_lr: float | None = None,
    weight_decay: float = 0.0,
    overrides: Mapping[str, str | Role] | None = None,
    output: str | None = None,
) -> list[dict[str, Any]]:
    """Param groups for :class:`SWAN` from gradlens's roles: hidden -> SWAN, the rest -> Adam.

    One group per ``(role, norm_dim)``: ``hidden`` matrices get ``algorithm="swan"`` with the
    GradNorm axis of their layout (``norm_dim=1`` for ``nn.Linear`` ``(out, in)``, 0 for GPT-2
    ``Conv1D`` ``(in, out)``, 1 for ndim > 2 viewed as ``(size0, -1)``); ``embedding``,
    ``output`` and ``vector`` tensors get ``algorithm="adamw"`` at ``adam_lr``. Frozen
    parameters are left out; a tied embedding appears once, as the output layer (Adam either
    way). Each group carries ``lr`` (so a scheduler scales both learning rates with the same
    shape), ``role`` and ``param_names``.

    Args:
        model: any ``nn.Module``.
        lr: peak learning rate of the SWAN groups.
        adam_lr: peak learning rate of the Adam groups (None: ``lr``).
        weight_decay: decoupled weight decay of every group.
        overrides: ``{fnmatch pattern on parameter name: role}``, as in
            :func:`gradlens.roles.discover_layers`.
        output: qualified name of the output module when it cannot be detected.
    """
    layers = discover_layers(model, overrides=overrides, output=output)
    alr = lr if adam_lr is None else adam_lr
    groups: dict[tuple[str, int | None], dict[str, Any]] = {}
    for info in layers:
        if info.role is Role.HIDDEN:
            key = (info.role.value, info.norm_dim)
            options = dict(role="hidden", algorithm="swan", norm_dim=info.norm_dim, lr=lr,
                           weight_decay=weight_decay)
        else:
            key = (info.role.value, None)
            options = dict(role=info.role.value, algorithm="adamw", lr=alr,
                           weight_decay=weight_decay)
        if key not in groups:
            groups[key] = {"params": [], "param_names": [], **options}
        groups[key]["params"].append(info.param)
        groups[key]["param_names"].append(info.name)
    return list(groups.values())


def _validate(group: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first invalid hyperparameter of ``group``."""
    if not group["lr"] >= 0:
        raise ValueError(f"Invalid learning rate: lr={group['lr']} (must be >= 0)")
    validate_adamw_split(group, SWAN_ALGORITHMS)
    norm_dim = group["norm_dim"]
    if norm_dim is not None and (isinstance(norm_dim, bool) or norm_dim not in (0, 1)):
        raise ValueError(f"Invalid norm_dim: norm_dim={norm_dim!r} (must be 0, 1 or None)")
    ns_steps = group["ns_steps"]
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or ns_steps < 1:
        raise ValueError(f"Invalid ns_steps: ns_steps={ns_steps!r} (must be an int >= 1)")
    if not group["norm_eps"] > 0:
        raise ValueError(f"Invalid norm_eps: norm_eps={group['norm_eps']} (must be > 0)")
    if group["rms_scale"] not in (True, False):
        raise ValueError(f"Invalid rms_scale: rms_scale={group['rms_scale']!r} (True or False)")
    if group["foreach"] not in (None, True, False):
        raise ValueError(f"Invalid foreach: foreach={group['foreach']!r} (True, False or None)")
