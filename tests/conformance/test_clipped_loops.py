"""Loops that clip at 1.0, with a 100x gradient spike: the detectors read the raw gradient.

Each cell checks, against a float64 shadow model: the raw norm (``grad_norm_preclip``, per
layer and global) and the consumed one (``grad_norm``, after ``clip_grad_norm_``) at every
step, in every preset; the global spike event at the spike step; and, at the last step, every
variance estimator of the preset against :func:`tests.conformance._reference.reference`. The
distributed cells (DDP ``no_sync`` + clipping, FSDP2 + clipping, a spike under DDP) are in
``tests/distributed/test_distributed.py``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from gradlens import GradLens
from gradlens.data import build_llama
from tests.conformance._harness import compare, full_reference
from tests.conformance._reference import Case, causal_shares

VOCAB, SPIKE, STEPS, CLIP = 128, 30, 31, 1.0
STATS = {"minimal": ("grad_norm", "grad_norm_preclip"),
         "standard": ("grad_norm", "grad_norm_preclip", "twobatch_trace", "twobatch_signal",
                      "unit_nsr_median"),
         "full": ("grad_norm", "grad_norm_preclip", "twobatch_trace", "twobatch_signal",
                  "unit_nsr_median", "pe_trace", "pe_signal")}


def counting(n: int, seed: int, seq: int = 10) -> torch.Tensor:
    start = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (start + torch.arange(seq)) % VOCAB


def raw_norms(state: dict, batches: list[dict], weights: list[float], names: list[str]):
    """Per-layer raw norms of ``sum_k w_k grad(loss_k)`` on a float64 shadow, and the loss."""
    shadow = build_llama("tiny", seed=0).double()
    shadow.load_state_dict(state)
    params = dict(shadow.named_parameters())
    total = [torch.zeros_like(params[n]) for n in names]
    loss_sum = 0.0
    for batch, w in zip(batches, weights, strict=True):
        loss = shadow(**batch).loss
        grads = torch.autograd.grad(loss * w, [params[n] for n in names])
        total = [t + g for t, g in zip(total, grads, strict=True)]
        loss_sum += float(loss.detach())
    return {n: float(t.pow(2).sum().sqrt()) for n, t in zip(names, total, strict=True)}, loss_sum


def check_step(rows: dict, step: int, raw: dict[str, float], clip: float) -> float:
    """Raw and consumed norms of one step against the shadow's; returns the clip factor."""
    total = math.sqrt(sum(v * v for v in raw.values()))
    coef = min(1.0, clip / (total + 1e-6))
    for name, want in raw.items():
        assert rows[(step, name, "grad_norm_preclip")] == pytest.approx(want, rel=1e-5)
        assert rows[(step, name, "grad_norm")] == pytest.approx(want * coef, rel=1e-5)
    assert rows[(step, "global", "grad_norm_preclip")] == pytest.approx(total, rel=1e-5)
    assert rows[(step, "global", "grad_norm")] == pytest.approx(total * coef, rel=1e-5)
    return coef


def check_spike(events: list, rows: dict) -> None:
    glob = [e for e in events if e.layer == "global" and e.kind == "grad_norm_global"]
    assert [e.step for e in glob] == [SPIKE], glob
    assert glob[0].score == rows[(SPIKE, "global", "grad_norm_z")]
    assert glob[0].score > 9  # the default threshold


@pytest.mark.parametrize("preset", ["minimal", "standard", "full"])
def test_plain_loop_clip_and_spike(preset):
    """2 micro-batches of 4 (loss / 2), ``clip_grad_norm_(1.0)``, AdamW; the loss of step
    SPIKE times 100."""
    torch.manual_seed(0)
    model = build_llama("tiny", seed=0).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lens = GradLens(model, opt, preset=preset, noise_ema=0.0)
    names = [i.name for i in lens.layers]
    data = counting(8 * STEPS, seed=1)
    coefs, last = [], None
    for s in range(1, STEPS + 1):
        ids = data[8 * (s - 1):8 * s]
        batches = [{"input_ids": ids[:4], "labels": ids[:4]},
                   {"input_ids": ids[4:], "labels": ids[4:]}]
        factor = 100.0 if s == SPIKE else 1.0
        state = copy.deepcopy(model.state_dict())
        for b in batches:
            (model(**b).loss * (factor / 2)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        coefs.append((s, state, batches, factor))
        last = (state, batches)
    lens.flush()
    rows = {(s, layer, stat): v for s, layer, _, stat, v in lens.memory.rows}
    events = list(lens.memory.events)
    for s, state, batches, factor in coefs:
        raw, _ = raw_norms(state, batches, [factor / 2] * 2, names)
        coef = check_step(rows, s, raw, CLIP)
        if s == SPIKE:
            assert coef < 0.05  # the spike was clipped away from the consumed gradient
    check_spike(events, rows)
    # every estimator of the preset at the last step, against the float64 reference
    state, batches = last

    def build(state=state):
        m = build_llama("tiny", seed=0).double()
        m.load_state_dict(state)
        return m

    case = Case(build, batches, None, causal_shares, lambda b: int(b["input_ids"].shape[0]))
    df = lens.memory.frame()
    compare(df[df.step == STEPS], events, lens, full_reference(case, lens, clip=CLIP),
            tol=1e-5, floor=1.0, label=f"plain clip {preset}", stats=STATS[preset])
    assert not [e for e in events if e.kind == "validity"]
    lens.close()


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.ids = counting(n, seed=3)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.parametrize("preset", ["minimal", "standard", "full"])
def test_hf_trainer_defaults_clip_and_spike(tmp_path, preset):
    """The Trainer at its defaults (``max_grad_norm=1.0``, no accumulation); at step SPIKE a
    forward hook multiplies the model's loss by 100 (the gradient and the loss spike): the raw
    norms, the consumed norms and the step's loss (fed to the lens by the callback) against a
    float64 shadow at every step, ``loss_z`` on every step after the warm-up, the global
    gradient spike event and the loss spike event."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from gradlens.integrations.hf import GradLensCallback
    from gradlens.sinks.memory import MemorySink

    model = build_llama("tiny", seed=0).double()
    seen: list[dict] = []
    states: list[dict] = []

    def collate(rows):
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        seen.append({k: v.clone() for k, v in batch.items()})
        return batch

    step = [0]
    trainer_norms: dict[int, float] = {}

    def spike(module, args, out):  # registered before the callback's hook: it sees this
        if module.training and step[0] == SPIKE:
            out["loss"] = out["loss"] * 100.0
        return out

    model.register_forward_hook(spike)

    class Spike(TrainerCallback):  # the step's number; the weights before each step
        def on_step_begin(self, args, state, control, **kw):
            step[0] = state.global_step + 1

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            states.append(copy.deepcopy(model.state_dict()))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "grad_norm" in logs:  # the Trainer's own pre-clip global norm
                trainer_norms[state.global_step] = float(logs["grad_norm"])

    memory = MemorySink()
    lens_cb = GradLensCallback(preset=preset, sinks=[memory], tensorboard=False,
                               noise_ema=0.0)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS,
                             per_device_train_batch_size=4, logging_steps=1,
                             learning_rate=1e-3, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    assert args.max_grad_norm == CLIP and args.gradient_accumulation_steps == 1
    Trainer(model=model, args=args, train_dataset=_Tokens(4 * STEPS), data_collator=collate,
            callbacks=[Spike(), lens_cb]).train()
    lens = lens_cb.lens
    names = [i.name for i in lens.layers]
    rows = {(s, layer, stat): v for s, layer, _, stat, v in memory.rows}
    for s in range(1, STEPS + 1):
        factor = 100.0 if s == SPIKE else 1.0
        raw, loss = raw_norms(states[s - 1], [seen[s - 1]], [factor], names)
        check_step(rows, s, raw, CLIP)
        assert rows[(s, "global", "loss")] == pytest.approx(loss * factor, rel=1e-5)
        if s > 25:  # armed after the warm-up
            assert math.isfinite(rows[(s, "global", "loss_z")])
        assert rows[(s, "global", "grad_norm_preclip")] == pytest.approx(trainer_norms[s],
                                                                         rel=1e-5)
    events = list(memory.events)
    check_spike(events, rows)
    assert [(e.step, e.layer) for e in events if e.kind == "loss"] == [(SPIKE, "global")]
