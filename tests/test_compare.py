"""gradlens compare: sweep, table relative to AdamW, resumability."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradlens.compare import comparison_rows, run_compare, sweep_points


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

    from gradlens.experiment import DEFAULT_LRS, make_run_optimizer
    from gradlens.optim.registry import OPTIMIZERS

    for name in OPTIMIZERS:
        opt, info = make_run_optimizer(name, tiny_llama)
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


def _fake_result(path: Path, name: str, lr: float, seed: int, loss: float) -> None:
    path.mkdir(parents=True)
    path.joinpath("result.json").write_text(json.dumps({
        "eval_loss": loss, "eval_ppl": 2.0, "tokens_seen": 10, "optimizer_state_bytes": 8,
        "losses": [loss], "mean_step_s": 1.0,
        "info": {"optimizer_name": name, "lr": lr, "seed": seed, "parameters": 1,
                 "session": "s", "optimizer": {"name": name}}}))


def test_seed_statistics_and_best_lr_on_the_seed_mean(tmp_path):
    """Three seeds per (optimizer, lr), written as finished runs: mean, std and bootstrap CI
    against numpy; the best lr is the one with the lowest mean, not the lowest single run."""
    import numpy as np

    from gradlens.compare import seed_summary

    losses = {("adamw", 1e-3): [5.0, 5.2, 5.4], ("adamw", 2e-3): [4.5, 6.0, 6.1],
              ("scale", 1e-3): [4.9, 5.0, 5.1]}
    for (name, lr), ls in losses.items():
        for seed, loss in enumerate(ls):
            _fake_result(tmp_path / "runs" / f"{name}-lr{lr:.2e}-seed{seed}", name, lr, seed,
                         loss)
    rows = {r["optimizer"]: r for r in comparison_rows(tmp_path)}
    assert rows["adamw"]["best_lr"] == 1e-3  # mean 5.2 beats 5.53 (whose best seed is 4.5)
    assert rows["adamw"]["loss_mean"] == pytest.approx(5.2)
    assert rows["adamw"]["loss_std"] == pytest.approx(np.std([5.0, 5.2, 5.4], ddof=1))
    assert rows["scale"]["loss_vs_adamw"] == pytest.approx(5.0 / 5.2 - 1)
    s = seed_summary([5.0, 5.2, 5.4], n_boot=4000)
    rng = np.random.default_rng(0)
    x = np.array([5.0, 5.2, 5.4])
    ref = np.percentile(x[rng.integers(0, 3, size=(4000, 3))].mean(axis=1), [2.5, 97.5])
    assert (s["loss_ci_low"], s["loss_ci_high"]) == pytest.approx(tuple(ref))
    assert 5.0 - 1e-9 <= s["loss_ci_low"] < 5.2 < s["loss_ci_high"] <= 5.4 + 1e-9
    assert seed_summary([5.0])["loss_ci_low"] == 5.0


def test_compare_seeds_runs_and_resumes_each_seed(tmp_path, corpus_file, capsys):
    out = tmp_path / "cmp"
    kw = dict(optimizers=("adamw",), lr_factors=(1.0,), steps=2, size="tiny",
              corpus=str(corpus_file), preset="minimal", progress=True, seq_len=16,
              batch_size=2, grad_accum=1, eval_batches=1, vocab_size=300,
              model_overrides={"vocab_size": 300}, seeds=2)
    rows = run_compare(out, **kw)
    dirs = sorted(p.parent.name for p in (out / "runs").glob("*/result.json"))
    assert [d.rsplit("-", 1)[1] for d in dirs] == ["seed0", "seed1"]
    seeds = [json.loads((out / "runs" / d / "result.json").read_text())["info"]["seed"]
             for d in dirs]
    assert seeds == [0, 1] and rows[0]["n_seeds"] == 2
    losses = [json.loads((out / "runs" / d / "result.json").read_text())["eval_loss"]
              for d in dirs]
    assert losses[0] != losses[1]  # the seed reaches the run
    assert rows[0]["loss_mean"] == pytest.approx(sum(losses) / 2)
    (out / "runs" / dirs[1] / "result.json").unlink()  # an interrupted second seed
    capsys.readouterr()
    run_compare(out, **kw)
    printed = capsys.readouterr().out
    assert f"{dirs[0]}: done already, skipped" in printed and f"{dirs[1]}: done" not in printed


def test_best_lr_is_chosen_on_the_seeds_every_lr_has(tmp_path):
    """Tune on seed 0, confirm seeds 1-2 at the tuned lr: the confirmation seeds do not take
    part in the choice (their worse mean would otherwise hand the win to the other lr), and
    the row's statistics are over all three seeds of the chosen lr."""
    runs = {("adamw", 1e-3): {0: 5.0, 1: 5.6, 2: 5.8}, ("adamw", 2e-3): {0: 5.1}}
    for (name, lr), by_seed in runs.items():
        for seed, loss in by_seed.items():
            _fake_result(tmp_path / "runs" / f"{name}-lr{lr:.2e}-seed{seed}", name, lr, seed,
                         loss)
    row = comparison_rows(tmp_path)[0]
    assert row["best_lr"] == 1e-3 and row["n_seeds"] == 3
    assert row["loss_mean"] == pytest.approx((5.0 + 5.6 + 5.8) / 3)
    assert len(row["seed_losses"]) == 3


def test_sweep_seeds_tunes_then_confirms_at_the_best_lr(tmp_path, corpus_file, capsys):
    out = tmp_path / "cmp"
    kw = dict(optimizers=("adamw", "scale"), lr_factors=(0.5, 2.0), steps=2, size="tiny",
              corpus=str(corpus_file), preset="minimal", progress=True, seq_len=16,
              batch_size=2, grad_accum=1, eval_batches=1, vocab_size=300,
              model_overrides={"vocab_size": 300}, seeds=3, sweep_seeds=1)
    rows = run_compare(out, **kw)
    results = [json.loads(p.read_text()) for p in (out / "runs").glob("*/result.json")]
    assert len(results) == 2 * 2 + 2 * 2  # the sweep on seed 0, then seeds 1-2 at one lr each
    for name in ("adamw", "scale"):
        seed0 = {r["info"]["lr"]: r["eval_loss"] for r in results
                 if r["info"]["optimizer_name"] == name and r["info"]["seed"] == 0}
        tuned = min(seed0, key=seed0.get)
        confirm = {r["info"]["lr"] for r in results
                   if r["info"]["optimizer_name"] == name and r["info"]["seed"] > 0}
        assert confirm == {tuned}
        row = next(r for r in rows if r["optimizer"] == name)
        assert row["best_lr"] == tuned and row["n_seeds"] == 3
    assert "[8/8]" in capsys.readouterr().out
    with pytest.raises(ValueError, match="sweep_seeds"):
        run_compare(out, **{**kw, "sweep_seeds": 4})
