"""Every layer name round-trips through every sink and reader (newlines, carriage returns, tabs,
quotes, commas, unicode, 300 characters), and a parameter named ``global`` is never taken for
the run-level row. Read through the public readers only (``load_run``, ``load_spikes``,
``load_meta``, the plugin's ``RunStore``, the report's tables, TensorBoard's reader)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from gradlens import GradLens
from gradlens.report.load import CorruptLineWarning, load_meta, load_run, load_spikes
from gradlens.schema import GLOBAL, SpikeEvent, tb_tag
from gradlens.sinks.memory import MemorySink
from gradlens.sinks.table import TableSink
from gradlens.tensorboard.plugin.data import RunStore
from gradlens.tensorboard.sink import TensorBoardSink

NAMES = ["line\nbreak", "carriage\rreturn", "crlf\r\nend", "tab\there", 'quote"double',
         "quote'single", "a,b;c", "ünïcødé-层-🙂", "x" * 300, "trailing\n"]
STEPS = 4


class Weird(nn.Module):
    """A root parameter named ``global`` and one Linear per awkward name."""

    def __init__(self) -> None:
        super().__init__()
        self.register_parameter(GLOBAL, nn.Parameter(torch.linspace(0.5, 1.5, 4)))
        for n in NAMES:
            self.add_module(n, nn.Linear(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * getattr(self, GLOBAL)
        for n in NAMES:
            x = torch.tanh(self._modules[n](x))
        return x


EXPECTED = {"." + GLOBAL} | {f"{n}.{p}" for n in NAMES for p in ("weight", "bias")}


def _run(logdir: Path, fmt: str, tensorboard: bool = False) -> MemorySink:
    torch.manual_seed(0)
    model = Weird()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    memory = MemorySink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no output layer in this model
        # per-layer TensorBoard scalars (not the default): every name gets its own tag
        sinks = [memory, TensorBoardSink(logdir, per_layer=True)] if tensorboard else [memory]
        lens = GradLens(model, opt, logdir=logdir, preset="minimal", table_format=fmt,
                        tensorboard=False, sinks=sinks)
        for _ in range(STEPS):
            loss = model(torch.randn(8, 4)).square().mean()
            loss.backward()
            lens.observe_loss(loss)
            opt.step()
            opt.zero_grad()
        lens.close()
    return memory


def _same_rows(df: pd.DataFrame, memory: MemorySink) -> None:
    got = sorted(df[["step", "layer", "role", "stat", "value"]].itertuples(index=False,
                                                                           name=None))
    want = sorted(memory.rows)
    assert [r[:4] for r in got] == [r[:4] for r in want]
    # CSV writes repr(float), JSON lines too, parquet float64: the values come back exactly
    assert all(a[4] == b[4] or (math.isnan(a[4]) and math.isnan(b[4]))
               for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_every_name_round_trips_through_the_table(tmp_path: Path, fmt: str) -> None:
    memory = _run(tmp_path, fmt)
    df = load_run(tmp_path)
    _same_rows(df, memory)
    assert set(df.loc[df["layer"] != GLOBAL, "layer"]) == EXPECTED
    # the run-level rows are the run's own; the parameter named "global" has its own rows
    assert set(df.loc[df["layer"] == GLOBAL, "role"]) == {GLOBAL}
    assert set(df.loc[df["layer"] == GLOBAL, "stat"]) >= {"grad_norm", "loss"}
    assert set(df.loc[df["layer"] == "." + GLOBAL, "role"]) == {"other"}  # a stray 1-D
    assert len(df[(df["layer"] == "." + GLOBAL) & (df["stat"] == "grad_norm")]) == STEPS
    assert {layer["name"] for layer in load_meta(tmp_path)["layers"]} == EXPECTED


def test_a_damaged_line_beside_multiline_names_costs_that_line_only(tmp_path: Path) -> None:
    memory = _run(tmp_path, "csv")
    with (tmp_path / "stats.csv").open("ab") as fh:
        fh.write(b'9,"bad\x00name",hidden,grad_norm,1.0\n')  # the line-by-line reader now
    with pytest.warns(CorruptLineWarning, match="NUL"):
        df = load_run(tmp_path)
    _same_rows(df, memory)


def test_every_name_round_trips_through_the_spike_events(tmp_path: Path) -> None:
    sink = TableSink(tmp_path)
    sink.open({"name": "t"})
    layers = sorted(EXPECTED)
    events = [SpikeEvent(k + 1, name, "grad_norm", 1.5, 9.0, layers=[name, layers[0]])
              for k, name in enumerate(layers)]
    events.append(SpikeEvent(99, GLOBAL, "grad_norm_global", 2.0, 8.0, layers=layers))
    sink.write_events(events)
    sink.close()
    sp = load_spikes(tmp_path).sort_values("step")
    assert list(sp["layer"]) == [*layers, GLOBAL]
    assert [list(v) for v in sp["layers"]] == [[n, layers[0]] for n in layers] + [layers]


def test_every_name_round_trips_through_tensorboard_the_plugin_and_the_report(
        tmp_path: Path) -> None:
    run = tmp_path / "runs" / "weird"
    memory = _run(run, "csv", tensorboard=True)
    ea = EventAccumulator(str(run), size_guidance={"scalars": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    want = {(layer, stat): v for step, layer, _role, stat, v in memory.rows if step == STEPS}
    for (layer, stat), value in want.items():
        tag = tb_tag(stat, layer)
        assert tag in tags, (layer, stat)
        got = [e.value for e in ea.Scalars(tag) if e.step == STEPS]
        assert got == [pytest.approx(value, rel=1e-6, nan_ok=True)]  # float32: 6e-8
    assert tb_tag("grad_norm", GLOBAL) != tb_tag("grad_norm", "." + GLOBAL)

    store = RunStore(tmp_path / "runs")
    (name,) = store.runs()
    heat = store.heatmap(name, "grad_norm")
    assert {row["name"] for row in heat["layers"]} == EXPECTED
    assert next(r for r in store.list_runs() if r["run"] == name)["n_layers"] == len(EXPECTED)

    from gradlens.report.build import build_report

    paths = build_report([run], tmp_path / "report", progress=False)
    ranks = pd.read_csv(paths.tables["rankings"], keep_default_na=False)
    assert set(ranks.loc[ranks["stat"] == "grad_norm", "layer"]) == EXPECTED


def test_a_stray_quote_costs_its_own_line_only(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text('{"name": "t"}')
    good = [f'{s},"multi\nline",hidden,grad_norm,{s}.5\n' for s in range(1, 21)]
    (tmp_path / "stats.csv").write_text(
        "step,layer,role,stat,value\n" + '0,"unclosed,hidden,grad_norm,1.0\n' + "".join(good))
    with pytest.warns(CorruptLineWarning, match="line 2"):
        df = load_run(tmp_path)
    assert list(df["step"]) == list(range(1, 21)) and set(df["layer"]) == {"multi\nline"}
    assert list(df["value"]) == [s + 0.5 for s in range(1, 21)]
