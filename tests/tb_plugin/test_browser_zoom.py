"""Server-side zoom in headless Chromium: a step range given to the tab (the page's
``gl_from``/``gl_to``, what typing in the step boxes sets) on a run whose whole view is binned
shows a column per logged step."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from tests.tb_plugin._runs import write_run
from tests.tb_plugin.test_browser import CHROMIUM, _chromium, serving

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                       "(apt-get install chromium)"),
]


def test_a_typed_step_range_shows_single_steps(tmp_path: Path) -> None:
    logdir = tmp_path / "runs"
    write_run(logdir / "long", 12, np.arange(0, 4000, 2))  # 2000 logged steps, 2 apart
    with serving(logdir) as base:
        url = f"{base}/data/plugin_entry.html?name=gradlens"
        full = _chromium(url, tmp_path, tmp_path / "full.png")
        zoom = _chromium(f"{url}&gl_from=1001&gl_to=1200", tmp_path, tmp_path / "zoom.png")
    cols, width = re.search(r'class="gl-heatmap" data-columns="(\d+)" data-width="(\d+)"',
                            full).groups()
    assert int(width) == 16 and int(cols) == 250  # steps 0..3998 in columns of 16 steps
    cols, width = re.search(r'class="gl-heatmap" data-columns="(\d+)" data-width="(\d+)"',
                            zoom).groups()
    # the logged steps 1002, 1004, ..., 1200: 100 of them, one column each
    assert (int(cols), int(width)) == (100, 1)
    assert "steps 1002–1200: 100 columns of 100 logged steps (max per column)" in zoom
