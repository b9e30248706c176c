r"""Functional kernels of SWAN: GradNorm, GradWhitening (Newton–Schulz) and the matrix update.

SWAN (Ma, Gong, Scetbon, Meeds, "SWAN: SGD with Normalization and Whitening Enables Stateless
LLM Training", arXiv 2412.13148) preprocesses the gradient ``G`` (``m x n``) of a hidden matrix
with two stateless operators and takes an SGD step::

    GradNorm(G)      = (G - mean_row(G)) / max(std_row(G), norm_eps)    each row standardized
                                                                         across its n entries
    GradWhitening(G) = (G G^T)^(-1/2) G
    W <- W * (1 - lr * wd) - lr * s * GradWhitening(GradNorm(G))

``std_row`` is the population standard deviation (divide by n). ``s = sqrt(max(m, n))`` when
``rms_scale`` (the default in :class:`gradlens.optim.SWAN`), else 1: the whitened matrix has
every singular value 1, hence an entry RMS of ``1/sqrt(max(m, n))``; ``s`` makes that RMS 1, so
``lr`` is the RMS size of the step, as for SCALE and (roughly) Adam. The SWAN paper (arXiv 2412.13148) gives no
step scale; ``rms_scale=False`` is the bare formula.

What whitening computes. With the SVD ``G = U S V^T``, ``(G G^T)^(-1/2) G = U V^T`` (the
orthogonal polar factor, what Muon approximates); when ``m > n`` the ``m x m`` Gram ``G G^T`` is
singular, so the kernel whitens along the smaller dimension: it transposes, computes
``(G^T G)^(-1/2)`` on the ``n x n`` side, ``G (G^T G)^(-1/2) = U V^T`` again, and transposes
back. The Gram matrix is always ``min(m, n)`` square.

Pitfall: GradNorm centres every row, so ``G 1 = 0`` and ``rank(G) <= n - 1``. When ``m >= n``
(square attention projections, MLP up/gate ``(intermediate, d)``) the small-side Gram is
singular: the inverse square root is then the pseudo-inverse one (zero singular values stay
zero), which is what Newton–Schulz converges to and what the tests' eigendecomposition
reference uses.

Newton–Schulz (cubic; ``A`` is the ``min(m, n)``-square Gram of the current iterate)::

    X_0     = G / ||G G^T||_F^(1/2)          (G first divided by ||G||_F, for range safety)
    X_{k+1} = 1.5 X_k - 0.5 (X_k X_k^T) X_k

Every singular value ``s`` of ``X_0`` follows the scalar map ``f(s) = 1.5 s - 0.5 s^3``, which
drives any ``s`` in ``(0, sqrt(3))`` to 1 (quadratically near 1) and keeps 0 at 0, so ``X_k``
converges to ``U V^T``; this iteration equals the coupled Newton–Schulz iteration for
``(G G^T)^(-1/2)`` applied to ``G``. The normalization ``||G G^T||_F^(1/2) = (sum s^4)^(1/4)`` (the
Schatten-4 norm) bounds the spectral norm from above, so every ``s <= 1``: convergence is
guaranteed. It is tighter than the Frobenius norm by up to ``min(m, n)^(1/4)`` (a few free
iterations) and costs nothing: its Gram is the first iteration's.

Iteration count (default :data:`NS_STEPS` = 10). A singular value below ~0.5 grows by 1.5x per
iteration, so after k iterations the directions with ``s = sigma / ||G||_S4`` above a threshold
are whitened and the smaller ones only partly::

    k                      5      8      10     12     15     20
    1 - f^k(s) <= 1e-3     0.35   0.105  0.047  0.021  0.0062 0.0008   (smallest s)
    1 - f^k(s) <= 1e-6     0.50   0.16   0.072  0.032  0.0094 0.0012

At the default, a matrix whose nonzero singular values are all >= 0.072 ||G||_S4 (e.g. a
standardized Gaussian 256 x 688) is whitened to fp32 round-off (the tests assert 1e-5 against a
float64 eigendecomposition). Real LLM gradients have singular values spread over many decades
(llama-small at init, one batch of 256 tokens: down to ~1e-9 of the largest), so their tail is
not fully whitened by any practical count: a tail direction grows by at most 1.5^k (57x at
k = 10) instead of being raised to 1, which damps the noisiest directions. Raise ``ns_steps``
for a closer whitening, at a linear cost. Each iteration costs two matmuls of
``2 min(m,n)^2 max(m,n)`` flops each; 10 iterations on a 4096 x 11008 matrix are ~7.4 Tflop.

Precision: the whitening runs in ``promote(dtype, float32)`` (fp32 for bf16/fp16/fp32 gradients,
float64 for float64 ones, which the tests use) and the result is cast back to the parameter's
dtype.

Two paths compute the same numbers (a float64 test proves it): a per-tensor loop
(``foreach=False``) and a batched one (``foreach=True``) that stacks the gradients of equal
shape, standardizes and whitens each stack with batched matmuls, and applies the updates with
``torch._foreach_*`` ops. The batched path holds one stacked fp32 copy of each shape group's
gradients while it works.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor

from gradlens.optim.gate import gate_restore, gate_snapshot

__all__ = ["NORM_EPS", "NS_STEPS", "grad_norm", "grad_whitening", "swan_update"]

NS_STEPS = 10
"""Default number of Newton–Schulz iterations of :func:`grad_whitening`."""

NORM_EPS = 1e-8
"""Lower clamp of GradNorm's per-row standard deviation."""

_TINY = 1e-30  # floor of the whitening's normalizers: a zero gradient stays zero, no host sync


def grad_norm(g: Tensor, dim: int = -1, eps: float = NORM_EPS) -> Tensor:
    """GradNorm: ``(g - mean) / max(std, eps)`` along ``dim`` (population std), out of place.

    For an ``(out, in)`` weight ``dim=-1`` standardizes each output row across its fan-in. A
    constant or all-zero row becomes zero. Works on any leading batch dimensions.
    """
    centered = g - g.mean(dim=dim, keepdim=True)
    std = centered.square().mean(dim=dim, keepdim=True).sqrt_().clamp_min_(eps)
    return centered.div_(std)


def grad_whitening(g: Tensor, steps: int = NS_STEPS) -> Tensor:
    """GradWhitening ``(G G^T)^(-1/2) G`` by ``steps`` Newton–Schulz iterations (see the module).

    ``g`` is ``(..., m, n)``; leading dimensions are a batch. The result has the shape of ``g``
    and dtype ``promote(g.dtype, float32)``; ``g`` is not modified. The Gram matrix is taken on
    the smaller side (a transpose when ``m > n``).
    """
    if g.ndim < 2:
        raise ValueError(f"grad_whitening needs a matrix, got shape {tuple(g.shape)}")
    if steps < 0:
        raise ValueError(f"grad_whitening: steps={steps} (must be >= 0)")
    dtype = torch.promote_types(g.dtype, torch.float32)
    x = g.to(dtype)
    transpose = x.shape[-2] > x.shape[-1]
    if transpose:
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp_min(_TINY)
    gram = x @ x.mT
    s4 = torch.linalg.vector_norm(gram, dim=(-2, -1), keepdim=True).sqrt_().clamp_min_(_TINY)
    x = x / s4
    gram = gram.div_(s4).div_(s4)  # not s4**2, which underflows at the floor
    for i in range(steps):
        if i > 0:
            gram = x @ x.mT
        x = (gram @ x).mul_(-0.5).add_(x, alpha=1.5)
    return x.mT if transpose else x


def _preconditioned(
    g: Tensor, norm_dim: int | None, ns_steps: int, norm_eps: float, rms_scale: bool
) -> Tensor:
    """``s * GradWhitening(GradNorm(g))`` of a ``(..., m, n)`` matrix (or a stack of them)."""
    if norm_dim is not None:
        g = grad_norm(g.to(torch.promote_types(g.dtype, torch.float32)),
                      dim=norm_dim - 2, eps=norm_eps)
    u = grad_whitening(g, ns_steps)
    if rms_scale:
        u = u.mul_(math.sqrt(max(u.shape[-2], u.shape[-1])))
    return u


def swan_update(
    params: list[Tensor],
    grads: list[Tensor],
    *,
    lr: float,
    weight_decay: float,
    norm_dim: int | None,
    ns_steps: int,
    norm_eps: float,
    rms_scale: bool,
    foreach: bool,
    step_gate: Tensor | None = None,
) -> None:
    """Apply SWAN's stateless matrix update in place (formulas in the module docstring).

    Args:
        params, grads: same-length lists of matrices (ndim >= 2; ndim > 2 viewed as
            ``(size0, -1)``); all share the options below.
        lr: the current (scheduled) learning rate.
        weight_decay: decoupled decay, ``W <- W * (1 - lr * wd)``.
        norm_dim: axis GradNorm reduces over (1: each row of an ``(out, in)`` weight across
            its fan-in; 0: each column, for layouts stored ``(in, out)``); None skips GradNorm
            (whitening only, for ablations).
        ns_steps: Newton–Schulz iterations.
        norm_eps: lower clamp of GradNorm's standard deviation.
        rms_scale: multiply the whitened matrix by ``sqrt(max(m, n))`` (entry RMS 1).
        foreach: batched path (stacks of equal-shape gradients) instead of the per-tensor loop.
        step_gate: None, or a 0-d device tensor: where it is 0 the parameters are left
            bit-identical (see :mod:`gradlens.optim.gate`).
    """
    if not params:
        return
    snapshot = gate_snapshot(step_gate, params)
    _swan_step(params, grads, lr=lr, weight_decay=weight_decay, norm_dim=norm_dim,
               ns_steps=ns_steps, norm_eps=norm_eps, rms_scale=rms_scale, foreach=foreach)
    gate_restore(step_gate, snapshot, params)


def _swan_step(
    params: list[Tensor],
    grads: list[Tensor],
    *,
    lr: float,
    weight_decay: float,
    norm_dim: int | None,
    ns_steps: int,
    norm_eps: float,
    rms_scale: bool,
    foreach: bool,
) -> None:
    decay = 1.0 - lr * weight_decay
    if not foreach:
        for p, g in zip(params, grads, strict=True):
            u = _preconditioned(g.reshape(g.shape[0], -1), norm_dim, ns_steps, norm_eps,
                                rms_scale)
            if weight_decay != 0:
                p.mul_(decay)
            p.add_(u.view(p.shape).to(p.dtype), alpha=-lr)
        return
    buckets: dict[tuple[tuple[int, int], torch.dtype, torch.device], list[int]] = defaultdict(list)
    for i, g in enumerate(grads):
        buckets[((g.shape[0], g.numel() // g.shape[0]), g.dtype, g.device)].append(i)
    updates: list[Tensor] = list(params)  # placeholders, every one replaced below
    for (shape, _, _), idx in buckets.items():
        stack = torch.stack([grads[i].reshape(shape) for i in idx])
        u = _preconditioned(stack, norm_dim, ns_steps, norm_eps, rms_scale)
        for i, ui in zip(idx, u.unbind(0), strict=True):
            updates[i] = ui.view(params[i].shape).to(params[i].dtype)
    if weight_decay != 0:
        torch._foreach_mul_(params, decay)
    torch._foreach_add_(params, updates, alpha=-lr)
