"""The writer thread: file sinks get every flush, in order, off the training thread; a sink
that raises on it costs that flush, never the training or the writer."""

from __future__ import annotations

import threading
import time
import warnings

import pytest
import torch

from gradlens import GradLens
from gradlens.core.writer import BackgroundWriter
from gradlens.report import load_run
from gradlens.sinks.base import Sink


class _Recording(Sink):
    background = True

    def __init__(self, fail_at: int | None = None) -> None:
        self.steps: list[int] = []
        self.threads: set[str] = set()
        self.fail_at = fail_at

    def write_stats(self, rows) -> None:
        self.threads.add(threading.current_thread().name)
        steps = list(dict.fromkeys(r[0] for r in rows))  # one flush, or several coalesced
        if self.fail_at in steps:
            raise ValueError("a bug in a sink")
        self.steps.extend(steps)

    def write_events(self, events) -> None:
        pass


def _train(lens: GradLens, model: torch.nn.Module, steps: int) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        model(torch.randn(4, 6, generator=g)).square().mean().backward()
        lens.step()
        model.zero_grad()


def test_file_sinks_get_every_flush_in_order_on_the_writer_thread(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    sink = _Recording()
    lens = GradLens(model, logdir=tmp_path, sinks=[sink], preset="minimal", log_every=2)
    _train(lens, model, 10)
    lens.flush(wait=True)  # on disk now, before close
    assert load_run(tmp_path)["step"].max() == 10
    assert sink.steps == [2, 4, 6, 8, 10] and sink.threads == {"gradlens-writer"}
    lens.close()
    df = load_run(tmp_path)
    assert sorted(df["step"].unique()) == [2, 4, 6, 8, 10]


def test_a_sink_that_raises_on_the_writer_loses_that_flush_only(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    sink = _Recording(fail_at=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GradLens(model, sinks=[sink], preset="minimal", log_every=2) as lens:
            _train(lens, model, 8)
    assert sink.steps == [2, 6, 8]
    messages = [str(w.message) for w in caught if "writer thread" in str(w.message)]
    assert len(messages) == 1 and "a bug in a sink" in messages[0]


def test_a_full_queue_coalesces_instead_of_waiting_and_close_drains_it():
    gate = threading.Event()
    written: list[int] = []

    class Slow(_Recording):
        def write_stats(self, rows) -> None:
            gate.wait(5)
            written.extend(r[0] for r in rows)

    writer, sink = BackgroundWriter(max_pending=2), Slow()
    writer.submit(sink, [(1, "l", "hidden", "grad_norm", 1.0)], [], [])
    while writer.backlog:  # until the writer has taken flush 1 (and blocks on it)
        time.sleep(0.01)
    blocked = threading.Thread(target=lambda: [writer.submit(
        sink, [(s, "l", "hidden", "grad_norm", 1.0)], [], []) for s in (2, 3, 4)])
    blocked.start()
    blocked.join(3)
    assert not blocked.is_alive()  # 1 being written, 2 and 3 queued: 4 joins 3, no wait
    assert writer.backlog == 2
    gate.set()
    writer.close()
    assert written == [1, 2, 3, 4] and sink.flushes_coalesced == 1 and sink.rows_dropped == 0


@pytest.mark.parametrize("background", [True, False])
def test_background_io_option_reaches_the_lens(background):
    model = torch.nn.Linear(3, 2)
    lens = GradLens(model, preset="minimal", background_io=background)
    assert (lens._writer is not None) is background
    lens.close()
