"""No host synchronization: every public statistic runs on the meta device (no data, so no
``.item()`` and no data-dependent shape can succeed, even inside C++ ops) and on real CPU data
with every python-level tensor -> host conversion patched to raise."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from gradlens import stats as S

Make = Callable[..., torch.Tensor]


def _state_then(fn):
    """Build a temporal state, update it twice, read it (the collector's use)."""
    def run(mk: Make, sketch: int | None):
        st = S.temporal_init(mk(6, 4), sketch_dim=sketch, seed=3)
        S.temporal_update_(st, mk(6, 4), "embedding", 0.9)
        return fn(st, mk)
    return run


def _zscore(mk: Make):
    x = mk(5)
    mean, var, count = S.zscore_init(x)
    for _ in range(3):
        z, flags, mean, var, count = S.zscore_update(x, mean, var, count)
    return z, flags, mean, var, count


CASES: dict[str, Callable[[Make], object]] = {
    "grad_summary": lambda mk: S.grad_summary(mk(5, 4)),
    "grad_summary_bf16": lambda mk: S.grad_summary(mk(5, 4, dtype=torch.bfloat16)),
    "grad_summaries": lambda mk: S.grad_summaries([mk(5, 4), mk(3), mk(2, 2, 2)]),
    "grad_summaries_foreach": lambda mk: S.grad_summaries([mk(5, 4), mk(3)], foreach=True),
    "finite_sq_norm": lambda mk: S.finite_sq_norm(mk(7)),
    "finite_max_abs": lambda mk: S.finite_max_abs(mk(7)),
    "finite_sum": lambda mk: S.finite_sum(mk(7)),
    "nonfinite_count": lambda mk: S.nonfinite_count(mk(7)),
    "unit_sq_norms": lambda mk: S.unit_sq_norms(mk(5, 4), "conv1d"),
    "unit_sq_norms_propagating": lambda mk: S.unit_sq_norms_propagating(mk(5, 4), "linear"),
    "grad_summaries_with_axes": lambda mk: S.grad_summaries_with_axes(
        [mk(5, 4), mk(3)], ["linear", None]),
    "summary_and_axis_sq_norms": lambda mk: S.summary_and_axis_sq_norms(mk(5, 4), "linear"),
    "unit_rms": lambda mk: S.unit_rms(mk(5, 4), "embedding"),
    "fan_rms": lambda mk: S.fan_rms(mk(5, 2, 2), "other"),
    "spread": lambda mk: S.spread(mk(9)),
    "sort_rows": lambda mk: S.sort_rows(mk(3, 9)),
    "spread_batched": lambda mk: S.spread_batched([mk(9), mk(3), mk(1)]),
    "log_histogram": lambda mk: S.log_histogram(mk(9), bins=4),
    "histogram_moments": lambda mk: S.histogram_moments(mk(9)),
    "log_histograms": lambda mk: S.log_histograms([mk(9), mk(4), mk(9)], bins=4),
    "histograms_moments": lambda mk: S.histograms_moments([mk(9), mk(4)]),
    "token_grams": lambda mk: S.token_grams(mk(2, 3, 4)),
    "pe_linear_shared_gram": lambda mk: S.per_example_sq_norms_linear(
        mk(2, 3, 4), mk(2, 3, 5), a_gram=S.token_grams(mk(2, 3, 4))),
    "pe_linear_gram": lambda mk: S.per_example_sq_norms_linear(mk(2, 3, 4), mk(2, 3, 5),
                                                               "gram", max_chunk_elems=10),
    "pe_linear_direct": lambda mk: S.per_example_sq_norms_linear(mk(2, 3, 4), mk(2, 3, 5),
                                                                 "direct", max_chunk_elems=10),
    "pe_linear_2d": lambda mk: S.per_example_sq_norms_linear(mk(2, 4), mk(2, 5)),
    "pe_bias": lambda mk: S.per_example_sq_norms_bias(mk(2, 3, 5)),
    "pe_bias_masked": lambda mk: S.per_example_sq_norms_bias(
        mk(2, 3, 5), token_mask=mk(2, 3, dtype=torch.bool)),
    "pe_norm_gain": lambda mk: S.per_example_sq_norms_norm_gain(
        mk(2, 3, 5), mk(2, 3, 5), token_mask=mk(2, 3, dtype=torch.bool)),
    "pe_norm_gain_grads": lambda mk: S.per_example_grads_norm_gain(mk(2, 5), mk(2, 5)),
    "normalized_input_layer_norm": lambda mk: S.normalized_input(nn.LayerNorm(5), mk(2, 3, 5)),
    "normalized_input_rms_norm": lambda mk: S.normalized_input(nn.RMSNorm(5), mk(2, 3, 5)),
    "normalized_input_hf_rms_norm": lambda mk: S.normalized_input(
        LlamaRMSNorm(5), mk(2, 3, 5, dtype=torch.bfloat16)),
    "pe_embedding_gram": lambda mk: S.per_example_sq_norms_embedding(
        mk(2, 3, dtype=torch.long), mk(2, 3, 5), "gram", padding_idx=0),
    "pe_embedding_direct": lambda mk: S.per_example_sq_norms_embedding(
        mk(2, 3, dtype=torch.long), mk(2, 3, 5), "direct"),
    "within_batch_trace": lambda mk: S.within_batch_trace(mk(4), mk(()), 4),
    "two_batch": lambda mk: S.two_batch_estimates(mk(3), mk(3), 2, 8),
    "two_batch_unit": lambda mk: S.two_batch_unit_estimates(mk(6), mk(6), 2, 8),
    "unit_noise_to_signal": lambda mk: S.unit_noise_to_signal(mk(6), mk(6), 2, 8),
    "ema": lambda mk: S.ema_debiased(*S.ema_update(mk(3), mk(3), mk(()), 0.9), 0.9),
    "ema_ratio": lambda mk: S.ema_ratio_update(mk(3), mk(3), mk(3), mk(3), mk(()), 0.9),
    "sketch": lambda mk: S.sketch_apply(mk(50), 8, 1, chunk=16),
    "temporal": lambda mk: _state_then(lambda st, mk: S.temporal_readout(st))(mk, None),
    "temporal_sketch": lambda mk: _state_then(
        lambda st, mk: S.temporal_step(st, mk(6, 4), "embedding", 0.9))(mk, 8),
    "zscore": _zscore,
    "max_ratio": lambda mk: S.max_ratio_update(mk(3), S.max_ratio_init(mk(3))),
    "spam_fraction": lambda mk: S.spam_fraction(mk(5, 4), mk(5, 4)),
    "spam_fractions": lambda mk: S.spam_fractions([mk(5, 4), mk(3)], [mk(5, 4), mk(3)]),
    "attribute_spike": lambda mk: S.attribute_spike(mk((), dtype=torch.bool), mk(5), 3),
}


def make_meta(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype)


def make_real(*shape, dtype=torch.float32) -> torch.Tensor:
    if len(shape) == 1 and isinstance(shape[0], tuple):
        shape = shape[0]
    if dtype == torch.long:
        return torch.randint(0, 3, shape)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    x = torch.rand(shape).to(dtype) + 0.1
    if x.numel() > 3:
        x.view(-1)[1] = float("nan")  # the non-finite paths run too
    return x


def shapes(out) -> list:
    if torch.is_tensor(out):
        return [(tuple(out.shape), out.dtype)]
    if isinstance(out, (tuple, list)):
        return [s for o in out for s in shapes(o)]
    return []


def _raise(*args, **kwargs):
    raise AssertionError("host synchronization: a tensor was converted to a python value")


@contextlib.contextmanager
def no_host_conversion(monkeypatch: pytest.MonkeyPatch):
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__",
                     "__index__", "__complex__", "__array__"):
            m.setattr(torch.Tensor, name, _raise)
        yield


@pytest.mark.parametrize("name", list(CASES))
def test_runs_on_meta_with_the_same_shapes(name):
    meta = CASES[name](make_meta)
    torch.manual_seed(0)
    real = CASES[name](make_real)
    assert shapes(meta) == shapes(real) and shapes(real)
    assert all(t.device.type == "meta" for t in (meta if isinstance(meta, tuple) else [meta])
               if torch.is_tensor(t))


@pytest.mark.parametrize("name", list(CASES))
def test_no_python_conversion_on_real_data(name, monkeypatch):
    torch.manual_seed(0)
    with no_host_conversion(monkeypatch):
        CASES[name](make_real)


def test_the_guards_do_catch_syncs(monkeypatch):
    x = torch.rand(4)
    with no_host_conversion(monkeypatch), pytest.raises(AssertionError, match="host"):
        float(x.sum())
    with no_host_conversion(monkeypatch), pytest.raises(AssertionError, match="host"):
        if x.sum() > 0:
            pass
    m = make_meta(4)
    with pytest.raises(Exception):  # noqa: B017 - whatever meta raises
        m.sum().item()
    with pytest.raises(Exception):  # noqa: B017
        torch.nonzero(m)
    with pytest.raises(Exception):  # noqa: B017
        m[m > 0]
