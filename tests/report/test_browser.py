"""report.html rendered by headless Chromium: not blank, and its embedded figures decode."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from gradlens.report.build import ReportPaths


def _find_chromium() -> str | None:
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium")


CHROMIUM = _find_chromium()
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None,
                       reason="headless Chromium not found (/usr/bin/chromium or `chromium` on "
                              "PATH); install Debian's chromium to run the browser test"),
]


def _render(html: Path, work: Path) -> tuple[np.ndarray, str]:
    """Screenshot (RGB, 0..255) and serialized DOM of ``html`` after 5 s of virtual time."""
    shot = work / f"{html.stem}.png"
    cmd = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={work / ('profile-' + html.stem)}",
        "--virtual-time-budget=5000", f"--screenshot={shot}", "--dump-dom",
        "--window-size=1200,4000", html.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert shot.is_file(), f"Chromium wrote no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    img = mpimg.imread(shot)[..., :3]
    return np.round(img * 255).astype(np.uint8), proc.stdout


def _colourful(img: np.ndarray) -> float:
    """Fraction of saturated pixels: the page's own CSS has none, the figures have plenty."""
    spread = img.max(axis=2).astype(int) - img.min(axis=2).astype(int)
    return float((spread > 60).mean())


def test_report_renders_with_its_images(built_report: ReportPaths, tmp_path: Path):
    img, dom = _render(built_report.html, tmp_path)
    assert img.shape[:2] == (4000, 1200)  # the figures start below the answers and tables
    nonwhite = float((img.min(axis=2) < 245).mean())
    colours = len(np.unique(img.reshape(-1, 3), axis=0))
    assert nonwhite > 0.05, f"page looks blank: {nonwhite:.3f} non-white"
    assert colours > 500, f"only {colours} distinct colours"

    tags = re.findall(r"<img\b[^>]*>", dom)
    assert len(tags) == len(built_report.figures)
    srcs = [re.search(r'src="([^"]*)"', t).group(1) for t in tags]
    assert all(s.startswith("data:image/png;base64,") and len(s) > 1000 for s in srcs)

    # control: the same page with every image payload removed renders almost no colour
    broken = tmp_path / "broken.html"
    broken.write_text(re.sub(r'src="data:image/png;base64,[^"]*"',
                             'src="data:image/png;base64,"', built_report.html.read_text()))
    img_broken, _ = _render(broken, tmp_path)
    with_images, without = _colourful(img), _colourful(img_broken)
    assert with_images > 0.005 and with_images > 5 * without, (with_images, without)
