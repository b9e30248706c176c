"""The plugin's Verdicts view and the report show the same cells for the same verdicts, and
the plugin finds a report written outside TensorBoard's logdir (the demo's layout)."""

from __future__ import annotations

import json

from gradlens.report.summary import SUMMARY_COLUMNS
from tests.tb_plugin.test_routes import client, get


def report_rows(md: str, run: str) -> list[list[str]]:
    """The summary table's rows of ``run`` in report.md (cells after the run column)."""
    head = "| run | " + " | ".join(SUMMARY_COLUMNS) + " |"
    lines = md.splitlines()
    start = lines.index(head) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == run:
            rows.append(cells[1:])
    return rows


def test_plugin_shows_the_report_cells(built_report, two_runs):
    logdir = two_runs[0].parent  # gradlens dashboard <runs>: the report is not under it
    assert built_report.out_dir.resolve() not in logdir.resolve().parents
    _, c = client(logdir)
    code, got = get(c, "/verdicts", run="scale")
    assert code == 200 and got["source"] == str(built_report.tables["verdicts_json"].resolve())
    shown = [[v["summary"][k] for k in SUMMARY_COLUMNS] for v in got["verdicts"]
             if v["answer"] != "not computable"]
    md = built_report.markdown.read_text(encoding="utf-8")
    want = report_rows(md, "scale")
    assert len(want) >= 5
    assert [[cell.replace("\\|", "|") for cell in row] for row in want] == shown
    # the column-spread verdict with a per-step test: the p-value shown is that test's
    spread = [v for v in got["verdicts"] if v["kind"] == "column_spread"
              and "p_steps" in v["numbers"] and v["numbers"].get("test") != "kruskal"]
    assert spread  # one embedding and one output layer: the per-step test decides
    for v in spread:
        p = v["numbers"]["p_steps"]
        assert v["summary"]["p-value"] == (f"{p:.2g}" if p >= 1e-4 else "< 1e-4")


def test_each_run_records_its_report(built_report, two_runs):
    for run in two_runs:
        pointers = json.loads((run / "reports.json").read_text())
        assert pointers[-1] == str(built_report.tables["verdicts_json"].resolve())
