"""Fixed small runs whose rows, events and histograms are saved as golden files.

``python -m tests.golden._scenarios`` rewrites the files (do that only for an intended
change of a number, and say why in the commit). Each file holds the values, the condition
number of each (``tests/golden/_conditions.py``: how far rounding on another CPU may move it),
the histogram counts that a value near a bucket edge may change, and a header naming the
machine that wrote it (informational). ``test_golden.py`` compares a fresh run with them.

The LLaMA scenarios run HF LLaMA in float64; it computes its RMSNorm and loss in float32, so
their numbers carry float32 rounding. ``f64_mlp`` is a hand-built float64 model (no upcast
anywhere), whose statistics reach the host in float64: held to 1e-9.
The distributed golden runs are the 2-rank DDP and FSDP2 scenarios of ``tests/distributed``.
"""

from __future__ import annotations

import json
import math
import platform
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tests.golden import _conditions as C
from tests.golden._twobatch import two_batch

HERE = Path(__file__).parent
VOCAB = 128
BATCH, SEQ = 4, 12


def _batches(n: int, seed: int, batch: int = BATCH, seq: int = SEQ) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n)]


class MLPLM(nn.Module):
    """A float64 next-token model with no internal upcast: embedding, LayerNorm, a GELU MLP
    with a residual, LayerNorm, an output head. Created in float64: parameters drawn in
    float32 and cast would differ by float32 rounding between kernel paths."""

    def __init__(self, vocab: int = VOCAB, d: int = 32) -> None:
        super().__init__()
        f64 = {"dtype": torch.float64}
        self.embed = nn.Embedding(vocab, d, **f64)
        self.norm1 = nn.LayerNorm(d, **f64)
        self.up = nn.Linear(d, 4 * d, **f64)
        self.down = nn.Linear(4 * d, d, **f64)
        self.norm2 = nn.LayerNorm(d, **f64)
        self.head = nn.Linear(d, vocab, bias=False, **f64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The token-mean next-token cross-entropy of ``ids`` (batch, seq)."""
        h = self.embed(ids)
        h = h + self.down(nn.functional.gelu(self.up(self.norm1(h))))
        logits = self.head(self.norm2(h))
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                           ids[:, 1:].reshape(-1))


def _model(kind: str, seed: int) -> tuple[nn.Module, Any]:
    torch.manual_seed(seed)
    if kind == "mlp64":
        model = MLPLM()
        return model, lambda ids: model(ids)
    from gradlens.data import build_llama

    llama = build_llama("tiny", seed=seed).double()
    return llama, lambda ids: llama(input_ids=ids, labels=ids).loss


def _run(preset: str, micro: int, steps: int, log_every: int, optimizer: str,
         seed: int, model: str = "llama", **options: Any) -> dict[str, Any]:
    from gradlens import SCALE, GradLens, scale_param_groups

    net, loss_of = _model(model, seed)
    if optimizer == "scale":
        opt: torch.optim.Optimizer = SCALE(scale_param_groups(net, lr=1e-2, lr_1d=1e-2))
    else:
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    lens = GradLens(net, opt, preset=preset, log_every=log_every, **options)
    # what each backward pass adds to each tracked gradient, for the float64 reference
    seen: dict[str, list[torch.Tensor]] = {i.name: [] for i in lens.layers}
    hooks = [i.param.register_hook(lambda g, n=i.name: seen[n].append(g.detach().clone()))
             for i in lens.layers]
    data = _batches(steps * micro, seed)
    refs: dict[int, dict[str, Any]] = {}
    units: dict[int, dict[str, torch.Tensor]] = {}
    spam: dict[int, dict[str, torch.Tensor]] = {}
    reduction = options.get("loss_reduction", "mean")
    for s in range(1, steps + 1):
        for name in seen:
            seen[name].clear()
        for k in range(micro):
            loss = loss_of(data[(s - 1) * micro + k]) / micro
            loss.backward()
            lens.observe_loss(loss)
        if s % log_every == 0 and micro > 1:
            refs[s] = {i.name: two_batch(seen[i.name], [BATCH] * micro, reduction, i.layout)
                       for i in lens.layers if seen[i.name]}
        if s % log_every == 0:
            units[s] = {i.name: _unit_rms(i.param.grad, i.layout) for i in lens.layers
                        if i.param.grad is not None and i.layout not in (None, "vector")}
            spam[s] = {i.name: _spam_margins(i.param.grad, opt.state[i.param]["exp_avg_sq"])
                       for i in lens.layers if "exp_avg_sq" in opt.state.get(i.param, {})}
        opt.step()
        opt.zero_grad(set_to_none=True)
    for h in hooks:
        h.remove()
    lens.flush()
    out = snapshot(lens)
    lens.close()
    out["_refs"], out["_units"], out["_spam"] = refs, units, spam
    return out


def _spam_margins(g: torch.Tensor, v: torch.Tensor, theta: float = 5000.0) -> torch.Tensor:
    """Per entry of SPAM's test ``g^2 > theta v`` (``gradlens.stats.spam_fraction``): the
    relative distance from the threshold, ``|v - g^2/theta| / (v + g^2/theta)`` (finite
    entries; ``g = v = 0`` is structural, an embedding row no token used: no hit anywhere)."""
    g, v = g.detach().double(), v.detach().double()
    q = g * g / theta
    m = (v - q).abs() / (v + q)
    keep = torch.isfinite(g) & torch.isfinite(v)
    return torch.nan_to_num(m[keep], nan=math.inf)


def _unit_rms(g: torch.Tensor, layout: str) -> torch.Tensor:
    from gradlens.roles import output_units_view

    u = output_units_view(g.detach().double(), layout)
    return u.pow(2).mean(1).sqrt()


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


# n: the longest reduction in a float32 island (LLaMA's loss over the vocabulary), or for the
# float64 model its longest float64 one (the head's weight gradient over micro x batch x seq
# tokens; see _conditions)
LLAMA = {"n": VOCAB, "u": C.U32}
SCENARIOS: dict[str, dict[str, Any]] = {
    "minimal": dict(preset="minimal", micro=1, steps=3, log_every=1, optimizer="adamw", seed=0),
    "standard_2mb": dict(preset="standard", micro=2, steps=4, log_every=1, optimizer="scale",
                         seed=1),
    "standard_3mb_every2": dict(preset="standard", micro=3, steps=4, log_every=2,
                                optimizer="adamw", seed=2),
    "full_2mb": dict(preset="full", micro=2, steps=4, log_every=1, optimizer="adamw", seed=3),
    "full_2mb_sum": dict(preset="full", micro=2, steps=3, log_every=1, optimizer="scale",
                         seed=4, loss_reduction="sum"),
    # the temporal family keeps float32 buffers by design: off in the float64 scenario
    "f64_mlp": dict(preset="full", micro=3, steps=4, log_every=1, optimizer="adamw", seed=5,
                    model="mlp64", temporal=False),
}
ROUNDING = {name: LLAMA for name in SCENARIOS}
ROUNDING["f64_mlp"] = {"n": 3 * BATCH * SEQ, "u": C.U64}
REL_F64 = 1e-9  # what the float64 scenario is held to (its bound, d(4) kappa, is far below)


def header() -> dict[str, str]:
    """The machine that wrote a golden file (informational: the comparisons do not use it)."""
    return {"torch": torch.__version__,
            "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
            "platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor() or "", "python": platform.python_version(),
            "threads": str(torch.get_num_threads())}


def golden_path(name: str) -> Path:
    return HERE / f"{name}.json"


def run_scenario(name: str) -> dict[str, Any]:
    return _run(**SCENARIOS[name])


def meta(name: str) -> dict[str, Any]:
    opts = SCENARIOS[name]
    return {"noise_ema": opts.get("noise_ema", 0.9), "temporal_beta": 0.9, **ROUNDING[name]}


def golden(name: str, run: dict[str, Any]) -> dict[str, Any]:
    """The golden document of a fresh run: values, condition numbers, histogram slack."""
    m = meta(name)
    slack = {}
    for key, (edges, _) in run["histograms"].items():
        step, layer = key.split("|")
        d = C.drift(int(step), m["n"], m["u"])
        s = C.histogram_slack(run["_units"][int(step)][layer].numpy(), edges, d)
        if any(s):
            slack[key] = s
    # spam_fraction: an entry may cross SPAM's threshold when its relative distance from it
    # is within the move of the difference v - g^2/theta, 2 d (v + g^2/theta)
    spam = {}
    for step, layers in run["_spam"].items():
        d = C.drift(step, m["n"], m["u"])
        for layer, margin in layers.items():
            spam[f"{step}|{layer}|spam_fraction"] = [int((margin <= 2 * d).sum()),
                                                     int(margin.numel())]
    return {"header": header(), "rounding": {"n": m["n"], "u": m["u"]},
            "rows": run["rows"], "cond": C.conditions(run["rows"], run["_refs"], m),
            "events": run["events"], "histograms": run["histograms"], "hist_slack": slack,
            "count_slack": spam}


def write(names: list[str]) -> None:
    torch.set_num_threads(1)
    for name in names:
        doc = golden(name, run_scenario(name))
        doc["cond"] = {k: (v if math.isfinite(v) else repr(v)) for k, v in doc["cond"].items()}
        golden_path(name).write_text(json.dumps(doc, indent=0, sort_keys=True))
        print("wrote", golden_path(name))


if __name__ == "__main__":
    write(sys.argv[1:] or list(SCENARIOS))
