"""A slow or stalled disk never holds the training back: the writer coalesces (and past its cap
drops, counted) what the disk cannot take, and catches up when the disk does."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from gradlens import GradLens
from gradlens.core.writer import BackgroundWriter
from gradlens.report.load import load_meta, load_run
from gradlens.schema import SpikeEvent
from gradlens.sinks.base import Sink
from gradlens.sinks.memory import MemorySink
from tests.faults._faults import recorded

STALL_S = 10.0  # how long a sink blocks; a step may take at most a tenth of it


class BlockingSink(MemorySink):
    """A background sink whose every flush waits until ``gate`` is set (a stalled disk)."""

    background = True

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.writes = 0

    def flush(self) -> None:
        self.gate.wait(STALL_S)
        self.writes += 1
        super().flush()


def _train(lens: GradLens, model: nn.Module, opt: torch.optim.Optimizer,
           steps: int) -> list[float]:
    """Seconds spent in each ``optimizer.step()`` (the lens finalizes and flushes there)."""
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    times = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        lens.observe_loss(loss)
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
        opt.zero_grad()
    return times


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def test_a_stalled_sink_never_blocks_a_step_and_every_row_lands() -> None:
    torch.set_num_threads(1)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    slow, memory = BlockingSink(), MemorySink()  # memory: written at once, the reference
    lens = GradLens(model, opt, sinks=[slow, memory], preset="minimal", output="2")
    with recorded() as caught:
        t0 = time.perf_counter()
        times = _train(lens, model, opt, 1)
        time.sleep(0.2)  # the writer has taken the first flush and blocks on it
        times += _train(lens, model, opt, 39)
        stalled_for = time.perf_counter() - t0
        assert not slow.gate.is_set() and slow.writes == 0  # all 40 steps ran inside the stall
        assert stalled_for < STALL_S / 2
        assert max(times) < 1.0  # far below the stall: no step waited for the sink
        slow.gate.set()  # the disk catches up
        lens.close()
    assert slow.rows == memory.rows  # every row, in order, nothing dropped
    assert slow.events == memory.events
    assert slow.rows_dropped == 0
    # 40 flushes: the first is being written, 4 wait, the other 35 were coalesced
    assert slow.flushes_coalesced == 40 - 1 - 4
    behind = [str(w.message) for w in caught if "slower than the training" in str(w.message)]
    assert len(behind) == 1 and "BlockingSink" in behind[0]


def test_a_stalled_table_counts_coalesced_flushes_in_run_json(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    # the CSV table: its rows go through the text file seam stalled here (the writer thread's
    # coalescing does not depend on the sink's format)
    lens = GradLens(model, opt, logdir=tmp_path, preset="minimal", tensorboard=False,
                    output="2", table_format="csv")
    table = lens.sinks[0]
    gate = threading.Event()
    write = table.files.write_bytes

    def stalled_write(fh, data):  # the table's file seam: a stalled network filesystem
        gate.wait(STALL_S)
        write(fh, data)

    table.files.write_bytes = stalled_write
    with recorded() as caught:
        times = _train(lens, model, opt, 1)
        time.sleep(0.2)
        times += _train(lens, model, opt, 29)
        assert max(times) < 1.0
        gate.set()
        lens.close()
    meta = load_meta(tmp_path)
    assert meta["finished"] is True and meta["rows_dropped"] == 0
    assert meta["flushes_coalesced"] == 30 - 1 - 4
    df = load_run(tmp_path)
    assert sorted(set(df["step"])) == list(range(1, 31))
    assert meta["rows_written"] == len(df)
    behind = [str(w.message) for w in caught if "slower than the training" in str(w.message)]
    assert len(behind) == 1 and str(tmp_path) in behind[0]


class _Recorder(Sink):
    background = True

    def __init__(self, gate: threading.Event) -> None:
        self.gate, self.rows, self.events = gate, [], []

    def write_stats(self, rows: Sequence) -> None:
        self.rows.extend(rows)

    def write_events(self, events: Sequence[SpikeEvent]) -> None:
        self.events.extend(events)

    def flush(self) -> None:
        self.gate.wait(STALL_S)


def test_past_the_cap_the_oldest_rows_are_dropped_and_counted_events_kept() -> None:
    gate = threading.Event()
    sink = _Recorder(gate)
    writer = BackgroundWriter(max_pending=2, max_rows=10)
    with recorded():
        for step in range(1, 11):  # 10 flushes of 4 rows and one event each
            rows = [(step, f"l{k}", "hidden", "grad_norm", float(k)) for k in range(4)]
            writer.submit(sink, rows, [], [SpikeEvent(step, "l0", "grad_norm", 1.0, 9.0)])
            if step == 1:
                time.sleep(0.2)  # the writer has taken the first flush and blocks on it
        gate.set()
        writer.close()
    # flush 1 went out at once; of the 36 rows waiting, the oldest flushes were dropped to
    # keep at most 10 (whole flushes, the newest kept); every event kept, in order
    assert [r[0] for r in sink.rows] == [1] * 4 + [9] * 4 + [10] * 4
    assert sink.rows_dropped == 40 - 12
    assert [e.step for e in sink.events] == list(range(1, 11))
    assert sink.flushes_coalesced == 10 - 1 - 2


def test_detectors_and_the_guard_act_while_the_sink_is_stalled() -> None:
    """A 1000x gradient at step 30 is flagged and its step skipped by the guard, on device,
    while every write of the run waits on a stalled sink; the event lands when it resumes."""
    from gradlens import SpikeGuard
    from gradlens.optim import GatedOptimizer
    from gradlens.stats import SpikeConfig

    torch.set_num_threads(1)
    model = _model()
    opt = GatedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01))
    slow = BlockingSink()
    lens = GradLens(model, opt, sinks=[slow], preset="minimal", output="2",
                    guard=SpikeGuard("skip"), spikes=SpikeConfig(warmup=10))
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    with recorded():
        for step in range(1, 41):
            # the spike inside the backward (an edit after it would be clipping-like, not raw)
            spike = model[2].weight.register_hook(lambda g: g * 1000.0) if step == 30 else None
            nn.functional.mse_loss(model(x), y).backward()
            if spike is not None:
                spike.remove()
            before = model[2].weight.detach().clone()
            opt.step()
            opt.zero_grad()
            assert torch.equal(model[2].weight, before) == (step == 30)  # skipped, only it
        assert slow.writes == 0  # all of it inside the stall
        slow.gate.set()
        lens.close()
    guarded = [e for e in slow.events if e.kind == "guarded_step"]
    assert [e.step for e in guarded] == [30] and guarded[0].value == 0.0
    assert any(e.step == 30 and e.layer == "2.weight" for e in slow.events
               if e.kind == "grad_norm")
