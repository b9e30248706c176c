"""Coverage cells: module kinds beyond the matrix's families, each per-example and per-unit
number against the float64 brute force (rel 1e-5) or NaN with a validity event naming the
layer and saying why (``expect``: ``{(layer glob, stat): substring of the reason}``).
Traces and signals are differences of terms of size ``||G||^2``, and HF attention rounds
through float32 even in a float64 model: their error is relative to ``max(|value|, ||G||^2)``
(the matrix's ``floor=1.0``). Per-unit ratios are relative to their own value.

``measure(cell)`` (no assertion) gives a cell's max relative error and its NaN reasons:
``python -m tests.conformance.test_coverage`` prints the coverage table (docs/api.md) or a report.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings

import pytest
import torch

from tests.conformance import _models as M
from tests.conformance._harness import compare, full_reference, run_lens, validity, value
from tests.conformance._reference import Case, causal_shares, rel_err

PE = ("pe_trace", "pe_signal")
STATS = ("grad_norm_preclip", "twobatch_trace", "unit_nsr_median", "unit_nsr_mean", *PE)
NOT_A_KIND = "not a module kind with a per-example rule"
OVERRIDES = "overrides forward"
BUILT_INSIDE = "built inside the model"
TIED = "tied tensor"


def _ids(sizes, seq, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, M.VOCAB, (b, seq), generator=g) for b in sizes]


def _hf_causal(sizes, seq=8, seed=51):
    return [{"input_ids": x, "labels": x} for x in _ids(sizes, seq, seed)]


def _seq2seq(sizes, seed=52, src=7, tgt=5):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, M.VOCAB, (b, src), generator=g),
             "labels": torch.randint(3, M.VOCAB, (b, tgt), generator=g)} for b in sizes]


def _n(batch) -> int:
    return int((batch["input_ids"] if isinstance(batch, dict) else batch).shape[0])


def _pe(pattern: str, reason: str) -> dict:
    return {(pattern, s): reason for s in PE}


def _register_scaled():
    M.mup_example().register(replace=True)


def _no_ckpt(model, batch):
    """The reference's shadow runs without checkpointing (autograd.grad, which reentrant
    checkpointing refuses); the arithmetic is the same."""
    model.ckpt = False
    return M.token_shares(model, batch)


# name: (build, batches, shares, expected NaN, setup)
CELLS = {
    "t5": (M.t5, _seq2seq((3, 2)), M.seq2seq_shares,
           _pe("shared.weight", TIED) | _pe("*relative_attention_bias*", BUILT_INSIDE), None),
    "t5_T_eq_B": (M.t5, _seq2seq((4, 4), src=4, tgt=4), M.seq2seq_shares,
                  _pe("shared.weight", TIED) | _pe("*relative_attention_bias*", BUILT_INSIDE),
                  None),
    "bart": (M.bart, _seq2seq((3, 2)), M.seq2seq_shares,
             _pe("model.shared.weight", TIED) | _pe("*embed_positions*", OVERRIDES), None),
    "mixtral": (M.mixtral, _hf_causal((3, 3)), causal_shares,
                _pe("*experts*", NOT_A_KIND) | _pe("*mlp.gate*", NOT_A_KIND), None),
    "lora": (M.lora, _hf_causal((2, 3)), causal_shares, {}, None),
    "dora": (lambda: M.lora(dora=True), _hf_causal((2, 3)), causal_shares,
             _pe("*lora_magnitude_vector*", NOT_A_KIND), None),
    "nanogpt_T_eq_B": (M.NanoGPT, _ids((4, 4), 4, 53), M.token_shares,
                       _pe("wte.weight", TIED) | _pe("wpe.weight", BUILT_INSIDE)
                       | _pe("*ln_*", NOT_A_KIND), None),
    "nanogpt_T_ne_B": (M.NanoGPT, _ids((3, 2), 6, 54), M.token_shares,
                       _pe("wte.weight", TIED) | _pe("wpe.weight", BUILT_INSIDE)
                       | _pe("*ln_*", NOT_A_KIND), None),
    "linear_subclass": (lambda: M.TokenMLP(M.PlainLinear), _ids((3, 2), 6, 55), M.token_shares,
                        {}, None),
    "linear_named_Linear_forward": (lambda: M.TokenMLP(M.Linear), _ids((3, 2), 6, 56),
                                    M.token_shares, _pe("up.*", OVERRIDES), None),
    "linear_subclass_forward": (lambda: M.TokenMLP(M.mup_example().ScaledLinear), _ids((3, 2), 6, 56),
                                M.token_shares, _pe("up.*", OVERRIDES), None),
    "linear_subclass_registered": (lambda: M.TokenMLP(M.mup_example().ScaledLinear), _ids((3, 2), 6, 56),
                                   M.token_shares, {}, _register_scaled),
    "raw_f_linear": (lambda: M.TokenMLP(M.RawLinear), _ids((3, 2), 6, 57), M.token_shares,
                     _pe("up.w", NOT_A_KIND), None),
    "reentrant_checkpoint": (lambda: M.TokenMLP(ckpt=True), _ids((3, 2), 6, 58), _no_ckpt,
                             {}, None),
    "relu_one_microbatch": (lambda: M.TokenMLP(act="relu", d=6, seed=5), _ids((2, 2, 2), 3, 59),
                            M.token_shares, {}, None),
}


def _case(name: str) -> tuple[Case, dict]:
    build, batches, shares, expect, setup = CELLS[name]
    if setup is not None:
        setup()
    case = Case(build, batches, lambda m, b: M.token_shares(m, b).sum() if shares is _no_ckpt
                else shares(m, b).sum(), shares, _n)
    return case, expect


def _unregister() -> None:
    with contextlib.suppress(AttributeError):  # the unmodified package (a "before" table)
        M.mup_example().unregister()


@pytest.mark.parametrize("name", list(CELLS))
def test_cell(name):
    case, expect = _case(name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            df, events, lens = run_lens(case)
        ref = full_reference(case, lens)
    finally:
        _unregister()
    worst = compare(df, events, lens, ref, tol=1e-5, expect_nan=expect, optional_pe=(),
                    stats=STATS, floor=1.0, label=f"coverage {name}")
    # the cell is not vacuous: some per-example number was checked (or every layer has a
    # reason), and every NaN per-example layer has its own event naming it
    reasons = validity(events)
    for info in lens.layers:
        if math.isnan(value(df, info.name, "pe_trace")):
            assert ("per_example", info.name) in reasons, info.name
    assert worst["pe_trace"] > 0 or all(
        ("per_example", i.name) in reasons for i in lens.layers)


def test_compiled_in_place_unknown_batch_sizes():
    """``model.compile()`` in place: the size hooks stand aside while dynamo traces, so batch
    sizes are unknown; the per-example hooks run eagerly (``torch.compiler.disable``), so they
    see the model's inputs: every layer's numbers are right, the embedding's included."""
    torch._dynamo.reset()

    def build():
        model = M.TokenMLP()
        model.compile(backend="eager")
        return model

    case = Case(build, _ids((3, 2), 6, 60), lambda m, b: M.token_shares(m, b).sum(),
                M.token_shares, _n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df, events, lens = run_lens(case)
    ref = full_reference(case, lens, shadow=M.TokenMLP())
    compare(df, events, lens, ref, tol=1e-5, optional_pe=(), floor=1.0,
            stats=("grad_norm_preclip", *PE), label="coverage compiled in place")
    torch._dynamo.reset()


def measure(name: str) -> tuple[float, float, dict[str, int]]:
    """``(max rel err of per-example stats, of unit_nsr_*, {reason or 'no reason': layers})``
    over the layers with a number / NaN, without asserting (for before/after tables)."""
    case, _ = _case(name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            df, events, lens = run_lens(case)
        ref = full_reference(case, lens)
    finally:
        _unregister()
    reasons = validity(events)
    pe_err = unit_err = 0.0
    nans: dict[str, int] = {}
    tiny = 1e-9 * max(r["grad_norm_preclip"] for r in ref.values())
    for info in lens.layers:
        if ref[info.name]["grad_norm_preclip"] < tiny:
            continue  # zero in exact arithmetic (a key bias under softmax): rounding only
        for stat in ("pe_trace", "pe_signal", "unit_nsr_median", "unit_nsr_mean"):
            got, want = value(df, info.name, stat), ref[info.name][stat]
            if math.isnan(got):
                if stat == "pe_trace":
                    why = reasons.get(("per_example", info.name), "no reason")
                    nans[why[:60]] = nans.get(why[:60], 0) + 1
                continue
            if stat.startswith("pe_"):
                err = rel_err(got, want, ref[info.name]["grad_norm_preclip"] ** 2)
                pe_err = max(pe_err, err)
            else:
                unit_err = max(unit_err, rel_err(got, want))
    return pe_err, unit_err, nans


if __name__ == "__main__":
    torch.set_num_threads(1)
    for cell in sys.argv[1:] or list(CELLS):
        try:
            pe, unit, nans = measure(cell)
            print(f"{cell}\tpe {pe:.1e}\tunit {unit:.1e}\t{nans}", flush=True)
        except Exception as err:
            print(f"{cell}\terror: {type(err).__name__}: {str(err)[:100]}", flush=True)
