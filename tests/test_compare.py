"""gradlens compare: sweep, table relative to AdamW, resumability."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gradlens.compare import comparison_rows, run_compare, sweep_points


@pytest.fixture
def corpus_file(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADLENS_CACHE", str(tmp_path / "cache"))
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "mind"]
    rng = np.random.default_rng(0)
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words, 600)) for _ in range(4)))
    return path


def test_sweep_points_scale_the_default_lrs():
    from gradlens.experiment import DEFAULT_LRS
    from gradlens.optim.registry import OPTIMIZERS

    pts = sweep_points(["adamw", "scale", "sgd_output_momentum"], [0.5, 2.0])
    assert pts == [("adamw", 0.5 * DEFAULT_LRS["adamw"]), ("adamw", 2.0 * DEFAULT_LRS["adamw"]),
                   ("scale", 0.5 * DEFAULT_LRS["scale"]), ("scale", 2.0 * DEFAULT_LRS["scale"]),
                   # no demo-scale value: the registry's
                   ("sgd_output_momentum", 0.5 * OPTIMIZERS["sgd_output_momentum"].lr),
                   ("sgd_output_momentum", 2.0 * OPTIMIZERS["sgd_output_momentum"].lr)]
    assert sweep_points(["scale"], [1.0], lrs={"scale": 0.25}) == [("scale", 0.25)]
    with pytest.raises(ValueError, match="unknown optimizer"):
        sweep_points(["adam"], [1.0])


def test_compare_table_and_resume(tmp_path, corpus_file, capsys):
    out = tmp_path / "cmp"
    kw = dict(optimizers=("adamw", "scale"), lr_factors=(1.0, 2.0), steps=3, size="tiny",
              corpus=str(corpus_file), preset="minimal", progress=True, seq_len=16,
              batch_size=2, grad_accum=1, eval_batches=1, vocab_size=300,
              model_overrides={"vocab_size": 300})
    rows = run_compare(out, **kw)
    assert next(r["optimizer"] for r in rows) == "adamw"
    by = {r["optimizer"]: r for r in rows}
    assert by["adamw"]["weights_plus_state_vs_adamw"] == 1.0
    assert by["adamw"]["step_time_vs_adamw"] == 1.0
    results = {r["optimizer"]: json.loads((Path(r["run_dir"]) / "result.json").read_text())
               for r in rows}
    params = results["adamw"]["info"]["parameters"]
    state = {name: res["optimizer_state_bytes"] for name, res in results.items()}
    expected = (4 * params + state["scale"]) / (4 * params + state["adamw"])
    assert by["scale"]["weights_plus_state_vs_adamw"] == pytest.approx(expected)
    assert state["adamw"] == 2 * 4 * params  # AdamW: two fp32 moments
    assert by["scale"]["tokens"] == 3 * 2 * 16
    for name in ("comparison.csv", "comparison.md", "loss_curves.png", "report/report.html"):
        assert (out / name).is_file(), name
    assert len(list((out / "runs").glob("*/result.json"))) == 4
    mtimes = {p: p.stat().st_mtime for p in (out / "runs").glob("*/result.json")}
    capsys.readouterr()
    rows2 = run_compare(out, **kw)  # resumes: nothing is redone
    assert "done already, skipped" in capsys.readouterr().out
    assert {p: p.stat().st_mtime for p in mtimes} == mtimes
    assert [r["best_eval_loss"] for r in rows2] == [r["best_eval_loss"] for r in rows]
    assert comparison_rows(out)[0]["optimizer"] == "adamw"


def test_training_loop_builds_every_optimizer_of_the_registry(tiny_llama):
    import torch

    from gradlens.experiment import DEFAULT_LRS, make_optimizer
    from gradlens.optim.registry import OPTIMIZERS

    for name in OPTIMIZERS:
        opt, info = make_optimizer(name, tiny_llama)
        assert info["name"] == name and info["lr"] == pytest.approx(
            DEFAULT_LRS.get(name, OPTIMIZERS[name].lr))
        if name in ("scale", "colnorm_sgd"):
            assert info["lr_1d"] == pytest.approx(20 * info["lr"])
        before = tiny_llama.lm_head.weight.detach().clone()
        ids = torch.randint(0, 128, (2, 8))
        tiny_llama(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        assert not torch.equal(before, tiny_llama.lm_head.weight), name
