"""The TensorBoard dashboards render in a real browser (headless Chromium)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

from gradlens import GradLens
from gradlens.data import build_llama
from gradlens.tensorboard.launcher import start_tensorboard

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                       "(apt-get install chromium; .ci/run installs it)"),
]


def screenshot(url: str, out, tmp_path, budget_ms: int = 15000) -> np.ndarray:
    import matplotlib.image as mpimg

    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         f"--virtual-time-budget={budget_ms}", "--window-size=1400,1800",
         f"--screenshot={out}", url],
        check=True, capture_output=True, timeout=180,
    )
    return mpimg.imread(str(out))[..., :3]


def test_custom_scalar_dashboard_shows_charts(tmp_path):
    model = build_llama("tiny", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run = tmp_path / "run"
    g = torch.Generator().manual_seed(0)
    with GradLens(model, opt, logdir=run, preset="standard") as lens:
        for _ in range(8):
            for _ in range(2):
                ids = torch.randint(0, 128, (2, 16), generator=g)
                loss = model(input_ids=ids, labels=ids).loss / 2
                loss.backward()
                lens.observe_loss(loss)
            opt.step()
            opt.zero_grad()
    proc, url = start_tensorboard(run)
    try:
        assert url.endswith("#gradlens")
        img = screenshot(url.replace("#gradlens", "#custom_scalars"), tmp_path / "dash.png",
                         tmp_path)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    pixels = (img * 255).astype(np.uint8).reshape(-1, 3)
    colours = len(np.unique(pixels, axis=0))
    non_white = float((pixels.min(axis=1) < 240).mean())
    # a blank or error page has a handful of colours; charts with lines and labels have many
    assert colours > 150, colours
    assert non_white > 0.03, non_white
