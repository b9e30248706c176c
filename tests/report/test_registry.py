"""The verdict registry: every kind gets a section, a kind is one file (examples/custom_verdict.py)
and reaches the report's summary, its first section, its own section with its figure, and the
dashboard's Verdicts view with the same cells and words."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from gradlens.report.summary import SUMMARY_COLUMNS
from gradlens.report.verdicts import (
    Verdict,
    VerdictKind,
    compute_verdicts,
    kinds,
    register_verdict,
    unregister_verdict,
)
from tests.report._synth import make_spikes, make_table, write_run
from tests.report.test_summary import report_rows
from tests.tb_plugin.test_routes import client, get

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_verdict.py"
BUILTIN = ["output_highest", "column_spread", "instability", "norm_gns", "critical_batch"]


def _example():
    spec = importlib.util.spec_from_file_location("custom_verdict", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho without ties: Pearson's r of the ranks (numpy only)."""
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def test_the_builtin_kinds_in_report_order():
    assert [k.name for k in kinds()] == BUILTIN
    vs = compute_verdicts(make_table(10).assign(run="r"), make_spikes().assign(run="r"),
                          n_boot=50)
    assert [k for k in dict.fromkeys(v.kind for v in vs)] == BUILTIN
    assert {v.run for v in vs} == {"r"}


def test_every_kind_gets_a_section(built_report):
    md = built_report.markdown.read_text(encoding="utf-8")
    heads = [line[3:] for line in md.splitlines() if line.startswith("## ")]
    titles = [k.title for k in kinds()]
    assert [h for h in heads if h in titles] == titles  # each once, in the registry's order


def test_registering_checks_its_input():
    with pytest.raises(TypeError, match="expects a VerdictKind"):
        register_verdict("loss")
    with pytest.raises(ValueError, match="already registered"):
        register_verdict(VerdictKind("instability", "t", compute=lambda d: []))
    kind = VerdictKind("bad_output", "Bad", compute=lambda d: ["yes"])
    register_verdict(kind)
    try:
        with pytest.raises(TypeError, match="must return Verdict objects"):
            compute_verdicts(make_table(5), only=["bad_output"])
    finally:
        unregister_verdict("bad_output")
    with pytest.raises(ValueError, match="unknown verdict kind 'nope'"):
        compute_verdicts(make_table(5), only=["nope"])


def test_a_verdict_in_one_file_reaches_the_report_and_the_dashboard(tmp_path):
    run = write_run(tmp_path / "runs" / "toy", make_table(30, seed=2), make_spikes(), name="toy")
    ex = _example()
    try:
        html = Path(ex.main([str(run), "-o", str(tmp_path / "report")]))
        assert [k.name for k in kinds()] == [*BUILTIN, "loss_falls"]
    finally:
        unregister_verdict("loss_falls")
    out = html.parent
    md = (out / "report.md").read_text(encoding="utf-8")
    rows = json.loads((out / "verdicts.json").read_text())
    mine = [r for r in rows if r["kind"] == "loss_falls"]
    assert len(mine) == 1 and mine[0]["answer"] == "yes"

    # the numbers, from the table with numpy: the synthetic loss falls at every step
    loss = make_table(30, seed=2).query("stat == 'loss'").sort_values("step")
    rho = _spearman(loss["step"].to_numpy(), loss["value"].to_numpy())
    assert rho == pytest.approx(-1.0) and mine[0]["numbers"]["spearman"] == pytest.approx(rho)
    cells = mine[0]["summary"]
    assert cells["effect size"] == f"{rho:.4g} (Spearman rho)" and cells["fraction of steps"] == "100%"
    # in the report: its summary row, its section with its figure, its plain words first
    want = [cells[k] for k in SUMMARY_COLUMNS]
    assert want in [[c.replace("\\|", "|") for c in r] for r in report_rows(md, "toy")]
    assert "## Did the loss fall?" in md and "figures/loss_falls_toy.png" in md
    assert (out / "figures" / "loss_falls_toy.png").read_bytes()[:4] == b"\x89PNG"
    first = md[md.index("## In short"):md.index("## Runs")]
    assert f"over 30 steps (Spearman rho {rho:.2f})" in first
    assert mine[0]["plain"]["text"] in first

    # in the dashboard: the same cells and the same words
    _, c = client(run.parent)
    code, got = get(c, "/verdicts", run="toy")
    assert code == 200
    shown = [v for v in got["verdicts"] if v["kind"] == "loss_falls"]
    assert [v["summary"] for v in shown] == [cells]
    assert mine[0]["plain"] in got["answers"]
    assert [a["text"] for a in got["answers"]] == [
        r["plain"]["text"] for r in rows if r.get("plain")]


def test_a_kind_sees_only_what_it_needs():
    seen: dict[str, set[str]] = {}

    def compute(data):
        seen["stats"] = set(data.df["stat"])
        return [Verdict("q?", "cannot tell", {}, "r")]

    register_verdict(VerdictKind("needs_loss", "Loss", compute=compute, needs=("loss",)))
    try:
        (v,) = compute_verdicts(make_table(5), only=["needs_loss"])
    finally:
        unregister_verdict("needs_loss")
    assert seen["stats"] == {"loss"} and v.kind == "needs_loss"


def test_the_dashboard_words_an_older_report_with_the_same_registry(built_report, tmp_path):
    """A verdicts.json written before the rows carried summary cells: the plugin computes them
    with the report's registry, equal to the cells a current report stores."""
    rows = [r for r in json.loads(built_report.tables["verdicts_json"].read_text())
            if r["run"] == "scale"]
    run = write_run(tmp_path / "logs" / "scale", make_table(8), None, name="scale")
    old = [{k: v for k, v in r.items() if k not in ("summary", "plain")} | {"run_dir": None}
           for r in rows]
    (run / "verdicts.json").write_text(json.dumps(old))
    _, c = client(run.parent)
    code, got = get(c, "/verdicts", run="scale")
    assert code == 200 and len(got["verdicts"]) == len(rows) > 5
    assert [v["summary"] for v in got["verdicts"]] == [r["summary"] for r in rows]
    assert got["answers"] == []  # an older report has no plain words to show
