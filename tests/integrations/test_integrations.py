"""The HF Trainer and Lightning callbacks, run through their examples: statistics written."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from gradlens.report import load_meta, load_run

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_hf_trainer_callback(tmp_path):
    _example("hf_trainer").main(["--steps", "4", "--out", str(tmp_path)])
    run = tmp_path / "gradlens"
    df = load_run(run)
    assert sorted(df.step.unique()) == [2, 4]  # the Trainer's logging_steps
    micro = df[(df.stat == "microbatches")].value
    assert set(micro) == {2.0}  # gradient_accumulation_steps
    assert "noise_scale" in set(df.stat)  # two micro-batches: two-batch estimator
    pre = df[(df.stat == "grad_norm_preclip") & (df.layer == "global")]
    post = df[(df.stat == "grad_norm") & (df.layer == "global")]
    assert len(pre) == 2 and len(post) == 2
    # clipping at 1.0: the norm the optimizer saw is min(pre-clip norm, 1.0)
    for step in (2, 4):
        p = float(pre[pre.step == step].value.iloc[0])
        g = float(post[post.step == step].value.iloc[0])
        assert g == pytest.approx(min(p, 1.0), rel=1e-3)
    # the callback feeds the loss detector (values: tests/conformance/test_clipped_loops.py)
    loss = df[(df.stat == "loss") & (df.layer == "global")]
    assert list(loss.step) == [2, 4] and (loss.value > 3.0).all()
    assert list(df[df.stat == "loss_z"].step) == [2, 4]
    meta = load_meta(run)
    assert meta["framework"] == "transformers.Trainer"
    assert meta["gradient_accumulation_steps"] == 2


def test_lightning_callback(tmp_path):
    pytest.importorskip("lightning")
    _example("lightning_module").main(["--steps", "4", "--out", str(tmp_path),
                                       "--clip", "0.05"])
    run = tmp_path / "gradlens"
    df = load_run(run)
    assert sorted(df.step.unique()) == [2, 4]
    assert set(df[df.stat == "microbatches"].value) == {2.0}
    loss = df[(df.stat == "loss")].value.to_numpy()
    assert len(loss) == 2 and np.all(np.isfinite(loss)) and np.all(loss > 3.0)
    assert list(df[df.stat == "loss_z"].step) == [2, 4]
    # Lightning hands the lens the gradient before clipping (clip value 0.05)
    norms = df[(df.stat == "grad_norm") & (df.layer == "global")].value
    assert (norms > 0.2).all()


def test_plain_loop_example(tmp_path):
    _example("plain_loop").main(["--steps", "3", "--logdir", str(tmp_path / "run")])
    df = load_run(tmp_path / "run")
    assert sorted(df.step.unique()) == [1, 2, 3]
    assert df[(df.stat == "microbatches")].value.eq(2.0).all()
    assert load_meta(tmp_path / "run")["optimizer"] == "SCALE"
