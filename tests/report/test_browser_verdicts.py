"""The dashboard's Verdicts view in a real TensorBoard and Chromium: the report's plain words,
what to do next, and a user verdict's summary row, as the report wrote them."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pytest
import torch

from gradlens.report.verdicts import unregister_verdict
from tests.report.test_registry import _example
from tests.tb_plugin.test_browser import CHROMIUM, _chromium, _small_run, serving

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                       "(apt-get install chromium)"),
]


def test_the_verdicts_view_shows_the_reports_words(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    logdir = tmp_path / "runs"
    _small_run(logdir / "adamw")
    try:
        out = Path(_example().main([str(logdir / "adamw"), "-o", str(tmp_path / "report")])).parent
    finally:
        unregister_verdict("loss_falls")
    rows = json.loads((out / "verdicts.json").read_text())
    plain = [r["plain"] for r in rows if r.get("plain")]
    assert plain and any(p["next_step"] for p in plain)
    with serving(logdir) as base:
        dom = _chromium(f"{base}/data/plugin_entry.html?name=gradlens", tmp_path,
                        tmp_path / "entry.png", size="1100,2400")
    for p in plain:
        assert html.escape(p["text"], quote=False) in dom, p["text"]
        if p["next_step"]:
            assert html.escape(p["next_step"], quote=False) in dom
    assert "What to do next:" in dom
    mine = next(r for r in rows if r["kind"] == "loss_falls")
    assert f"<td>{mine['summary']['effect size']}</td>" in dom  # the user verdict's cell
