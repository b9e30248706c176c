"""The W&B sink offline: the run's own file (``run-*.wandb``, protobuf records in the leveldb
log format W&B writes) read back and checked against the rows the sink was given."""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

wandb = pytest.importorskip("wandb")

from gradlens import GradLens  # noqa: E402
from gradlens.data import build_llama  # noqa: E402
from gradlens.kinds import layer_kind  # noqa: E402
from gradlens.schema import SpikeEvent  # noqa: E402
from gradlens.sinks import MemorySink  # noqa: E402
from gradlens.sinks.wandb_sink import WandbSink  # noqa: E402

BLOCK = 32768  # leveldb log blocks; each record chunk has a 7-byte header (crc, length, type)


def read_history(run_dir: Path, wait: float = 60.0) -> tuple[dict[int, dict], list[str]]:
    """``({step: {key: value}}, record kinds)`` of the offline run in ``run_dir``, once W&B's
    service process has written the run's ``exit`` record (it writes the file on its own
    after ``finish``; on a busy machine that takes a moment)."""
    deadline = time.monotonic() + wait
    while True:
        steps, kinds = _parse(run_dir)
        if "exit" in kinds or time.monotonic() > deadline:
            return steps, kinds
        time.sleep(0.2)


def _parse(run_dir: Path) -> tuple[dict[int, dict], list[str]]:
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    if len(data) < 7:
        return {}, []
    assert data[:4] == b":W&B"
    pos, buf, kinds, steps = 7, b"", [], {}
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:  # block padding
            pos += left
            continue
        if pos + 7 + n > len(data):  # a record still being written: read again later
            break
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):  # FULL or LAST: one whole record
            rec = pb.Record()
            rec.ParseFromString(buf)
            kinds.append(rec.WhichOneof("record_type"))
            if kinds[-1] == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                       for i in rec.history.item}
                steps.setdefault(int(row["_step"]), {}).update(row)
    return steps, kinds


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


LAYERS = [("model.layers.0.self_attn.q_proj.weight", "attention"),
          ("model.layers.0.self_attn.k_proj.weight", "attention"),
          ("model.layers.0.mlp.up_proj.weight", "mlp"),
          ("model.norm.weight", "vector")]  # an old role name: mapped to norms


def test_scalars_events_and_heatmap_read_back(tmp_path):
    rng = np.random.default_rng(0)
    sink = WandbSink(project="gradlens-test", dir=str(tmp_path), heatmap_every=2,
                     heatmap_steps=3)
    sink.open({"preset": "standard", "optimizer": "AdamW", "layers": []})
    sent = {}
    for step in range(1, 6):
        vals = {n: float(np.exp(rng.normal())) for n, _ in LAYERS}
        sent[step] = vals
        rows = [(step, n, r, "grad_norm", vals[n]) for n, r in LAYERS]
        rows.append((step, "global", "global", "loss", 3.0 / step))
        rows.append((step, "global", "global", "lr/decay", 1e-3 * step))
        sink.write_stats(rows)
        if step == 3:
            sink.write_events([SpikeEvent(3, LAYERS[0][0], "grad_norm", 9.0, 12.0),
                               SpikeEvent(3, "global", "grad_norm_global", 9.0, 11.0)])
        if step % 2 == 0:
            sink.flush()
    sink.close()
    assert sink.images_logged == 2  # steps 2 and 4
    hist, kinds = read_history(tmp_path)
    assert "exit" in kinds and set(hist) >= {1, 2, 3, 4, 5}
    for step, vals in sent.items():
        row = hist[step]
        assert row["gradlens/loss"] == pytest.approx(3.0 / step, rel=1e-12)
        assert row["gradlens/lr/decay"] == pytest.approx(1e-3 * step, rel=1e-12)
        att = np.median([vals[n] for n, k in LAYERS if k == "attention"])
        assert row["gradlens/by_kind/grad_norm/attention"] == pytest.approx(att, rel=1e-12)
        assert row["gradlens/by_kind/grad_norm/mlp"] == pytest.approx(vals[LAYERS[2][0]])
        assert row["gradlens/by_kind/grad_norm/norms"] == pytest.approx(vals[LAYERS[3][0]])
        assert not any(k.startswith("gradlens/grad_norm/") for k in row)  # per_layer off
    assert hist[3]["gradlens/spikes/grad_norm"] == 1
    assert hist[3]["gradlens/spikes/grad_norm_global"] == 1
    assert "gradlens/spikes/grad_norm" not in hist[2]
    images = {s for s, row in hist.items() if row.get("gradlens/heatmap/grad_norm/_type")
              == "image-file"}
    assert images == {2, 4}
    (run_dir,) = tmp_path.glob("wandb/offline-run-*")
    pngs = list((run_dir / "files" / "media" / "images").rglob("*.png"))
    assert len(pngs) == 2
    assert any(r.get("gradlens/spike_events/_type") == "table-file" for r in hist.values())


def test_heatmap_array_groups_layers_by_kind():
    sink = WandbSink(run=object(), heatmap_steps=2)  # no W&B call: the array only
    sink._remember(1, [(1, n, r, "grad_norm", float(i)) for i, (n, r) in enumerate(LAYERS)])
    sink._remember(2, [(2, LAYERS[2][0], "mlp", "grad_norm", 7.0)])
    sink._remember(3, [(3, LAYERS[0][0], "attention", "grad_norm", 5.0)])
    layers, steps, values = sink.heatmap_array()
    assert steps == [2, 3]  # the last heatmap_steps
    assert layers == [LAYERS[0][0], LAYERS[2][0]]
    assert values[0, 1] == 5.0 and values[1, 0] == 7.0 and math.isnan(values[0, 0])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="heatmap_every"):
        WandbSink(heatmap_every=-1)
    with pytest.raises(ValueError, match="not both"):
        WandbSink(run=object(), project="x")


def test_with_the_lens(tmp_path):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build_llama("tiny", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (4, 8))
    memory = MemorySink()
    with GradLens(model, opt, preset="minimal", tensorboard=False,
                  sinks=[memory, WandbSink(project="t", dir=str(tmp_path),
                                           heatmap_every=2)]) as lens:
        for _ in range(4):
            opt.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            lens.observe_loss(loss)
            loss.backward()
            opt.step()
    frame = memory.frame()
    hist, _ = read_history(tmp_path)
    for step in range(1, 5):
        one = frame[frame.step == step]
        loss = one[(one.layer == "global") & (one.stat == "loss")].value.iloc[0]
        assert hist[step]["gradlens/loss"] == pytest.approx(loss, rel=1e-6)
        assert hist[step]["gradlens/lr/0"] == pytest.approx(1e-3)
        g = one[(one.stat == "grad_norm") & (one.layer != "global")]
        mlp = [v for n, r, v in zip(g.layer, g.role, g.value, strict=True)
               if layer_kind(n, r) == "mlp"]
        assert hist[step]["gradlens/by_kind/grad_norm/mlp"] == pytest.approx(np.median(mlp),
                                                                             rel=1e-6)
