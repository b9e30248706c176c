"""Fixed small runs whose rows, events and histograms are saved as golden files.

``python -m tests.golden._scenarios`` rewrites the files (do that only for an intended
change of a number, and say why in the commit); ``test_golden.py`` compares a fresh run with
them to 1e-6 relative, NaN where NaN. The distributed golden runs are the 2-rank DDP and
FSDP2 scenarios of ``tests/distributed`` (their rows are compared in that module).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
VOCAB = 128


def _batches(n: int, seed: int, batch: int = 4, seq: int = 12) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n)]


def _run(preset: str, micro: int, steps: int, log_every: int, optimizer: str,
         seed: int, **options: Any) -> dict[str, Any]:
    from gradlens import SCALE, GradLens, scale_param_groups
    from gradlens.data import build_llama

    torch.manual_seed(seed)
    model = build_llama("tiny", seed=seed).double()
    if optimizer == "scale":
        opt: torch.optim.Optimizer = SCALE(scale_param_groups(model, lr=1e-2, lr_1d=1e-2))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    lens = GradLens(model, opt, preset=preset, log_every=log_every, **options)
    data = _batches(steps * micro, seed)
    for s in range(steps):
        for k in range(micro):
            ids = data[s * micro + k]
            loss = model(input_ids=ids, labels=ids).loss / micro
            loss.backward()
            lens.observe_loss(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
    lens.flush()
    out = snapshot(lens)
    lens.close()
    return out


def snapshot(lens: Any) -> dict[str, Any]:
    """Rows, events and histograms of a memory-sink lens as JSON-able data."""
    mem = lens.memory
    rows = {f"{int(s)}|{layer}|{stat}": _num(v) for s, layer, _, stat, v in mem.rows}
    events = sorted([e.step, e.layer, e.kind, _num(e.value), _num(e.score)] for e in mem.events)
    hists = {f"{h.step}|{h.layer}": [list(map(_num, h.edges)), list(map(_num, h.counts))]
             for h in mem.histograms}
    return {"rows": rows, "events": events, "histograms": hists}


def _num(v: float) -> float | str:
    v = float(v)
    return repr(v) if not math.isfinite(v) else v


SCENARIOS: dict[str, dict[str, Any]] = {
    "minimal": dict(preset="minimal", micro=1, steps=3, log_every=1, optimizer="adamw", seed=0),
    "standard_2mb": dict(preset="standard", micro=2, steps=4, log_every=1, optimizer="scale",
                         seed=1),
    "standard_3mb_every2": dict(preset="standard", micro=3, steps=4, log_every=2,
                                optimizer="adamw", seed=2),
    "full_2mb": dict(preset="full", micro=2, steps=4, log_every=1, optimizer="adamw", seed=3),
    "full_2mb_sum": dict(preset="full", micro=2, steps=3, log_every=1, optimizer="scale",
                         seed=4, loss_reduction="sum"),
}


def golden_path(name: str) -> Path:
    return HERE / f"{name}.json"


def run_scenario(name: str) -> dict[str, Any]:
    return _run(**SCENARIOS[name])


def write(names: list[str]) -> None:
    torch.set_num_threads(1)
    for name in names:
        golden_path(name).write_text(json.dumps(run_scenario(name), indent=0, sort_keys=True))
        print("wrote", golden_path(name))


if __name__ == "__main__":
    write(sys.argv[1:] or list(SCENARIOS))
