"""Per-example statistics for a custom module: a muP-style scaled Linear registers its rule.

A ``Linear`` subclass with its own ``forward`` (here ``y = multiplier * (x W^T + b)``) is not
what the built-in per-example kernel assumes, so by default its layer is NaN with a reason.
Its rule says how the per-example gradient factors: ``dL_b/dW = sum_t (m d_bt) x_bt^T`` and
``dL_b/db = sum_t m d_bt``, from the forward's input ``x`` and the output gradient ``d``. The
lens then checks the rule on every logged step (the decomposition self-check).

    python examples/mup_linear.py
"""

from __future__ import annotations

import torch
from torch import nn

import gradlens
from gradlens.families.per_example_rules import Outer, Summed


class ScaledLinear(nn.Linear):
    """``multiplier * linear(x)`` (muP's output multiplier, inside the module)."""

    def __init__(self, fan_in: int, fan_out: int, multiplier: float = 0.4) -> None:
        super().__init__(fan_in, fan_out)
        self.multiplier = multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.multiplier


def scaled_linear_rule(module: ScaledLinear, x: torch.Tensor, d: torch.Tensor) -> dict:
    """The per-example factors of ScaledLinear's parameters."""
    d = d * module.multiplier
    return {"weight": Outer(x, d), "bias": Summed(d)}


def register(replace: bool = False) -> None:
    gradlens.register_per_example_rule(ScaledLinear, scaled_linear_rule, replace=replace)


def unregister() -> None:
    gradlens.unregister_per_example_rule(ScaledLinear)


def brute_force_trace(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      param: torch.Tensor) -> float:
    """``(mean_b ||g_b||^2 - ||G||^2) / (1 - 1/B)`` from one backward per example."""
    B = x.shape[0]
    per = []
    for b in range(B):
        loss = nn.functional.mse_loss(model(x[b:b + 1]), y[b:b + 1])
        per.append(torch.autograd.grad(loss, param)[0])
    G = torch.stack(per).mean(0)
    m = torch.stack([g.square().sum() for g in per]).mean()
    return float((m - G.square().sum()) / (1 - 1 / B))


def main() -> dict[str, tuple[float, float]]:
    torch.manual_seed(0)
    register(replace=True)
    model = nn.Sequential(ScaledLinear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    x, y = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    lens = gradlens.GradLens(model, preset="full", noise_ema=0.0)
    nn.functional.mse_loss(model(x), y).backward()
    lens.step()
    lens.flush()
    df = lens.memory.frame()
    lens.close()
    out = {}
    for name, p in model.named_parameters():
        got = df[(df.layer == name) & (df.stat == "pe_trace")].value
        out[name] = (float(got.iloc[0]), brute_force_trace(model, x, y, p))
        print(f"{name:10s} pe_trace {out[name][0]:.6g}   brute force {out[name][1]:.6g}")
    unregister()
    return out


if __name__ == "__main__":
    main()
