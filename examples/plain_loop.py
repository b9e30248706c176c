"""A plain PyTorch loop with the lens attached: SCALE on a small LLaMA, gradient accumulation.

    python examples/plain_loop.py --steps 20 --logdir runs/plain
    gradlens report runs/plain -o runs/plain-report
"""

from __future__ import annotations

import argparse

import torch

from gradlens import SCALE, GradLens, scale_param_groups
from gradlens.data import build_llama


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--logdir", default="runs/plain_loop")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = build_llama(args.size)
    vocab = model.config.vocab_size
    optimizer = SCALE(scale_param_groups(model, lr=1e-3, lr_1d=2e-2))
    with GradLens(model, optimizer, logdir=args.logdir, preset="standard") as lens:
        for _ in range(args.steps):
            for _ in range(args.accum):
                ids = torch.randint(0, vocab, (4, 32))
                loss = model(input_ids=ids, labels=ids).loss / args.accum
                loss.backward()
                lens.observe_loss(loss)
            optimizer.step()  # the lens finalizes the step in a pre-hook
            optimizer.zero_grad(set_to_none=True)
    print(f"wrote {args.logdir}")


if __name__ == "__main__":
    main()
