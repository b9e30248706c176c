"""A user statistic in a few lines: the fraction of gradient entries whose sign opposes the
weight's (weight decay pulls the same way as such a gradient step would push).

    python examples/custom_statistic.py --out runs/custom
"""

from __future__ import annotations

import argparse

import torch

import gradlens
from gradlens.data import build_llama


class SignOpposition(gradlens.LayerStatistic):
    """Fraction of entries with sign(g) = -sign(w): the step moves them away from zero."""

    name = "sign_opposition"
    emits = ("sign_opposition",)

    def compute(self, grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        return (grad * param.detach() < 0).float().mean()


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/custom")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    model = build_llama("tiny", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with gradlens.GradLens(model, opt, logdir=args.out, statistics=[SignOpposition]) as lens:
        g = torch.Generator().manual_seed(0)
        for _ in range(args.steps):
            ids = torch.randint(0, 128, (4, 16), generator=g)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            lens.observe_loss(loss)
            opt.step()
            opt.zero_grad()
    return args.out


if __name__ == "__main__":
    print("wrote", main())
