"""What the lens leaves in a run directory, and AMP's GradScaler."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from gradlens import GradLens
from gradlens.data import build_llama
from gradlens.report import load_meta, load_run, load_spikes
from gradlens.schema import tb_group_tag, tb_tag

VOCAB = 128


def _data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (4, 16), generator=g) for _ in range(n)]


def test_run_directory_contents(tmp_path):
    model = build_llama("tiny", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run = tmp_path / "run"
    with GradLens(model, opt, logdir=run, preset="full", log_every=2, name="adamw-run") as lens:
        for ids in _data(6):
            for half in (ids[:2], ids[2:]):
                loss = model(input_ids=half, labels=half).loss / 2
                loss.backward()
                lens.observe_loss(loss)
            opt.step()
            opt.zero_grad()
    df = load_run(run)
    assert sorted(df.step.unique()) == [2, 4, 6]
    assert list(df.columns[:5]) == ["step", "layer", "role", "stat", "value"]
    for stat in ("grad_norm", "unit_rms_gini", "noise_scale", "pe_trace", "temporal_var",
                 "spam_fraction", "loss"):
        assert stat in set(df.stat), stat
    out = df[(df.layer == "lm_head.weight")]
    assert set(out.role) == {"output"}
    meta = load_meta(run)
    assert meta["name"] == "adamw-run" and meta["preset"] == "full"
    assert meta["optimizer"] == "AdamW"
    roles = {layer["name"]: layer["role"] for layer in meta["layers"]}
    assert roles["model.embed_tokens.weight"] == "embedding"
    assert meta["finished"] is True
    assert len(load_spikes(run)) == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    # no tag per (layer, statistic) by default: run-level and per-group scalars
    assert tb_tag("grad_norm", "lm_head.weight") not in tags["scalars"]
    assert tb_tag("loss", "global") in tags["scalars"]
    assert any("unit_rms_hist" in t for t in tags["histograms"])
    tb = acc.Scalars(tb_group_tag("grad_norm", "output", "max"))  # lm_head alone in its group
    table = out[out.stat == "grad_norm"].sort_values("step")
    np.testing.assert_allclose([e.value for e in tb], table.value.to_numpy(), rtol=1e-6)


def _amp_run(scale: float | None, inject_inf_at: int | None = None):
    model = build_llama("tiny", seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
    lens = GradLens(model, opt, preset="standard", scaler=scaler)
    for step, ids in enumerate(_data(4, seed=2), start=1):
        for half in (ids[:2], ids[2:]):
            loss = model(input_ids=half, labels=half).loss / 2
            (scaler.scale(loss) if scaler else loss).backward()
        if step == inject_inf_at:
            model.lm_head.weight.grad[0, 0] = math.inf
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad()
    lens.flush()
    df = lens.memory.frame()
    events = lens.memory.events
    lens.close()
    return df, events


def test_grad_scaler_statistics_describe_unscaled_gradients():
    plain, _ = _amp_run(None)
    scaled, _ = _amp_run(2.0**12)
    for stat in ("grad_norm", "twobatch_trace", "unit_rms_cv"):
        a = plain[plain.stat == stat].sort_values(["step", "layer"]).value.to_numpy()
        b = scaled[scaled.stat == stat].sort_values(["step", "layer"]).value.to_numpy()
        np.testing.assert_allclose(a, b, rtol=1e-4, err_msg=stat)


def test_grad_scaler_skipped_step_is_an_event():
    df, events = _amp_run(2.0**12, inject_inf_at=2)
    kinds = {(e.step, e.kind) for e in events}
    assert (2, "skipped_step") in kinds
    assert (2, "nonfinite") in kinds
    skipped = df[(df.stat == "skipped_step")]
    assert list(skipped.step) == [2]
    assert sorted(df.step.unique()) == [1, 2, 3, 4]


@pytest.mark.parametrize("preset", ["minimal", "standard", "full"])
def test_presets_write_what_they_promise(preset):
    model = build_llama("tiny", seed=3)
    lens = GradLens(model, preset=preset)
    for ids in _data(2):
        for half in (ids[:2], ids[2:]):
            (model(input_ids=half, labels=half).loss / 2).backward()
        lens.step()
        model.zero_grad()
    lens.flush()
    written = set(lens.memory.frame().stat)
    promised = set(lens.config.stat_names())
    optional = {"loss", "loss_z", "spam_fraction", "grad_norm_preclip", "skipped_step"}
    assert promised - optional <= written | {"microbatches"}, promised - optional - written
    assert written <= promised | {"microbatches"}
    assert ("pe_trace" in written) == (preset == "full")
    assert ("unit_rms_cv" in written) == (preset != "minimal")
    json.dumps(lens.config.stat_names())
    lens.close()
