"""The gradlens tab in a real TensorBoard, rendered by headless Chromium, on a real small run."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import image as mpimg

from gradlens import GradLens
from gradlens.data import build_llama
from gradlens.tensorboard.launcher import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                       "(apt-get install chromium)"),
]

# TensorBoard with the plugin listed explicitly: the same plugin the entry point registers,
# so the test does not depend on how the package was installed
_LAUNCH = (
    "import sys; from tensorboard import default, program; "
    "from gradlens.tensorboard.plugin import GradLensPlugin; "
    "ps = [p for p in default.get_plugins() if getattr(p, 'plugin_name', '') != 'gradlens']; "
    "tb = program.TensorBoard(ps + [GradLensPlugin]); "
    "tb.configure(argv=[None, '--logdir', sys.argv[1], '--host', '127.0.0.1', '--port', "
    "sys.argv[2], '--reload_interval', '0']); tb.main()"
)


def _chromium(url: str, work: Path, shot: Path, size: str = "1400,1100") -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={work / ('profile-' + shot.stem)}",
           "--virtual-time-budget=15000", f"--window-size={size}", f"--screenshot={shot}",
           "--dump-dom", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert shot.is_file(), f"no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return proc.stdout


def _small_run(run: Path) -> None:
    torch.manual_seed(0)
    model = build_llama("tiny", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    with GradLens(model, opt, logdir=run, preset="standard", log_every=1) as lens:
        for _ in range(12):
            ids = torch.randint(0, 128, (2, 16), generator=g)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            lens.observe_loss(loss)
            opt.step()
            opt.zero_grad()


@contextlib.contextmanager
def serving(logdir: Path) -> Iterator[str]:
    """TensorBoard with the gradlens plugin on ``logdir``, on a free loopback port: its base
    URL once it answers (90 s at most); stopped on exit."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _LAUNCH, str(logdir), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                with urllib.request.urlopen(f"{base}/data/plugins_listing", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "TensorBoard did not answer"
                time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_gradlens_tab_draws_the_heatmap(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    logdir = tmp_path / "runs"
    _small_run(logdir / "adamw")
    with serving(logdir) as base:
        with urllib.request.urlopen(f"{base}/data/plugins_listing", timeout=10) as r:
            listing = r.read().decode()
        assert '"gradlens"' in listing and '"IFRAME"' in listing
        # the tab inside TensorBoard (the plugin runs in TensorBoard's iframe)
        tab = tmp_path / "tab.png"
        _chromium(f"{base}/#gradlens", tmp_path, tab)
        # the same entry page TensorBoard puts in the iframe, top-level, for its DOM
        entry = tmp_path / "entry.png"
        dom = _chromium(f"{base}/data/plugin_entry.html?name=gradlens", tmp_path, entry,
                        size="1100,900")

    assert 'class="gl-heatmap"' in dom, dom[:2000]
    labels = re.findall(r'class="gl-label"[^>]*data-layer="([^"]+)"', dom)
    assert "lm_head.weight" in labels and "model.embed_tokens.weight" in labels, labels
    ticks = re.findall(r'class="gl-legend-tick"[^>]*>([^<]+)<', dom)
    assert len(ticks) == 3 and all(re.fullmatch(r"[-+0-9.e]+", t) for t in ticks), ticks
    assert "grad_norm (log scale, shared)" in dom
    assert "Role summary" in dom and "Events" in dom and "no report covers this run" in dom

    for shot in (entry, tab):
        img = np.round(mpimg.imread(shot)[..., :3] * 255).astype(np.uint8)
        spread = img.max(axis=2).astype(int) - img.min(axis=2).astype(int)
        saturated = float((spread > 60).mean())  # the colour map; the page chrome is grey
        colours = len(np.unique(img.reshape(-1, 3), axis=0))
        assert saturated > 0.03 and colours > 100, (shot.name, saturated, colours)
    # the heatmap cells vary: not one flat colour
    img = np.round(mpimg.imread(entry)[..., :3] * 255).astype(np.uint8)
    cells = img[120:400, 200:900].reshape(-1, 3)
    assert len(np.unique(cells, axis=0)) > 20
