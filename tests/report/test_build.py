"""build_report on synthetic run directories: every file, self-contained HTML, clear errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from gradlens.report.build import ReportPaths, build_report
from gradlens.schema import VARIANCE_ESTIMATORS
from tests.report._synth import make_spikes, make_table, write_run

PNG = b"\x89PNG\r\n\x1a\n"


def test_every_file_is_written(built_report: ReportPaths):
    p = built_report
    assert p.problems == ()
    for f in p.files:
        assert f.is_file() and f.stat().st_size > 0, f
    assert "ranking_twobatch_trace_adamw" not in p.figures  # AdamW run has no two-batch trace
    for key in ("loss", "compare_grad_norm", "compare_noise_scale", "compare_unit_rms_cv",
                "ranking_noise_scale_scale", "ranking_twobatch_trace_scale",
                "heatmap_grad_norm_scale", "heatmap_noise_scale_adamw",
                "heatmap_unit_rms_cv_scale", "spread_unit_rms_cv", "spikes_scale",
                "spikes_adamw"):
        assert key in p.figures, key
        assert p.figures[key].read_bytes()[:8] == PNG
    assert set(p.tables) >= {"verdicts", "rankings", "role_spread", "spikes", "runs"}


def test_tables_hold_both_runs(built_report: ReportPaths):
    t = built_report.tables
    verdicts = pd.read_csv(t["verdicts"])
    assert set(verdicts["run"]) == {"scale", "adamw"}
    # estimators, 3 column stats, instability, norm-layer GNS, critical batch size
    per_run = len(VARIANCE_ESTIMATORS) + 3 + 1 + 2
    assert len(verdicts) == 2 * per_run
    ns = verdicts[(verdicts["stat"] == "noise_scale") & (verdicts["run"] == "scale")].iloc[0]
    assert ns["answer"] == "yes"
    assert json.loads(ns["numbers"])["fraction_first"] == pytest.approx(0.9)
    rankings = pd.read_csv(t["rankings"])
    top = rankings[(rankings["rank"] == 1) & (rankings["stat"] == "noise_scale")]
    assert set(top["label"]) == {"lm_head"} and len(top) == 2
    spikes = pd.read_csv(t["spikes"])
    assert len(spikes) == 4 and set(spikes["run"]) == {"scale"}
    assert spikes.loc[spikes["step"] == 7, "layers"].iloc[0] == (
        "lm_head.weight;model.layers.1.mlp.down_proj.weight")
    runs = pd.read_csv(t["runs"])
    assert list(runs["run"]) == ["scale", "adamw"] and list(runs["optimizer"]) == ["SCALE",
                                                                               "AdamW"]
    spread = pd.read_csv(t["role_spread"])
    assert set(spread["role"]) == {"embedding", "attention", "mlp", "output"}  # kinds (old roles mapped)


def test_html_is_self_contained(built_report: ReportPaths):
    text = built_report.html.read_text(encoding="utf-8")
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', text)
    assert len(srcs) == len(built_report.figures)
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    lowered = text.lower()
    for needle in ("http://", "https://", "<link", "<script", "@import", "url(", "href=",
                   "file://"):
        assert needle not in lowered, needle
    assert "<table" in text and "Does the output layer have the highest" in text


def test_markdown_links_the_pngs(built_report: ReportPaths, two_runs):
    md = built_report.markdown.read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == sorted(f"figures/{k}.png" for k in built_report.figures)
    for link in links:
        assert (built_report.out_dir / link).is_file()
    # computed verdicts: one row each with effect size, p-value and fraction of steps
    assert "| run | question | answer | effect size | p-value | fraction of steps |" in md
    rows = [line for line in md.splitlines()
            if line.startswith("| scale | Is the output layer's noise_scale")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    v = next(v for v in json.loads(built_report.tables["verdicts_json"].read_text())
             if v["run"] == "scale" and v["stat"] == "noise_scale")
    assert cells[2] == v["answer"] == "yes"
    assert cells[3] == f"{v['numbers']['rank_biserial']:.4g} (rank-biserial)"
    assert cells[5] == f"{100 * v['numbers']['fraction_first']:.0f}%" == "90%"
    assert v["run_dir"] == str(two_runs[0].resolve())
    # the ones that could not be computed: one line, saying why
    line = next(x for x in md.splitlines() if x.startswith("Not computable: "))
    assert "pe_trace, pe_noise_scale, pe_var_per_element (per-example estimators: need preset full)" in line
    assert "not computable" not in "".join(r for r in md.splitlines() if r.startswith("| scale | Is"))
    # the paper's claim, estimator by estimator: noise_scale says yes in both runs
    assert "| scale | size-fair | noise_scale |  |  | 8 |" in md
    assert "| adamw | raw |  |  |  | 3 |" in md  # AdamW run has no two-batch trace


def test_single_run_minimal_progress_and_title(tmp_path, capsys):
    run = write_run(tmp_path / "bare", make_table(8, estimators=(), columns=False), None,
                    name="bare", preset="minimal")
    p = build_report(str(run), tmp_path / "out", title="Bare <run>", progress=True)
    assert "report figures" in capsys.readouterr().err  # the tqdm bar
    text = p.html.read_text()
    assert "<title>Bare &lt;run&gt;</title>" in text
    assert set(p.figures) == {"loss", "compare_grad_norm", "heatmap_grad_norm_bare",
                              "spikes_bare"}
    verdicts = pd.read_csv(p.tables["verdicts"])
    assert (verdicts.loc[verdicts["kind"] == "output_highest", "answer"]
            == "not computable").all()
    assert verdicts.loc[verdicts["kind"] == "instability", "answer"].iloc[0] == "no"


def test_duplicate_run_names_are_kept_apart(tmp_path):
    from gradlens.report.build import _load_runs

    df = make_table(6, estimators=())
    a = write_run(tmp_path / "a", df, make_spikes(), name="same")
    b = write_run(tmp_path / "b", df, None, name="same")
    assert [r.label for r in _load_runs([a, b])] == ["same", "same-2"]
    c = write_run(tmp_path / "c", df, None, name="x y")
    d = write_run(tmp_path / "d", df, None, name="x_y")
    assert [r.slug for r in _load_runs([c, d])] == ["x_y", "x_y-2"]  # distinct figure files


def test_empty_run_list_raises(tmp_path):
    with pytest.raises(ValueError, match="at least one run directory"):
        build_report([], tmp_path / "out")


def test_unwritable_out_dir_raises(tmp_path, two_runs):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="not a directory"):
        build_report(two_runs, blocker)
    with pytest.raises(ValueError, match="cannot write the report"):
        build_report(two_runs, blocker / "sub")
    assert not Path(blocker / "sub").exists()
