"""Per-example squared gradient norms of 1-D parameters: norm gains and biases.

Notation as in :mod:`gradlens.stats.variance`: example ``b`` has tokens ``t``, the module's
output gradient is ``d_bt`` (the gradient of the loss w.r.t. the module output, ``(F,)``).

- **Norm gain** ``w`` of an RMSNorm / LayerNorm, ``y = w * x_hat (+ beta)``: the gradient of
  example ``b``'s loss is ``g_b = sum_t d_bt * x_hat_bt`` (elementwise product), where
  ``x_hat`` is the normalized input *before* the gain (:func:`normalized_input` computes it
  from the module's input exactly as the module's forward does).
- **Bias** (LayerNorm bias, ``Linear`` bias, GPT-2 ``Conv1D`` bias): ``g_b = sum_t d_bt``
  (:func:`gradlens.stats.per_example.per_example_sq_norms_bias`).

Both need only ``O(B x F)`` extra memory beyond one temporary of the inputs' size: the
per-example gradient of a vector parameter is itself a vector, so it is formed (``(B, F)``)
and squared.

Padding: with labels ``-100`` (ignored by the cross-entropy), padded tokens receive a zero
output gradient and drop out of every sum by themselves; no mask is needed. ``token_mask``
(``(B, ...)`` of 0/1 or bool, 1 = keep) is for losses that do not zero them.

Scaling pitfalls are those of :func:`gradlens.stats.per_example.per_example_sq_norms_linear`:
``d`` carries the loss reduction (``1/B`` for a mean over examples, ``1/N`` for a mean over
tokens, ``1/K`` with ``K`` accumulated micro-batches, the loss scale under AMP); multiply the
squared norms by the square of the undoing factor.

Pure and host-sync free: the module kind is read from the Python object, never from data.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from gradlens.stats.norms import accumulation_dtype

__all__ = [
    "NORM_KINDS",
    "has_llama_rms_forward",
    "norm_kind",
    "normalized_input",
    "per_example_grads_norm_gain",
    "per_example_sq_norms_norm_gain",
]

@functools.cache
def has_llama_rms_forward(cls: type) -> bool:
    """Whether a transformers class's ``forward`` is ``LlamaRMSNorm.forward``, source for source
    (the copies in Qwen2/3, Qwen2/3-MoE, Mistral, Mixtral, Phi3, Granite, DeepSeek-V3, ...;
    Gemma's ``1 + w`` and OLMo2's gain-before-cast differ, and are not)."""
    if not cls.__module__.startswith("transformers."):
        return False
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        return inspect.getsource(cls.forward) == inspect.getsource(LlamaRMSNorm.forward)
    except (ImportError, OSError, TypeError):
        return False


#: The module kinds :func:`normalized_input` understands.
NORM_KINDS = ("hf_rms_norm", "t5_rms_norm", "rms_norm", "layer_norm")


def norm_kind(module: nn.Module) -> str | None:
    """``"hf_rms_norm"`` (HF ``LlamaRMSNorm`` and its copies), ``"t5_rms_norm"``, ``"rms_norm"``
    (``torch.nn.RMSNorm``), ``"layer_norm"`` (``torch.nn.LayerNorm``, also GPT-2's), or None."""
    if isinstance(module, nn.LayerNorm):
        return "layer_norm"
    if isinstance(module, nn.RMSNorm):
        return "rms_norm"
    if hasattr(module, "variance_epsilon") and has_llama_rms_forward(type(module)):
        return "hf_rms_norm"
    if type(module).__name__ == "T5LayerNorm" and hasattr(module, "variance_epsilon"):
        return "t5_rms_norm"
    return None


def normalized_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``x_hat``, the normalized input the gain multiplies, from the module's input ``x``.

    - HF ``LlamaRMSNorm`` (Qwen2, Mistral, ... the same forward): ``h = x.float();
      x_hat = (h * rsqrt(mean(h**2, -1) + eps)).to(x.dtype)``, eps = ``variance_epsilon``.
      The normalization runs in float32 even for a float64 input, and the cast back to the
      input dtype happens *before* the gain: both are reproduced, so ``x_hat`` is bit-equal
      to what the gain sees.
    - HF ``T5LayerNorm`` (no mean, no bias): the mean square in float32, ``x_hat = x *
      rsqrt(ms + eps)`` in the promoted dtype, cast to the weight's dtype when that is 16-bit.
    - ``torch.nn.RMSNorm``: ``x * rsqrt(mean(x**2) + eps)`` over ``normalized_shape``;
      ``eps=None`` means ``torch.finfo(x.dtype).eps``, as torch does.
    - ``torch.nn.LayerNorm``: ``(x - mean) / sqrt(var + eps)`` over ``normalized_shape``,
      biased variance (divide by ``F``), eps inside the square root.

    Returns None for any other module (a Gemma-style ``1 + w`` gain, a custom norm): the
    caller should then skip the layer rather than guess. Computed in the accumulation dtype
    (float32; float64 for float64 inputs) except for the HF cast above; no grad is recorded.
    """
    kind = norm_kind(module)
    if kind is None:
        return None
    with torch.no_grad():
        if kind == "hf_rms_norm":
            h = x.to(torch.float32)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
            return h.to(x.dtype)
        if kind == "t5_rms_norm":
            ms = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
            h = x * torch.rsqrt(ms + module.variance_epsilon)
            w = module.weight.dtype
            return h.to(w) if w in (torch.float16, torch.bfloat16) else h
        shape = tuple(module.normalized_shape)
        dims = tuple(range(-len(shape), 0))
        h = x.to(accumulation_dtype(x.dtype))
        if kind == "rms_norm":
            eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
            return h * torch.rsqrt(h.pow(2).mean(dims, keepdim=True) + eps)
        mean = h.mean(dims, keepdim=True)
        var = (h - mean).pow(2).mean(dims, keepdim=True)
        return (h - mean) * torch.rsqrt(var + module.eps)


def _masked(d: torch.Tensor, token_mask: torch.Tensor | None, feature_ndim: int) -> torch.Tensor:
    if token_mask is None:
        return d
    if tuple(token_mask.shape) != tuple(d.shape[: d.ndim - feature_ndim]):
        raise ValueError(f"token_mask must have the token shape {tuple(d.shape[:-feature_ndim])} "
                         f"of d, got {tuple(token_mask.shape)}")
    return d * token_mask.reshape(*token_mask.shape, *([1] * feature_ndim)).to(d.dtype)


def per_example_grads_norm_gain(
    x_hat: torch.Tensor,
    d: torch.Tensor,
    *,
    token_mask: torch.Tensor | None = None,
    feature_ndim: int = 1,
) -> torch.Tensor:
    """Per-example gradients of a norm gain, ``g_b = sum_t d_bt * x_hat_bt``: ``(B, F)``.

    Args:
        x_hat: normalized inputs before the gain (:func:`normalized_input`), ``(B, T, F)``,
            ``(B, F)`` or ``(B, ..., F)`` (middle dims are tokens).
        d: output gradients of the module, same shape.
        token_mask: optional ``(B, ...)`` keep-mask over tokens (see the module docstring).
        feature_ndim: trailing dims that are features (``len(normalized_shape)``); the
            result is then ``(B, prod(features))``.

    Accumulates in float32 (float64 when either input is float64).
    """
    if x_hat.shape != d.shape or x_hat.ndim < feature_ndim + 1:
        raise ValueError("per-example norm-gain gradients need x_hat and d of one shape "
                         f"(B, ..., F), got {tuple(x_hat.shape)} and {tuple(d.shape)}")
    acc = torch.promote_types(accumulation_dtype(x_hat.dtype), accumulation_dtype(d.dtype))
    d = _masked(d, token_mask, feature_ndim)
    B = x_hat.shape[0]
    features = x_hat.shape[x_hat.ndim - feature_ndim:].numel()
    a3 = x_hat.reshape(B, -1, features).to(acc)
    d3 = d.reshape(B, -1, features).to(acc)
    return (a3 * d3).sum(dim=1)


def per_example_sq_norms_norm_gain(
    x_hat: torch.Tensor,
    d: torch.Tensor,
    *,
    token_mask: torch.Tensor | None = None,
    feature_ndim: int = 1,
) -> torch.Tensor:
    """Per-example squared norms of a norm-gain gradient, ``||sum_t d_bt * x_hat_bt||**2``:
    ``(B,)``.

    ``y = w * x_hat`` gives ``dL_b/dw = sum_t d_bt * x_hat_bt`` (the same for LayerNorm, whose
    bias does not enter it). Arguments as :func:`per_example_grads_norm_gain`; cost
    ``O(B T F)``, memory ``O(B F)``. An example holding NaN/Inf gets a non-finite entry (only
    that example). Mind the loss-reduction scaling (module docstring).
    """
    return per_example_grads_norm_gain(x_hat, d, token_mask=token_mask,
                                       feature_ndim=feature_ndim).square().sum(dim=-1)
