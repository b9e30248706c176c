"""The torchrun examples, two ranks on gloo, a couple of steps: they must write a run that
``gradlens.report`` reads, with global statistics and noise scales from the ranks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from gradlens.report import load_meta, load_run

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="needs torch.distributed with gloo"),
    pytest.mark.slow,  # ~25 s each: three interpreters import torch and transformers
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("script, extra", [("torchrun_ddp.py", ["--accum", "2"]),
                                           ("torchrun_fsdp2.py", [])])
def test_torchrun_example_writes_a_run(script, extra, tmp_path):
    logdir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(ROOT / "examples" / script), "--steps", "2", "--logdir", str(logdir), *extra]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    df = load_run(logdir)
    assert sorted(df.step.unique()) == [1, 2]
    stats = set(df.stat)
    assert {"grad_norm", "unit_rms_cv", "fan_rms_cv", "loss", "twobatch_trace",
            "noise_scale"} <= stats
    assert df[df.stat == "grad_norm"].value.notna().all()
    assert load_meta(logdir)["world_size"] == 2
