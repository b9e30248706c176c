"""Functional kernels of SCALE: the normalized matrix update and the 1-D AdamW update.

Both kernels update tensors in place and hold no state of their own: the caller passes the
buffers. Each has two paths that compute the same numbers, a per-tensor for-loop
(``foreach=False``) and a batched path over the whole list with ``torch._foreach_*`` ops
(``foreach=True``); a float64 test proves them equal.

Normalized update (one output unit per row of an ``(out, in)`` weight when ``norm_dim=1``)::

    m  <- lerp(m, G, 1 - beta)                   only when beta > 0 (EMA, zero-initialised,
                                                 no bias correction); then U = m, else U = G
    r  =  sqrt(mean(U**2, dim=norm_dim)).clamp_min(1e-8)     one RMS per output unit
    W  <- W * (1 - lr * wd) - lr * U / r

1-D AdamW (``t`` counts this tensor's steps)::

    m  <- lerp(m, g, 1 - b1);   v <- lerp(v, g*g, 1 - b2)
    p  <- p * (1 - lr * wd) - lr * sqrt(1 - b2**t) / (1 - b1**t) * m / (sqrt(v) + eps)

Sharded tensors (FSDP2 ``fully_shard``, tensor parallelism: ``DTensor`` params and grads).
Every step of both kernels is elementwise except the per-unit RMS, so the kernels run on each
rank's local shard (``t.to_local()``; in-place updates land in the DTensor's storage) and only
the RMS communicates. With the tensor viewed as ``(size0, -1)`` and ``R`` the reduced axis
(``norm_dim``), for every mesh dimension whose placement shards ``R``::

    s_local = sum over the local part of R of u**2       (1, units_local) or (units_local, 1)
    s       = all_reduce(s_local, SUM, group of that mesh dimension)
    r       = sqrt(s / n_R).clamp_min(1e-8)              n_R: the *global* size of R

A mesh dimension that shards the unit axis needs nothing (each rank holds whole units), nor does
a ``Replicate`` one. FSDP2 shards dim 0: the embedding ``(vocab, d)`` normalized over dim 0 (one
scale per feature) communicates ``d`` floats per step; ``nn.Linear`` weights normalized over
dim 1 communicate nothing. The foreach path packs every sharded tensor of the list that needs it
into ONE all_reduce per (mesh, mesh dimension); the per-tensor loop does one per tensor. Pitfalls:
``Partial`` placements (an un-reduced gradient) are refused (the local values are not pieces of
the gradient); the mean divides by the global ``n_R``, never by the local extent (an uneven or
empty last shard would otherwise be over-weighted); every rank of the group must call the
kernel with the same list of sharded tensors (the all_reduce is collective).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gradlens.dtensor import is_dtensor, local_tensor
from gradlens.optim.gate import gate_restore, gate_snapshot

__all__ = ["RMS_FLOOR", "adamw_update", "clamped_unit_rms", "scale_update"]

RMS_FLOOR = 1e-8
"""Lower clamp of the per-unit RMS, as in the SCALE authors' code."""


def clamped_unit_rms(g: Tensor, norm_dim: int) -> Tensor:
    """SCALE's divisor, one RMS per output unit clamped at :data:`RMS_FLOOR`:
    ``sqrt(mean(g**2, dim=norm_dim, keepdim=True)).clamp_min(1e-8)``, keepdim.

    Not the statistic :func:`gradlens.stats.unit_rms` (no clamp, finite entries only, one
    value per unit).

    ``g`` is 2-D (callers view ndim > 2 tensors as ``(size0, -1)``). Computed as
    ``||g||_2 / sqrt(n)`` along ``norm_dim``, which makes no temporary the size of ``g``;
    except on the CPU across a strided axis (the embedding's ``dim=0``, GPT-2 ``Conv1D``),
    where ``vector_norm`` is ~12x slower than ``sum(g**2)`` (3 ms vs 0.25 ms for 4096 x 256,
    torch 2.13), so the sum of squares is taken directly.
    This is the only place that reduces over a unit. A ``DTensor`` ``g`` (FSDP2,
    tensor parallelism) gets the sharded path of the module docstring: the per-unit sum of
    squares of the local shard is all-reduced over the mesh dimensions that split
    ``norm_dim`` (a collective: every rank of those groups must call this) and divided by the
    full, unsharded ``n``; the result is a plain tensor shaped to broadcast against
    ``g.to_local()``.
    """
    if is_dtensor(g):
        return _rms_list([g.to_local()], norm_dim, [g])[0]
    n = g.shape[norm_dim]
    if g.device.type == "cpu" and g.stride(norm_dim) != 1:
        mean_sq = g.square().sum(dim=norm_dim, keepdim=True).div_(n)
        return mean_sq.sqrt_().clamp_min_(RMS_FLOOR)
    return (
        torch.linalg.vector_norm(g, dim=norm_dim, keepdim=True)
        .div_(math.sqrt(n))
        .clamp_min_(RMS_FLOOR)
    )


def _rms_for(u: Tensor, norm_dim: int, spec: Tensor | None = None) -> Tensor:
    """:func:`clamped_unit_rms` of ``u`` viewed as ``(size0, -1)``, shaped to broadcast against
    ``u``.

    ``spec``: the ``DTensor`` whose local shard ``u`` is (sharded path), or None.
    """
    if spec is not None:
        return _rms_list([u], norm_dim, [spec])[0]
    if u.ndim == 2:
        return clamped_unit_rms(u, norm_dim)
    r = clamped_unit_rms(u.reshape(u.shape[0], -1), norm_dim)
    return _unflatten_rms(r, u, norm_dim)


def _unflatten_rms(r: Tensor, u: Tensor, norm_dim: int) -> Tensor:
    """Shape the RMS of ``u.reshape(size0, -1)`` to broadcast against ``u`` (ndim >= 2)."""
    if u.ndim == 2:
        return r
    if norm_dim == 1:
        return r.view((u.shape[0],) + (1,) * (u.ndim - 1))
    return r.view((1, *u.shape[1:]))


# ----------------------------------------------------------------------------- sharded tensors


def _sharded_mesh_dims(spec: Any, norm_dim: int) -> list[int]:
    """Mesh dimensions whose placement splits the reduced axis of ``spec`` viewed as
    ``(size0, -1)`` (``norm_dim`` 0: tensor dim 0; 1: tensor dims 1..ndim-1)."""
    reduced = {0} if norm_dim == 0 else set(range(1, spec.ndim))
    dims = []
    for i, placement in enumerate(spec.placements):
        if placement.is_partial():
            raise ValueError(
                f"SCALE's per-unit RMS needs a reduced gradient, got a DTensor with placements "
                f"{tuple(spec.placements)} (Partial: each rank holds an un-summed term); "
                "redistribute it to Shard/Replicate before the optimizer step"
            )
        if placement.is_replicate():
            continue
        dim = getattr(placement, "dim", None)  # Shard and _StridedShard
        if dim is None:
            raise ValueError(f"unsupported DTensor placement {placement!r} in SCALE's RMS")
        if dim % spec.ndim in reduced:
            dims.append(i)
    return dims


def _reduced_numel(spec: Any, norm_dim: int) -> int:
    """Global number of entries per unit: the size of the reduced axis of ``(size0, -1)``."""
    shape = tuple(spec.shape)
    return shape[0] if norm_dim == 0 else math.prod(shape[1:])


def _sq_sum(u2d: Tensor, norm_dim: int) -> Tensor:
    """Per-unit sum of squares of a 2-D local shard, keepdim, float32 for 16-bit inputs."""
    acc = torch.float64 if u2d.dtype == torch.float64 else torch.float32
    if u2d.device.type == "cpu" and u2d.stride(norm_dim) != 1:
        return u2d.square().sum(dim=norm_dim, keepdim=True, dtype=acc)  # see clamped_unit_rms
    return torch.linalg.vector_norm(u2d, dim=norm_dim, keepdim=True, dtype=acc).square_()


def _rms_list(locals_: Sequence[Tensor], norm_dim: int,
              specs: Sequence[Any | None]) -> list[Tensor]:
    """Per-unit RMS of each local shard ``locals_[i]`` of the ``DTensor`` ``specs[i]`` (None: a
    plain tensor), shaped to broadcast against it, in its dtype.

    Shards whose reduced axis is split are all-reduced together: their per-unit partial sums
    of squares are concatenated into ONE flat tensor per (mesh, mesh dimension) and summed with
    one ``all_reduce`` on that mesh dimension's process group.
    """
    out: list[Tensor | None] = [None] * len(locals_)
    pending: dict[tuple[int, tuple[int, ...]], list[tuple[int, Tensor, Any]]] = {}
    for i, (u, spec) in enumerate(zip(locals_, specs, strict=True)):
        if spec is None:
            out[i] = _rms_for(u, norm_dim)
            continue
        u2d = u if u.ndim == 2 else u.reshape(u.shape[0], -1)
        sq = _sq_sum(u2d, norm_dim)
        dims = tuple(_sharded_mesh_dims(spec, norm_dim))
        if dims:
            pending.setdefault((id(spec.device_mesh), dims), []).append((i, sq, spec))
        else:
            out[i] = _finish_rms(sq, _reduced_numel(spec, norm_dim), u, norm_dim)
    for (_, dims), items in pending.items():
        mesh = items[0][2].device_mesh
        flat = torch.cat([sq.reshape(-1) for _, sq, _ in items])
        for d in dims:  # ONE collective per mesh dimension for the whole list
            torch.distributed.all_reduce(flat, group=mesh.get_group(d))
        pos = 0
        for i, sq, spec in items:
            m = sq.numel()
            total = flat[pos:pos + m].view(sq.shape)
            pos += m
            out[i] = _finish_rms(total, _reduced_numel(spec, norm_dim), locals_[i], norm_dim)
    return out  # type: ignore[return-value]


def _finish_rms(sq: Tensor, n: int, u: Tensor, norm_dim: int) -> Tensor:
    """``sqrt(sq / n).clamp_min(1e-8)`` in ``u``'s dtype, shaped to broadcast against ``u``."""
    r = sq.div(n).sqrt_().clamp_min_(RMS_FLOOR).to(u.dtype)
    return _unflatten_rms(r, u, norm_dim)


def _dtensor_specs(params: list[Tensor], grads: list[Tensor]) -> list[Any | None] | None:
    """None when no tensor is a ``DTensor``; else, per index, the ``DTensor`` gradient whose
    placements describe the param, grad and buffers (or None for a plain tensor)."""
    if not any(is_dtensor(g) or is_dtensor(p) for p, g in zip(params, grads, strict=True)):
        return None
    specs: list[Any | None] = []
    for p, g in zip(params, grads, strict=True):
        if is_dtensor(p) != is_dtensor(g):
            raise ValueError(
                "a parameter and its gradient must both be DTensors or both plain tensors, got "
                f"{type(p).__name__} and {type(g).__name__}"
            )
        if is_dtensor(g):
            if tuple(p.placements) != tuple(g.placements) or p.device_mesh != g.device_mesh:
                raise ValueError(
                    f"parameter placements {tuple(p.placements)} differ from its gradient's "
                    f"{tuple(g.placements)}: the elementwise update needs matching shards"
                )
            specs.append(g)
        else:
            specs.append(None)
    return specs


def scale_update(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    norm_dim: int | None,
    foreach: bool,
    step_gate: Tensor | None = None,
) -> None:
    """Apply SCALE's normalized update to matrices (ndim >= 2), in place.

    Args:
        params, grads: same-length lists; all share the options below.
        momentum_buffers: one zero-initialised EMA buffer per param when ``momentum > 0``,
            else ``None``.
        lr: the current (scheduled) learning rate.
        weight_decay: decoupled decay, ``W <- W * (1 - lr * wd)``.
        momentum: EMA coefficient beta; 0 means the raw gradient is normalized.
        norm_dim: axis reduced by the RMS (1: one scale per row of an ``(out, in)`` weight;
            0: one per column); ``None`` skips normalization (plain SGD, for ablations).
        foreach: batched ``torch._foreach_*`` path instead of the per-tensor loop.
        step_gate: None, or a 0-d device tensor: where it is 0 the step is undone (params and
            momentum buffers bit-identical), see :mod:`gradlens.optim.gate`.

    ``params``, ``grads`` and buffers may be ``DTensor`` shards (same placements for a param,
    its grad and its buffer): see the module docstring for what communicates.
    """
    if not params:
        return
    if momentum > 0 and momentum_buffers is None:
        raise ValueError("scale_update: momentum > 0 needs momentum_buffers")
    specs = _dtensor_specs(params, grads)
    if specs is not None:  # DTensors: elementwise math on local shards, see the module docstring
        params, grads = [local_tensor(p) for p in params], [local_tensor(g) for g in grads]
        if momentum_buffers is not None:
            momentum_buffers = [local_tensor(b) for b in momentum_buffers]
    written = (params, momentum_buffers or [])
    snapshot = gate_snapshot(step_gate, *written)
    _scale_step(params, grads, momentum_buffers, specs, lr=lr, weight_decay=weight_decay,
                momentum=momentum, norm_dim=norm_dim, foreach=foreach)
    gate_restore(step_gate, snapshot, *written)


def _scale_step(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    specs: list[Any | None] | None,
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    norm_dim: int | None,
    foreach: bool,
) -> None:
    decay = 1.0 - lr * weight_decay
    if foreach:
        if momentum > 0:
            torch._foreach_lerp_(momentum_buffers, grads, 1.0 - momentum)
            updates = momentum_buffers
        else:
            updates = grads
        if weight_decay != 0:
            torch._foreach_mul_(params, decay)
        if norm_dim is None:
            torch._foreach_add_(params, updates, alpha=-lr)
            return
        if specs is None:
            rms = [_rms_for(u, norm_dim) for u in updates]
        else:
            rms = _rms_list(updates, norm_dim, specs)  # one all_reduce for the whole list
        torch._foreach_addcdiv_(params, updates, rms, -lr)
        return
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        u = momentum_buffers[i].lerp_(g, 1.0 - momentum) if momentum > 0 else g
        if weight_decay != 0:
            p.mul_(decay)
        if norm_dim is None:
            p.add_(u, alpha=-lr)
        else:
            spec = specs[i] if specs is not None else None
            p.addcdiv_(u, _rms_for(u, norm_dim, spec), value=-lr)


def adamw_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    weight_decay: float,
    beta1: float,
    beta2: float,
    eps: float,
    foreach: bool,
    step_gate: Tensor | None = None,
) -> None:
    """AdamW as in the SCALE authors' code (used for 1-D parameters), in place.

    ``steps`` are per-parameter 0-d step counters (on the CPU, as in ``torch.optim``); each is
    incremented before use, so ``t = 1`` on a tensor's first step. ``eps`` is added to
    ``sqrt(v)`` before the bias correction, which is folded into the step size. ``lr`` is the
    current 1-D learning rate (SCALE passes ``lr_1d * lr_t / lr_peak``). ``DTensor`` shards
    are updated through their local tensors (every op here is elementwise: no communication).

    ``step_gate`` (a 0-d device tensor, see :mod:`gradlens.optim.gate`): the step is kept where
    it is nonzero and undone (params, moments and counters bit-identical) where it is 0. The
    counters must then live on the gate's device: the bias corrections are computed there from
    the tensor counter, in ``promote(dtype, float32)``, with the same operations as the
    host path (bit-identical to it on the CPU in float64), and nothing is read on the host.
    """
    if not params:
        return
    if _dtensor_specs(params, grads) is not None:  # elementwise: the local shards suffice
        params, grads = [local_tensor(p) for p in params], [local_tensor(g) for g in grads]
        exp_avgs = [local_tensor(m) for m in exp_avgs]
        exp_avg_sqs = [local_tensor(v) for v in exp_avg_sqs]
    snapshot = gate_snapshot(step_gate, params, exp_avgs, exp_avg_sqs, steps)
    decay = 1.0 - lr * weight_decay
    if foreach:
        torch._foreach_add_(steps, 1)
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_lerp_(exp_avg_sqs, torch._foreach_mul(grads, grads), 1.0 - beta2)
        if weight_decay != 0:
            torch._foreach_mul_(params, decay)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denom, eps)
        sizes = [_step_size(lr, beta1, beta2, step_count(t, p, step_gate))
                 for t, p in zip(steps, params, strict=True)]
        if step_gate is None:
            torch._foreach_addcdiv_(params, exp_avgs, denom, sizes)
        else:  # tensor step sizes: (size * m) / denom, the same rounding as addcdiv's value
            torch._foreach_addcdiv_(params, torch._foreach_mul(exp_avgs, sizes), denom)
    else:
        for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
            t += 1
            m.lerp_(g, 1.0 - beta1)
            v.lerp_(g * g, 1.0 - beta2)
            if weight_decay != 0:
                p.mul_(decay)
            size = _step_size(lr, beta1, beta2, step_count(t, p, step_gate))
            addcdiv_scaled_(p, m, v.sqrt().add_(eps), size)
    gate_restore(step_gate, snapshot, params, exp_avgs, exp_avg_sqs, steps)


def step_count(t: Tensor, p: Tensor, step_gate: Tensor | None) -> int | Tensor:
    """The step number ``t`` for bias corrections: a Python int read from the CPU counter
    (not a device sync) without a gate; with one, the device counter itself in
    ``promote(p.dtype, float32)`` (nothing read on the host)."""
    if step_gate is None:
        return int(t.item())  # CPU counter: no device sync
    return t.to(torch.promote_types(p.dtype, torch.float32))


def addcdiv_scaled_(p: Tensor, num: Tensor, den: Tensor, size: float | Tensor) -> None:
    """``p += size * num / den`` in place; a tensor ``size`` (gated steps) rounds like a float."""
    if isinstance(size, Tensor):
        p.addcdiv_(num * size, den)
    else:
        p.addcdiv_(num, den, value=size)


def sqrt(x: float | Tensor) -> float | Tensor:
    """``math.sqrt`` of a float, ``torch.sqrt`` of a tensor (host and gated scalar paths)."""
    return x.sqrt() if isinstance(x, Tensor) else math.sqrt(x)


def _step_size(lr: float, beta1: float, beta2: float, t: int | Tensor) -> float | Tensor:
    """Negative AdamW step size with both bias corrections: ``-lr * sqrt(1-b2^t) / (1-b1^t)``."""
    return -lr * sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
