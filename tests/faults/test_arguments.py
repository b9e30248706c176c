"""Every public argument is checked: a wrong type or value is one clear error naming it and
saying what it must be (the lens, its options, SpikeConfig, every CLI flag)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from gradlens import GradLens
from gradlens.cli import build_parser, main
from gradlens.sinks.memory import MemorySink
from gradlens.stats import SpikeConfig

NAN, INF = float("nan"), float("inf")

LENS_CASES = [  # (keyword arguments, error, what the message must say)
    (dict(histogram_bins=3.5), TypeError, "histogram_bins must be an integer >= 2, got 3.5"),
    (dict(histogram_bins=1), ValueError, "histogram_bins must be an integer >= 2"),
    (dict(background_io="yes"), TypeError, "background_io must be True or False"),
    (dict(log_every=0), ValueError, "log_every must be an integer >= 1"),
    (dict(log_every=1.5), TypeError, "log_every must be an integer >= 1"),
    (dict(log_every=True), TypeError, "log_every must be an integer"),
    (dict(columns="no"), TypeError, "columns must be True or False"),
    (dict(per_example=1), TypeError, "per_example must be True or False"),
    (dict(temporal_beta=1.0), ValueError, "temporal_beta must be a finite number >= 0 and < 1"),
    (dict(noise_ema="0.9"), TypeError, "noise_ema must be a finite number"),
    (dict(noise_ema=NAN), ValueError, "noise_ema must be a finite number"),
    (dict(temporal_budget_bytes=-1), ValueError, "temporal_budget_bytes must be an integer >= 0"),
    (dict(temporal_budget_bytes=1.5), TypeError, "temporal_budget_bytes must be an integer"),
    (dict(sketch_dim=0), ValueError, "sketch_dim must be an integer >= 1"),
    (dict(loss_reduction="avg"), ValueError, "loss_reduction must be one of 'mean'"),
    (dict(batch_size=0), ValueError, r"batch_size must be an integer >= 1 \(or None\)"),
    (dict(batch_size=2.0), TypeError, "batch_size must be an integer >= 1"),
    (dict(per_example_scope="some"), ValueError, "per_example_scope must be one of 'all'"),
    (dict(batch_dim=-1), ValueError, "batch_dim must be an integer >= 0"),
    (dict(spikes={"threshold": 3}), TypeError, "spikes must be a gradlens.stats.SpikeConfig"),
    (dict(preset="everything"), ValueError, "unknown preset 'everything'"),
    (dict(preset=None), ValueError, "unknown preset None"),
    (dict(colums=False), ValueError, r"unknown lens option\(s\) \['colums'\]"),
    (dict(optimizer=object()), TypeError, "optimizer must be a torch.optim.Optimizer"),
    (dict(logdir=3), TypeError, "logdir must be a path"),
    (dict(include="*.weight"), TypeError, r"include must be a list of strings.*\['\*.weight'\]"),
    (dict(exclude=[1]), TypeError, "exclude must be a list of strings, got an item 1"),
    (dict(roles="hidden"), TypeError, "roles must be a list of strings"),
    (dict(overrides=["weight"]), TypeError, "overrides must be a mapping"),
    (dict(output=3), TypeError, "output must be a string"),
    (dict(sinks=MemorySink()), TypeError, r"sinks must be a list.*\[sink\]"),
    (dict(sinks=[object()]), TypeError, "each of sinks must be a gradlens.sinks.Sink"),
    (dict(table_format="xlsx"), ValueError, "table_format must be one of 'csv'"),
    (dict(tensorboard="yes"), TypeError, "tensorboard must be True or False"),
    (dict(step_hook=1), TypeError, "step_hook must be True or False"),
    (dict(name=5), TypeError, "name must be a string"),
    (dict(meta=[("a", 1)]), TypeError, "meta must be a mapping"),
    (dict(guard=object()), TypeError, "guard must be a gradlens.SpikeGuard"),
]


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


@pytest.mark.parametrize(("kwargs", "error", "message"), LENS_CASES,
                         ids=[next(iter(c[0])) + "-" + type(next(iter(c[0].values()))).__name__
                              for c in LENS_CASES])
def test_lens_arguments(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        GradLens(_model(), **{"output": "1", **kwargs})


def test_a_bad_model_is_named() -> None:
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got 'm'"):
        GradLens("m")


def test_good_values_of_every_kind_are_accepted() -> None:
    lens = GradLens(_model(), torch.optim.SGD(_model().parameters(), lr=0.1), output="1",
                    histogram_bins=np.int64(16), noise_ema=np.float32(0.5), batch_size=None,
                    include=("*weight",), roles=["hidden", "output"], sinks=(MemorySink(),),
                    temporal_budget_bytes=0, spikes=SpikeConfig(threshold=np.float64(4)))
    assert lens.config.histogram_bins == 16
    lens.close()


SPIKE_CASES = [
    (dict(warmup=2.5), TypeError, "SpikeConfig.warmup must be an integer >= 1, got 2.5"),
    (dict(threshold="9"), TypeError, "SpikeConfig.threshold must be a finite number > 0, got '9'"),
    (dict(threshold=True), TypeError, "SpikeConfig.threshold must be a finite number"),
    (dict(threshold=0), ValueError, "SpikeConfig.threshold must be a finite number > 0, got 0"),
    (dict(alpha=1.0), ValueError, "SpikeConfig.alpha must be a finite number >= 0 and < 1"),
    (dict(level_alpha=-0.1), ValueError, "SpikeConfig.level_alpha must be"),
    (dict(trend=1.5), ValueError, "SpikeConfig.trend must be a finite number >= 0 and <= 1"),
    (dict(min_std=-1), ValueError, "SpikeConfig.min_std must be a finite number >= 0"),
    (dict(spam_theta=INF), ValueError, "SpikeConfig.spam_theta must be a finite number > 0"),
    (dict(top_k=0), ValueError, "SpikeConfig.top_k must be an integer >= 1"),
    (dict(top_k=2.0), TypeError, "SpikeConfig.top_k must be an integer >= 1"),
    (dict(clip="yes"), TypeError, "SpikeConfig.clip must be True or False"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), SPIKE_CASES,
                         ids=[f"{next(iter(c[0]))}={next(iter(c[0].values()))!r}"
                              for c in SPIKE_CASES])
def test_spike_config_arguments(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        SpikeConfig(**kwargs)


CLI_CASES = [  # (argv, the flag named, what the message says)
    (["compare", "--threads", "-2"], "--threads", "expected an integer >= 1, got '-2'"),
    (["compare", "--threads", "0"], "--threads", "expected an integer >= 1, got '0'"),
    (["compare", "--threads", "two"], "--threads", "expected an integer >= 1, got 'two'"),
    (["compare", "--steps", "0"], "--steps", "expected an integer >= 1"),
    (["compare", "--seeds", "0"], "--seeds", "expected an integer >= 1"),
    (["compare", "--sweep-seeds", "-1"], "--sweep-seeds", "expected an integer >= 1"),
    (["compare", "--seed", "-1"], "--seed", "expected an integer >= 0"),
    (["compare", "--lr-factors", "1", "-0.5"], "--lr-factors", "expected a finite number > 0"),
    (["compare", "--lr-factors", "nan"], "--lr-factors", "expected a finite number > 0"),
    (["compare", "--preset", "everything"], "--preset", "invalid choice"),
    (["compare", "--size", "huge"], "--size", "invalid choice"),
    (["demo", "--steps", "2.5"], "--steps", "expected an integer >= 1, got '2.5'"),
    (["demo", "--seed", "x"], "--seed", "expected an integer >= 0"),
    (["demo", "--preset", "none"], "--preset", "invalid choice"),
    (["dashboard", "run", "--port", "0"], "--port", "expected an integer in 1..65535"),
    (["dashboard", "run", "--port", "70000"], "--port", "expected an integer in 1..65535"),
    (["report", "run"], "-o/--out", "required"),
]


@pytest.mark.parametrize(("argv", "flag", "message"), CLI_CASES,
                         ids=[" ".join(c[0]) for c in CLI_CASES])
def test_cli_flags(argv: list[str], flag: str, message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert flag in err and message in err and "Traceback" not in err


def test_cli_good_values_parse() -> None:
    args = build_parser().parse_args(["compare", "--threads", "1", "--lr-factors", "0.5", "2",
                                      "--seed", "0", "--sweep-seeds", "1"])
    assert args.threads == 1 and args.lr_factors == [0.5, 2.0] and args.sweep_seeds == 1
    assert build_parser().parse_args(["dashboard", "r", "--port", "65535"]).port == 65535


def test_an_option_given_explicitly_wins_over_the_preset() -> None:
    """``preset="minimal", per_example=True``: minimal's flags, plus the per-example estimators
    (the documented rule: an explicit option wins), and they are computed."""
    torch.manual_seed(0)
    model = _model()
    memory = MemorySink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lens = GradLens(model, preset="minimal", per_example=True, sinks=[memory], output="1")
    assert lens.config.per_example and not lens.config.columns and not lens.config.microbatch
    x = torch.randn(8, 3)
    model(x).square().mean().backward()
    lens.step()
    lens.close()
    stats = {r[3] for r in memory.rows}
    assert "pe_trace" in stats and "unit_rms_cv" not in stats and "twobatch_trace" not in stats
    # against brute force (float64): B/(B-1) (mean_b ||g_b||^2 - ||G||^2), g_b the example's
    # own gradient, G their mean (the batch gradient of the mean loss)
    w = model[1].weight
    grads = []
    for b in range(8):
        model.zero_grad()
        (model(x[b:b + 1]).square().mean() / 8).backward()
        grads.append(w.grad.detach().double().flatten() * 8)  # the example's own gradient
    g = torch.stack(grads)
    mean = g.mean(0)
    ref = float(((g - mean) ** 2).sum(1).mean() * 8 / 7)
    got = next(r[4] for r in memory.rows if r[3] == "pe_trace" and r[1] == "1.weight")
    assert got == pytest.approx(ref, rel=1e-4)  # float32 Gram sums of 8 examples
