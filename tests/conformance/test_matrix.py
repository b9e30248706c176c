"""The conformance matrix: conditions x estimators, each cell against an independent float64
reference (``_reference``: per-micro-batch and per-example backward passes on a shadow copy).

Tolerances: rel 1e-5 where the lens runs in float64 (HF's loss upcasts logits to float32, so
the float64 cells agree to ~1e-7, not 1e-14); 1e-3 under bf16 autocast against a reference
that replays the same bf16 micro-batch gradients (see ``test_bf16_autocast``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradlens import GradLens
from gradlens.data import build_llama
from tests.conformance._harness import (
    check_counts,
    compare,
    full_reference,
    run_lens,
    value,
)
from tests.conformance._reference import ESTIMATORS, Case, causal_shares, hf_loss, mlm_shares

VOCAB = 128
TWO_BATCH = ("twobatch_trace", "twobatch_signal", "unit_nsr_median")
PER_EXAMPLE = ("pe_trace", "pe_signal")
SINGLE = {("*", s): "" for s in TWO_BATCH}  # one micro-batch: NaN, nothing is wrong


def token_batches(sizes, seed=0, seq=10, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in sizes:
        ids = torch.randint(0, vocab, (b, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def n_examples(batch) -> int:
    return int(batch["input_ids"].shape[0])


def llama_case(sizes, seed=0, reduction="mean", **cfg) -> Case:
    return Case(lambda: build_llama("tiny", seed=seed, **cfg), token_batches(sizes, seed),
                hf_loss, causal_shares, n_examples, reduction)


def clip_norm(max_norm):
    return lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm)


def clip_value(v):
    return lambda m: torch.nn.utils.clip_grad_value_(m.parameters(), v)


# ----------------------------------------------------------------------- micro-batches x edits

SIZES = [(8,), (4, 4), (4, 2), (3, 3, 3), (3, 1, 2)]


@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("edit", ["none", "norm_clip", "value_clip"])
@pytest.mark.parametrize("reduction", ["mean", "global_mean"])
def test_microbatches_and_clipping(sizes, edit, reduction):
    """1, 2 and 3 micro-batches, even and uneven, both loss conventions; norm clipping is
    corrected exactly, value clipping makes every variance estimator NaN with a reason."""
    if reduction == "global_mean" and edit == "value_clip":
        pytest.skip("covered by the mean convention")
    case = llama_case(sizes, reduction=reduction)
    clip = 0.05 if edit == "norm_clip" else None
    fn = {"none": None, "norm_clip": clip_norm(0.05), "value_clip": clip_value(1e-3)}[edit]
    df, events, lens = run_lens(case, edit=fn)
    check_counts(df, case)
    ref = full_reference(case, lens, clip=clip)
    expect = dict(SINGLE) if len(sizes) == 1 else {}
    stats = ESTIMATORS
    if edit == "value_clip":
        expect.update({("*", s): "" if len(sizes) == 1 and s in TWO_BATCH
                       else "not one common factor" for s in TWO_BATCH + PER_EXAMPLE})
        stats = ("grad_norm_preclip", *TWO_BATCH, *PER_EXAMPLE)
        # grad_norm describes the value-clipped gradient: against the edited p.grad itself
        for info in lens.layers:
            assert value(df, info.name, "grad_norm") == pytest.approx(
                float(info.param.grad.double().norm()), rel=1e-6)
    compare(df, events, lens, ref, tol=1e-5, expect_nan=expect, stats=stats,
            label=f"llama micro={sizes} {edit} {reduction}")
    if edit != "value_clip":
        assert not [e for e in events if e.kind == "validity"]


# ----------------------------------------------------------------------- GradScaler and AMP


def _scaler_step(model, opt, scaler, case, inf_layer=None):
    handle = None
    if inf_layer is not None:  # an overflow in backward, as fp16 would produce
        handle = inf_layer.register_hook(lambda g: g * math.inf)
    for batch in case.batches:
        scaler.scale(case.loss(model, batch) / len(case.batches)).backward()
    if handle is not None:
        handle.remove()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


@pytest.mark.parametrize("overflow", [False, True])
def test_grad_scaler(overflow):
    """GradScaler (CPU, float64 model, init scale 2**10) with unscale_ + norm clipping: the
    estimators describe the raw unscaled gradient. With an overflow the step is a
    ``skipped_step`` event that never enters a detector, and the next step (scale halved,
    weights unchanged) is right."""
    case = llama_case((4, 2), seed=3)
    model = case.build().double()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    lens = GradLens(model, opt, preset="full", scaler=scaler, noise_ema=0.0)
    steps = 2 if overflow else 1
    for s in range(steps):
        inf = model.model.layers[0].mlp.up_proj.weight if overflow and s == 0 else None
        _scaler_step(model, opt, scaler, case, inf_layer=inf)
    lens.flush()
    df, events = lens.memory.frame(), list(lens.memory.events)
    spikes = lens.family("spikes").state
    lens.close()
    ref = full_reference(case, lens, clip=0.05)
    last = df[df.step == steps]
    compare(last, events, lens, ref, tol=1e-5, label=f"grad_scaler overflow={overflow}")
    check_counts(last, case)
    skipped = [e for e in events if e.kind == "skipped_step"]
    if overflow:
        assert [e.step for e in skipped] == [1]
        assert scaler.get_scale() == 2.0**9
        counts = [v for k, v in spikes.items() if k.endswith("_count")]
        assert counts and all(float(c.max()) == 1.0 for c in counts)  # step 2 only
    else:
        assert not skipped
    assert not [e for e in events if e.kind == "validity"]


def test_bf16_autocast():
    """bf16 autocast (float32 master weights). Reference: the same step replayed under
    autocast on a shadow copy, one backward per micro-batch and per example, estimators in
    float64 from those gradients: the lens's arithmetic is checked at 1e-3 (the per-micro-batch
    gradients replay to ~1e-7; the per-example ones differ by the replay's own bf16 rounding
    of each example's weight gradient, ~5e-4). The float64 gradient (no autocast) is a second,
    looser reference (2e-2): bf16 rounding moves the norms by ~0.2% and the traces by ~0.4%."""
    case = llama_case((4, 4), seed=4)
    df, events, lens = run_lens(case, dtype=torch.float32, autocast=torch.bfloat16)
    check_counts(df, case)

    def bf16_shares(model, batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return causal_shares(model, batch)

    layers = [(i.name, i.layout) for i in lens.layers]
    from tests.conformance._reference import reference

    amp_ref = reference(Case(case.build, case.batches, case.loss, bf16_shares, n_examples),
                        layers, shadow=case.build().float(), keep_dtype=True)
    # signals are differences (y - c tr): their error is measured against max(|value|, y)
    compare(df, events, lens, amp_ref, tol=1e-3, floor=1.0, label="bf16 autocast vs bf16 replay")
    exact = full_reference(case, lens)
    compare(df, events, lens, exact, tol=2e-2, floor=1.0,
            stats=("grad_norm", "grad_norm_preclip", "twobatch_trace", "pe_trace"),
            label="bf16 autocast vs float64")


# ----------------------------------------------------------------------- wrappers and layouts


class Wrapper(nn.Module):
    """A plain wrapper whose forward calls the inner model (as training frameworks do)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **batch):
        return self.inner(**batch)


@pytest.mark.parametrize("lens_on", ["wrapper", "inner"])
def test_wrapped_model_dict_batch(lens_on):
    """A wrapper around the model, batches as dicts (``model(**batch)``); the lens given the
    wrapper (names prefixed ``inner.``) or the inner model."""
    base = llama_case((3, 2), seed=5)
    case = Case(lambda: Wrapper(base.build()), base.batches, hf_loss,
                lambda m, b: causal_shares(m.inner, b), n_examples)
    model = case.build().double()
    target = model if lens_on == "wrapper" else model.inner
    df, events, lens = run_lens(case, model=model, target=target, edit=clip_norm(0.1))
    check_counts(df, case)
    if lens_on == "inner":
        case = base  # the same initialization, names without the wrapper's prefix
    ref = full_reference(case, lens, clip=0.1)
    compare(df, events, lens, ref, tol=1e-5, label=f"wrapped ({lens_on})")
    prefix = "inner." if lens_on == "wrapper" else "model."
    assert all(i.name.startswith(prefix) or i.name.startswith("inner.lm_head")
               or i.name == "lm_head.weight" for i in lens.layers)


class SeqFirst(nn.Module):
    """A small sequence-first LM: (T, B) ids, an embedding, a GRU-free MLP and a head."""

    def __init__(self, vocab: int = 40, d: int = 12) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.emb = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)  # (T, B, d)
        h = h + self.down(torch.tanh(self.up(self.norm(h))))
        return self.head(h)  # (T, B, vocab)


def seq_first_shares(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids)
    tok = nn.functional.cross_entropy(logits[:-1].permute(1, 2, 0), ids[1:].T, reduction="none")
    return tok.sum(1) / tok.numel()


@pytest.mark.parametrize("sizes", [(4, 4), (5, 2, 3)], ids=lambda s: "x".join(map(str, s)))
def test_sequence_first(sizes):
    """A (T, B) model with ``batch_dim=1``: micro-batch sizes, two-batch and per-example."""
    g = torch.Generator().manual_seed(8)
    batches = [torch.randint(0, 40, (9, b), generator=g) for b in sizes]
    case = Case(SeqFirst, batches, lambda m, ids: seq_first_shares(m, ids).sum(),
                seq_first_shares, lambda ids: int(ids.shape[1]), options={"batch_dim": 1})
    df, events, lens = run_lens(case, edit=clip_norm(0.5))
    check_counts(df, case)
    ref = full_reference(case, lens, clip=0.5)
    compare(df, events, lens, ref, tol=1e-5, label=f"sequence-first {sizes}",
            expect_nan={})


# ----------------------------------------------------------------------- model families


def _gpt2(tied: bool = True):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(11)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2,
                                      n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, tie_word_embeddings=tied))


def _gqa(kind: str):
    import transformers as tf

    torch.manual_seed(12)
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
               tie_word_embeddings=False)
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**cfg))
    return tf.MistralForCausalLM(tf.MistralConfig(sliding_window=None, **cfg))


def _bert():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(13)
    return BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=48,
                                      max_position_embeddings=32, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0))


def _with_positions(batches):
    """Position ids passed expanded to ``(B, T)``: every example has its own lookup."""
    out = []
    for b in batches:
        B, T = b["input_ids"].shape
        out.append({**b, "position_ids": torch.arange(T).expand(B, -1)})
    return out


def _mlm_batches(sizes, seed=14, seq=12):
    """Masked-LM batches: 30% of tokens masked (labels -100 elsewhere), ragged padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in sizes:
        ids = torch.randint(5, VOCAB, (b, seq), generator=g)
        lengths = torch.randint(seq // 2, seq + 1, (b,), generator=g)
        mask = torch.arange(seq)[None] < lengths[:, None]
        picked = (torch.rand(b, seq, generator=g) < 0.3) & mask
        picked[:, 0] = True
        labels = torch.where(picked, ids, torch.full_like(ids, -100))
        inputs = torch.where(picked, torch.full_like(ids, 4), ids)  # [MASK] = 4
        inputs = torch.where(mask, inputs, torch.zeros_like(ids))  # [PAD] = 0
        out.append({"input_ids": inputs, "attention_mask": mask.long(), "labels": labels})
    return out


TIED = "this tensor is tied"  # not reached yet: see the report (tied tensors are NaN silently)

FAMILIES = {
    # name: (build, batches, shares, expected NaN {(layer glob, stat): reason substring})
    "gpt2": (_gpt2, token_batches((3, 2)), causal_shares,
             {("transformer.wpe.weight", s): "built inside the model" for s in PER_EXAMPLE}
             | {("transformer.wte.weight", s): "tied tensor" for s in PER_EXAMPLE}),
    "gpt2_positions": (_gpt2, _with_positions(token_batches((3, 2))), causal_shares,
                       {("transformer.wte.weight", s): "tied tensor" for s in PER_EXAMPLE}),
    "gpt2_untied": (lambda: _gpt2(tied=False), _with_positions(token_batches((2, 2, 1))),
                    causal_shares, {}),
    "bert_mlm": (_bert, _mlm_batches((3, 3)), mlm_shares,
                 {("bert.embeddings.position_embeddings.weight", s): "built inside the model"
                  for s in PER_EXAMPLE}
                 | {("bert.embeddings.word_embeddings.weight", s): "tied tensor" for s in PER_EXAMPLE}),
    "qwen2_gqa": (lambda: _gqa("qwen2"), token_batches((3, 2)), causal_shares, {}),
    "mistral_gqa": (lambda: _gqa("mistral"), token_batches((2, 2)), causal_shares, {}),
    "llama_tied": (lambda: build_llama("tiny", seed=15, tie_word_embeddings=True),
                   token_batches((3, 2)), causal_shares,
                   {("model.embed_tokens.weight", s): "tied tensor" for s in PER_EXAMPLE}),
    "llama_untied": (lambda: build_llama("tiny", seed=15), token_batches((2, 3)),
                     causal_shares, {}),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_model_families(family):
    """GPT-2 (Conv1D, tied wte/lm_head, wpe broadcast or expanded positions), BERT MLM
    (labels -100 on unmasked tokens, ragged padding), Qwen2 and Mistral (GQA), LLaMA tied and
    untied: under norm clipping, against the reference."""
    build, batches, shares, expect = FAMILIES[family]
    # the loop's loss is the float64 sum of the shares (HF's own loss upcasts the logits to
    # float32 only, whose rounding the signal's cancellation would amplify past 1e-5)
    case = Case(build, batches, lambda m, b: shares(m, b).sum(), shares, n_examples)
    df, events, lens = run_lens(case, edit=clip_norm(0.2))
    check_counts(df, case)
    ref = full_reference(case, lens, clip=0.2)
    compare(df, events, lens, ref, tol=1e-5, expect_nan=expect, label=f"family {family}")


# ----------------------------------------------------------------------- compile, checkpointing


def _f64_llama_case(sizes, seed):
    base = llama_case(sizes, seed=seed)
    return Case(base.build, base.batches, lambda m, b: causal_shares(m, b).sum(), causal_shares,
                n_examples)


def test_torch_compile():
    """``torch.compile(model)`` given to the lens: layer names without ``_orig_mod.``, and
    every estimator right (the hooks run inside the compiled frame). The ``aot_eager``
    backend keeps the suite fast; the lens sees the same hooks under any backend."""
    torch._dynamo.reset()
    case = _f64_llama_case((4, 4), seed=20)
    model = case.build().double()
    compiled = torch.compile(model, backend="aot_eager")
    df, events, lens = run_lens(case, model=compiled, edit=clip_norm(0.2))
    assert lens.layers[0].name == "model.embed_tokens.weight"
    assert not any("_orig_mod" in i.name for i in lens.layers)
    check_counts(df, case)
    ref = full_reference(case, lens, clip=0.2)
    compare(df, events, lens, ref, tol=1e-5, floor=1.0, label="torch.compile (aot_eager)")
    torch._dynamo.reset()


def test_gradient_checkpointing():
    """HF gradient checkpointing (recomputation in backward): two-batch and per-example
    values are right, the recomputed forwards are not counted twice."""
    case = _f64_llama_case((3, 2), seed=21)
    model = case.build().double()
    model.gradient_checkpointing_enable()
    model.train()
    df, events, lens = run_lens(case, model=model, edit=clip_norm(0.2))
    check_counts(df, case)
    ref = full_reference(case, lens, clip=0.2)
    compare(df, events, lens, ref, tol=1e-5, floor=1.0, label="gradient checkpointing")
    assert not [e for e in events if e.kind == "validity"]
