"""TensorBoardSink under write errors: no exception, no half record, the retried events land."""

from __future__ import annotations

import shutil
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import metadata

from gradlens.schema import tb_tag
from gradlens.tensorboard.sink import TensorBoardSink
from tests.faults._faults import Faults, recorded, write_warnings
from tests.sinks._records import layer_dicts

LAYER = "model.layers.0.self_attn.q_proj.weight"


def _rows(step: int) -> list[tuple[int, str, str, str, float]]:
    return [(step, LAYER, "hidden", "grad_norm", float(step)),
            (step, "lm_head.weight", "output", "grad_norm", 10.0 * step)]


def _scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def test_partial_write_is_cut_back_and_retried(tmp_path: Path) -> None:
    sink = TensorBoardSink(tmp_path, group_aggregates=False, dashboards=False, per_layer=True)
    faults = Faults(sink.files)
    sink.write_stats(_rows(1))
    sink.flush()
    good = sink.event_path.read_bytes()
    faults.mode = "partial"
    with recorded() as caught:
        for step in (2, 3):
            sink.write_stats(_rows(step))
            sink.flush()
    texts = write_warnings(caught)
    assert len(texts) == 1 and str(sink.event_path) in texts[0] and "No space left" in texts[0]
    assert sink.event_path.read_bytes() == good
    faults.mode = None
    sink.write_stats(_rows(4))
    sink.close()
    assert sink.rows_dropped == 0
    assert _scalars(tmp_path, tb_tag("grad_norm", LAYER)) == [(1, 1.0), (2, 2.0), (3, 3.0),
                                                              (4, 4.0)]


def test_backlog_cap_and_loss_at_close_are_counted(tmp_path: Path) -> None:
    sink = TensorBoardSink(tmp_path, group_aggregates=False, dashboards=False, per_layer=True,
                           max_backlog_rows=4)
    faults = Faults(sink.files)
    faults.mode = "write"
    with recorded() as caught:
        for step in (1, 2, 3, 4):
            sink.write_stats(_rows(step))
            sink.flush()
        assert sink.rows_dropped == 4  # steps 1 and 2 (two values each)
        sink.close()
    assert sink.rows_dropped == 8
    assert any("closed with 4 values" in str(w.message) for w in caught)


def test_deleted_run_directory_gets_a_new_file_with_the_layout(tmp_path: Path) -> None:
    run = tmp_path / "run"
    sink = TensorBoardSink(run, per_layer=True)
    sink.open({"layers": layer_dicts()})
    sink.write_stats(_rows(1))
    sink.flush()
    shutil.rmtree(run)
    with recorded() as caught:
        sink.write_stats(_rows(2))
        sink.flush()
    assert len(write_warnings(caught)) == 1
    run.mkdir()
    sink.write_stats(_rows(3))
    sink.close()
    assert _scalars(run, tb_tag("grad_norm", LAYER)) == [(2, 2.0), (3, 3.0)]
    ea = EventAccumulator(str(run), size_guidance={"tensors": 0})
    ea.Reload()
    assert metadata.CONFIG_SUMMARY_TAG in ea.PluginTagToContent(metadata.PLUGIN_NAME)
