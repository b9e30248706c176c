"""The command line: demo end to end on a small text, report errors, dashboard errors."""

from __future__ import annotations

import numpy as np
import pandas as pd

from gradlens.cli import main
from gradlens.report import load_run


def test_demo_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRADLENS_CACHE", str(tmp_path / "cache"))
    words = ["thou", "art", "the", "king", "of", "night", "and", "day", "my", "lord"]
    rng = np.random.default_rng(0)
    text = tmp_path / "play.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(words, 3000)) for _ in range(3)))
    out = tmp_path / "demo"
    rc = main(["demo", "--steps", "10", "--corpus", str(text), "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "eval loss" in printed and "report:" in printed
    for name in ("scale", "adamw"):
        table = load_run(out / "runs" / name)
        assert set(table.step) == {5, 10}  # logged every 5 steps
        assert "noise_scale" in set(table.stat)  # two micro-batches per step
        assert any(p.name.startswith("events.out.tfevents") for p in (out / "runs" / name).iterdir())
    html = (out / "report" / "report.html").read_text()
    assert "data:image/png;base64" in html and "scale" in html and "adamw" in html
    # the printed dashboard command (logdir runs/) finds the demo's report and its verdicts
    assert f"gradlens dashboard {out / 'runs'}" in printed
    from gradlens.tensorboard.plugin.data import RunStore

    found = RunStore(out / "runs").verdicts("scale")
    assert found["source"] == str((out / "report" / "verdicts.json").resolve())
    assert found["verdicts"] and all("summary" in v for v in found["verdicts"])
    # the report's header shows the run's settings
    runs = pd.read_csv(out / "report" / "runs.csv").set_index("run")
    assert runs.loc["adamw", "optimizer"].startswith("AdamW lr=")
    assert runs.loc["adamw", "learning rate"].startswith("0: ")


def test_report_and_dashboard_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing"), "-o", str(tmp_path / "out")]) == 2
    assert "error" in capsys.readouterr().err
    assert main(["dashboard", str(tmp_path / "missing")]) == 2
