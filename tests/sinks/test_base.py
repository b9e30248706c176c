"""The sink interface: layer groups, Histogram, log directories, MultiSink, lifecycle."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gradlens.schema import LAYER_GROUPS
from gradlens.sinks.base import (
    Histogram,
    LogdirError,
    MultiSink,
    Sink,
    ensure_writable_dir,
    layer_group,
)
from gradlens.sinks.memory import MemorySink
from tests.sinks._records import GROUPS, LAYERS


@pytest.mark.parametrize(
    ("name", "role", "group"),
    [
        ("model.embed_tokens.weight", "embedding", "embedding"),
        ("lm_head.weight", "output", "output"),
        ("model.layers.3.self_attn.o_proj.weight", "hidden", "attention"),
        ("model.layers.3.mlp.gate_proj.weight", "hidden", "mlp"),
        ("model.layers.3.post_attention_layernorm.weight", "vector", "norms"),
        ("model.norm.weight", "vector", "norms"),
        ("transformer.h.0.attn.c_proj.weight", "hidden", "attention"),
        ("transformer.h.0.mlp.c_proj.bias", "vector", "mlp"),
        ("transformer.h.0.ln_2.bias", "vector", "norms"),
        ("transformer.wpe.weight", "embedding", "embedding"),
        ("layers.1.attention.wq.weight", "hidden", "attention"),
        ("layers.1.feed_forward.w2.weight", "hidden", "mlp"),
        ("block.0.layer.1.DenseReluDense.wo.weight", "hidden", "mlp"),
        ("encoder.proj.weight", "hidden", "other"),
        ("global", "global", "other"),
    ],
)
def test_layer_group(name: str, role: str, group: str) -> None:
    assert layer_group(name, role) == group
    assert group in LAYER_GROUPS


def test_layer_group_of_the_shared_layers() -> None:
    for name, role, _, _ in LAYERS:
        assert layer_group(name, role) == GROUPS[name]


def test_histogram_layouts() -> None:
    edges = Histogram(1, "w", "unit_rms_hist", [0.0, 1.0, 2.0], [3.0, 4.0])
    limits = Histogram(1, "w", "unit_rms_hist", [1.0, 2.0], [3.0, 4.0])
    assert edges.bucket_limits == limits.bucket_limits == [1.0, 2.0]
    with pytest.raises(ValueError, match="n \\+ 1 bin edges or n right limits"):
        Histogram(1, "w", "unit_rms_hist", [0.0, 1.0, 2.0, 3.0], [3.0, 4.0])
    with pytest.raises(ValueError, match="moments"):
        Histogram(1, "w", "unit_rms_hist", [1.0], [3.0], moments=[0.0, 1.0])


def test_ensure_writable_dir_creates_parents(tmp_path: Path) -> None:
    p = ensure_writable_dir(tmp_path / "a" / "b")
    assert p.is_dir() and not list(p.iterdir())  # the probe file is gone


def test_ensure_writable_dir_refuses_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(LogdirError, match="not a directory"):
        ensure_writable_dir(f)
    with pytest.raises(LogdirError, match="cannot create"):
        ensure_writable_dir(f / "run")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_ensure_writable_dir_refuses_a_read_only_dir(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(LogdirError, match="not writable"):
            ensure_writable_dir(ro)
    finally:
        ro.chmod(0o700)


class _Failing(MemorySink):
    def close(self) -> None:
        super().close()
        raise OSError("disk gone")


def test_multisink_fans_out_and_closes_every_sink(rows, events, meta) -> None:
    a, b, c = MemorySink(), _Failing(), MemorySink()
    multi = MultiSink([a, b, c])
    multi.open(meta)
    multi.write_stats(rows)
    multi.write_events(events)
    multi.write_histograms([Histogram(1, "w", "h", [0.0, 1.0], [2.0])])
    multi.flush()
    for s in (a, b, c):
        assert s.rows == rows and s.events == events and len(s.histograms) == 1
        assert s.meta["name"] == "test" and s.flushes == 1
    with pytest.raises(OSError, match="disk gone"):
        multi.close()
    assert a.closed and b.closed and c.closed
    multi.close()  # idempotent, does not raise again


def test_closed_sink_refuses_writes_and_closes_twice(rows) -> None:
    with MemorySink() as s:
        s.write_stats(rows)
    assert s.closed
    s.close()
    with pytest.raises(RuntimeError, match="closed"):
        s.write_stats(rows)
    with pytest.raises(RuntimeError, match="closed"):
        s.flush()


def test_sink_is_abstract() -> None:
    with pytest.raises(TypeError):
        Sink()  # type: ignore[abstract]


def test_ensure_writable_dir_refuses_when_no_file_can_be_created(tmp_path: Path,
                                                                 monkeypatch) -> None:
    import gradlens.sinks.base as base

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(base.tempfile, "mkstemp", denied)
    with pytest.raises(LogdirError, match="not writable: Permission denied"):
        ensure_writable_dir(tmp_path)
