"""Runs of demo and compare: the registry, the schedule, train(), runs from a config."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gradlens.data.batches import DataBundle, split_tokens
from gradlens.data.corpus import Corpus, Document
from gradlens.data.models import build_llama
from gradlens.data.tokenizer import train_tokenizer
from gradlens.experiment import (
    DEFAULT_LRS,
    RunConfig,
    build_model,
    make_run_optimizer,
    run_experiment,
)
from gradlens.optim.memory import optimizer_state_bytes
from gradlens.optim.registry import OPTIMIZERS, OptimizerSpec, register_optimizer
from gradlens.optim.schedule import cosine_lr_factor, cosine_schedule
from gradlens.training import StepInfo, TrainResult, train, warmup_steps


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_schedule_closed_form() -> None:
    total, peak = 100, 2e-3
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=peak)
    sched = cosine_schedule(opt, total)
    seen = []
    for _ in range(total + 5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    w = 10
    expected = {
        0: peak / w,  # warm-up starts above zero
        4: peak * 5 / w,
        9: peak,  # last warm-up step is the peak
        10: peak,  # decay starts at the peak
        # halfway through the decay: (1 + cos(pi/2)) / 2 = 0.5 -> 0.1 + 0.9 * 0.5
        10 + 89 // 2: peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 44 / 89))),
        99: 0.1 * peak,  # the last step is at the floor
        104: 0.1 * peak,  # and stays there
    }
    for step, lr in expected.items():
        assert seen[step] == pytest.approx(lr, rel=1e-12), step
    assert all(a <= b for a, b in itertools.pairwise(seen[:10]))
    assert all(a >= b for a, b in itertools.pairwise(seen[10:100]))
    assert cosine_lr_factor(54, 100) == pytest.approx(0.55, abs=0.02)
    assert cosine_lr_factor(0, 1) == 1.0
    assert cosine_lr_factor(3, 10, warmup_frac=0.0, min_ratio=0.0) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 3 / 9)))
    for bad in (dict(total_steps=0), dict(total_steps=5, warmup_frac=1.0),
                dict(total_steps=5, min_ratio=1.5)):
        with pytest.raises(ValueError):
            cosine_schedule(opt, **bad)


def test_registry_and_adamw_state_bytes(tiny_llama: torch.nn.Module) -> None:
    assert {"adamw", "scale", "sgd"} <= set(OPTIMIZERS)
    with pytest.raises(ValueError, match="unknown optimizer 'nope'"):
        make_run_optimizer("nope", tiny_llama)
    with pytest.raises(ValueError, match="lr"):
        make_run_optimizer("adamw", tiny_llama, lr=0.0)
    with pytest.raises(ValueError, match="already registered"):
        register_optimizer(OptimizerSpec("adamw", "again", 1e-3, False, "a clash",
                                         OPTIMIZERS["adamw"].build))
    opt, info = make_run_optimizer("AdamW", tiny_llama)
    assert info["lr"] == DEFAULT_LRS["adamw"] and info["name"] == "adamw"
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["foreach"] is True
    assert tuple(opt.defaults["betas"]) == (0.9, 0.95)
    assert optimizer_state_bytes(opt) == 0  # lazy state
    x = torch.randint(0, 128, (2, 9))
    tiny_llama(input_ids=x, labels=x).loss.backward()
    opt.step()
    assert optimizer_state_bytes(opt) == 2 * _n_params(tiny_llama) * 4


def test_scale_state_bytes(tiny_llama: torch.nn.Module) -> None:
    pytest.importorskip("gradlens.optim.scale")
    opt, info = make_run_optimizer("scale", tiny_llama, lr=1e-3)
    assert info["lr_1d"] == pytest.approx(2e-2)
    x = torch.randint(0, 128, (2, 9))
    tiny_llama(input_ids=x, labels=x).loss.backward()
    opt.step()
    head = tiny_llama.get_output_embeddings().weight.numel()
    vectors = sum(p.numel() for p in tiny_llama.parameters() if p.ndim == 1)
    # momentum on lm_head + AdamW's two moments on the 1-D tensors, float32
    assert optimizer_state_bytes(opt) == (head + 2 * vectors) * 4


def _repeat(batch: torch.Tensor, n: int):
    for _ in range(n):
        yield batch


@pytest.mark.parametrize("name,lr", [("adamw", 1e-2), ("sgd", 0.5), ("scale", 1e-2)])
def test_train_decreases_loss_on_a_repeated_batch(name: str, lr: float) -> None:
    if name == "scale":
        pytest.importorskip("gradlens.optim.scale")
    model = build_llama("tiny", seed=0)
    opt, _ = make_run_optimizer(name, model, lr=lr)
    batch = torch.randint(0, 128, (4, 17), generator=torch.Generator().manual_seed(0))
    infos: list[StepInfo] = []
    res = train(model, opt, None, _repeat(batch, 20), 20, eval_batches=[batch],
                on_step=infos.append, progress=False, seed=0, log_every=5)
    assert res.steps == 20 and len(res.losses) == 20 and not res.diverged
    assert res.losses[0] == pytest.approx(math.log(128), abs=0.3)  # untrained: ~uniform
    assert res.losses[-1] < res.losses[0] - 1.0
    assert res.eval_loss is not None and res.eval_loss < res.losses[0] - 1.0
    assert res.tokens_seen == 20 * 4 * 16
    assert [i.step for i in infos] == list(range(20)) and infos[-1].tokens == res.tokens_seen
    assert float(infos[3].loss) == pytest.approx(res.losses[3])
    assert res.lrs == [lr] * 20  # no scheduler: constant
    assert res.mean_step_s is not None and res.mean_step_s > 0
    assert len(res.step_times) == 20 and res.total_s >= sum(res.step_times[1:])
    assert res.eval_ppl == pytest.approx(math.exp(res.eval_loss))
    assert model.training  # evaluate() restores the mode


def test_grad_accum_matches_the_full_batch() -> None:
    """Two half batches with loss / 2 give the full batch's gradient (equal-length rows)."""
    batch = torch.randint(0, 128, (4, 9), generator=torch.Generator().manual_seed(1))
    results = []
    for accum, parts in ((1, [batch]), (2, [batch[:2], batch[2:]])):
        model = build_llama("tiny", seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        res = train(model, opt, None, iter(parts), 1, grad_accum=accum, progress=False)
        results.append((res, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (r1, w1), (r2, w2) = results
    assert r1.losses[0] == pytest.approx(r2.losses[0], rel=1e-5)
    assert torch.allclose(w1, w2, atol=1e-6)
    assert r1.tokens_seen == r2.tokens_seen == 32


class _Lens:
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.entered = self.exited = 0

    def __enter__(self) -> _Lens:
        self.entered += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.exited += 1

    def observe_loss(self, loss: torch.Tensor) -> None:
        self.losses.append(float(loss))


def test_lens_factory_clip_and_scheduler(tiny_llama: torch.nn.Module) -> None:
    lens = _Lens()
    seen: list[object] = []

    def factory(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> _Lens:
        seen.extend([model, optimizer])
        return lens

    opt, _ = make_run_optimizer("adamw", tiny_llama, lr=1e-3)
    sched = cosine_schedule(opt, 6)
    batches = [torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(i))
               for i in range(12)]
    res = train(tiny_llama, opt, sched, iter(batches), 6, grad_accum=2, clip=0.5,
                lens_factory=factory, progress=False)
    assert seen == [tiny_llama, opt] and lens.entered == lens.exited == 1
    assert len(lens.losses) == 12  # one per micro-batch, each loss / grad_accum
    step_means = np.add.reduceat(np.array(lens.losses), np.arange(0, 12, 2))
    assert np.allclose(step_means, res.losses, rtol=1e-5)
    assert res.lrs == pytest.approx([1e-3 * cosine_lr_factor(s, 6) for s in range(6)])
    # a factory may return None
    res2 = train(tiny_llama, opt, None, iter(batches), 1, lens_factory=lambda m, o: None,
                 progress=False)
    assert res2.steps == 1 and res2.mean_step_s is None


def test_train_errors_and_divergence(tiny_llama: torch.nn.Module) -> None:
    opt = torch.optim.SGD(tiny_llama.parameters(), lr=0.1)
    batch = torch.randint(0, 128, (2, 9))
    with pytest.raises(ValueError, match="data ran out at step 2"):
        train(tiny_llama, opt, None, [batch, batch], 3, progress=False)
    with pytest.raises(ValueError, match="steps"):
        train(tiny_llama, opt, None, [batch], 0, progress=False)
    with pytest.raises(ValueError, match="clip"):
        train(tiny_llama, opt, None, [batch], 1, clip=0.0, progress=False)

    def nan_loss(model: torch.nn.Module, b: torch.Tensor) -> torch.Tensor:
        return model(input_ids=b, labels=b).loss * float("nan")

    res = train(tiny_llama, opt, None, _repeat(batch, 10), 10, loss_fn=nan_loss,
                eval_batches=[batch], log_every=3, progress=False)
    assert res.diverged and res.steps == 3 and res.eval_loss is None


def test_run_experiment_same_init_and_batches(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADLENS_CACHE", str(tmp_path))
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "mind"]
    rng = np.random.default_rng(0)
    corpus = Corpus("w", tuple(Document(f"{i}", " ".join(rng.choice(words, 800)))
                               for i in range(3)))
    tok = train_tokenizer(corpus, vocab_size=300)
    ids = np.array(tok.encode(corpus.documents[0].text).ids
                   + tok.encode(corpus.documents[1].text).ids, dtype=np.int64)
    n0 = len(tok.encode(corpus.documents[0].text).ids)
    data = DataBundle(corpus, tok, split_tokens(ids, np.array([0, n0, len(ids)])), 300)
    cfg = RunConfig(size="tiny", steps=4, batch_size=2, seq_len=16, eval_batches=2,
                    model_overrides={"vocab_size": 300}, lrs={"sgd": 0.05})
    m1, r1 = run_experiment(cfg, "sgd", data, progress=False)
    _, r2 = run_experiment(cfg, "sgd", data, progress=False)
    assert r1.losses == r2.losses and r1.eval_loss == r2.eval_loss  # fully reproducible
    assert r1.info["optimizer"]["name"] == "sgd" and r1.info["config"]["steps"] == 4
    assert r1.info["data"]["vocab_size"] == 300 and r1.info["parameters"] == _n_params(m1)
    assert r1.tokens_seen == 4 * 2 * 16
    assert set(r1.to_dict()) >= {"losses", "eval_loss", "eval_ppl", "tokens_per_s"}
    small_vocab = RunConfig(size="tiny", steps=1, model_overrides={"vocab_size": 257})
    with pytest.raises(ValueError, match="tokenizer has 300 ids but the model only 257"):
        run_experiment(small_vocab, "sgd", data, progress=False)


def test_build_model_presets() -> None:
    demo = build_model("demo", device="meta")
    cfg = demo.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (128, 4, 4096)
    assert RunConfig().tokenizer_vocab_size() == 4096
    assert build_model("tiny", device="meta").config.hidden_size == 32
    with pytest.raises(ValueError, match="unknown model size"):
        build_model("huge")


def _timed(step_times: list[float], tokens_per_step: int = 100) -> TrainResult:
    n = len(step_times)
    return TrainResult(losses=[1.0] * n, lrs=[1e-3] * n, eval_loss=2.0, steps=n,
                       tokens_seen=tokens_per_step * n, total_s=sum(step_times),
                       first_step_s=step_times[0] if n else 0.0,
                       mean_step_s=sum(step_times[1:]) / (n - 1) if n > 1 else None,
                       step_times=step_times, optimizer_state_bytes=0)


def test_steady_state_timing_leaves_out_warmup_and_load() -> None:
    assert [warmup_steps(n) for n in (0, 1, 2, 15, 20, 55, 500)] == [0, 0, 1, 1, 2, 5, 10]
    # 20 steps: 2 warm-up steps (slow), one step slowed by another process
    times = [3.0, 1.0] + [0.2] * 17 + [5.0]
    r = _timed(times)
    assert r.median_step_s == pytest.approx(float(np.median(times[2:])))
    assert r.median_step_s == pytest.approx(0.2)
    assert r.median_tokens_per_s == pytest.approx(100 / 0.2)
    assert r.tokens_per_s == pytest.approx(2000 / sum(times))  # whole loop, warm-up included
    assert _timed([0.5]).median_step_s == 0.5 and _timed([]).median_step_s is None
    d = r.to_dict()
    assert d["median_step_s"] == pytest.approx(0.2)


def test_demo_summary_times_every_optimizer_the_same_way(tmp_path: Path) -> None:
    from gradlens.demo import DemoResult

    # the first run pays the warm-up of the machine and is slowed at the start; the second
    # is not: the same steady-state step time must give the same figures
    first = _timed([4.0, 2.0, 1.5] + [0.25] * 27)
    second = _timed([0.4] + [0.25] * 29)
    demo = DemoResult(tmp_path, {}, {"scale": first, "adamw": second}, tmp_path / "r.html", 1.0)
    rows = {line.split()[0]: line.split() for line in demo.summary_table().splitlines()[2:4]}
    assert rows["scale"][4] == rows["adamw"][4] == "250"  # ms/step
    assert rows["scale"][5] == rows["adamw"][5] == "400"  # tokens/s
    assert "median step after the warm-up" in demo.summary_table()
