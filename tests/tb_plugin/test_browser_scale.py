"""A signed statistic in the gradlens tab, rendered by headless Chromium: a symmetric-log scale
on a diverging map, zero at its white centre, -x and +x on opposite sides at equal distance."""

from __future__ import annotations

import math
import re
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
from matplotlib import image as mpimg

from tests.tb_plugin._runs import synthetic_layers
from tests.tb_plugin.test_browser import CHROMIUM, _chromium, serving
from tests.tb_plugin.test_scale import signed_values, write_signed_run

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                       "(apt-get install chromium)"),
]

# heatmap.js's DIVERGING (ColorBrewer RdBu reversed): blue, white at 0.5, red
DIVERGING = np.array([[5, 48, 97], [33, 102, 172], [67, 147, 195], [146, 197, 222],
                      [209, 229, 240], [247, 247, 247], [253, 219, 199], [244, 165, 130],
                      [214, 96, 77], [178, 24, 43], [103, 0, 31]], dtype=float)


def _colour(t: float) -> np.ndarray:
    x = min(max(t, 0.0), 1.0) * (len(DIVERGING) - 1)
    i = min(int(x), len(DIVERGING) - 2)
    return np.floor(DIVERGING[i] + (x - i) * (DIVERGING[i + 1] - DIVERGING[i]) + 0.5)


def _symlog(v: float, lt: float) -> float:
    """matplotlib's SymLogNorm transform (base 10, linscale 1)."""
    a = 10 / 9
    return v * a if abs(v) <= lt else math.copysign(lt * (a + math.log10(abs(v) / lt)), v)


def test_a_signed_statistic_gets_a_diverging_symlog_scale(tmp_path: Path) -> None:
    values = signed_values(10, seed=3)
    sig = values["twobatch_signal"]
    lay = [n for n, _ in synthetic_layers(10)]
    a, b, c = 1, 2, 6  # q_proj of block 0, o_proj of block 0, o_proj of block 1
    step, x = 12, 5.0
    sig[[a, b, c], step] = [x, -x, 3 * x]  # +x, -x and a larger value that sets the ends
    write_signed_run(tmp_path / "runs" / "r", values)
    shown = " ".join(lay[i] for i in (a, b, c))
    with serving(tmp_path / "runs") as base:
        shot = tmp_path / "signed.png"
        query = urlencode({"name": "gradlens", "gl_run": "r", "gl_stat": "twobatch_signal",
                           "gl_filter": shown, "gl_from": step, "gl_to": step,
                           "gl_clip": "0,100", "gl_order": "role"})
        dom = _chromium(f"{base}/data/plugin_entry.html?{query}", tmp_path, shot, size="1100,700")
    # one column (the zoomed step), three rows (the filter)
    assert "3 rows shown of 10 tensors" in dom, dom[:3000]
    assert re.findall(r'class="gl-group"[^>]*data-group="([^"]+)"', dom) == ["attention"]
    assert "r · attention (4 layers, symlog scale)" in dom  # the role charts' y axis too
    lt = float(np.median(np.abs(sig)))
    legend = re.search(r"twobatch_signal \(symlog scale, shared, linthresh=([^)]+)\):", dom)
    assert legend and float(legend.group(1)) == pytest.approx(lt, rel=1e-3), dom[-3000:]
    ticks = [float(t) for t in re.findall(r'class="gl-legend-tick"[^>]*>([^<]+)<', dom)]
    assert len(ticks) == 5 and ticks[2] == 0.0
    assert ticks[0] == pytest.approx(-3 * x, rel=1e-3) and ticks[4] == pytest.approx(3 * x, rel=1e-3)
    # the inner ticks sit halfway in the transformed space, symmetric about zero
    assert _symlog(ticks[3], lt) == pytest.approx(_symlog(3 * x, lt) / 2, rel=1e-3)
    assert ticks[1] == pytest.approx(-ticks[3], rel=1e-3)

    # the cells in the screenshot: +x and -x at 0.5 +- f(x) / (2 f(3x)), 3x at the red end
    img = np.round(mpimg.imread(shot)[..., :3] * 255).astype(int)
    half = _symlog(x, lt) / (2 * _symlog(3 * x, lt))
    found = {}
    for name, t in (("+x", 0.5 + half), ("-x", 0.5 - half), ("3x", 1.0)):
        want = _colour(t)
        mask = np.abs(img - want).max(axis=2) <= 3
        rows = np.nonzero(mask.sum(axis=1) >= 30)[0]  # a cell's rows: 40 px wide (the legend
        assert rows.size >= 10, (name, want, mask.sum())  # bar's columns are 1 px wide)
        cols = np.nonzero(mask[rows].any(axis=0))[0]
        found[name] = (want, (cols.min(), cols.max()), (rows.min(), rows.max()))
    (pos, pcols, prows), (neg, ncols, nrows) = found["+x"], found["-x"]
    assert pos[0] > pos[2] and neg[2] > neg[0]  # red above zero, blue below
    assert pcols == ncols and (prows[1] < nrows[0] or nrows[1] < prows[0])  # one column
    assert np.abs(pos - neg).max() > 60
