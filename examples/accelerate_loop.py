"""An accelerate loop with the lens attached: a small LLaMA, gradient accumulation 2 and
``accelerator.clip_grad_norm_``, on the CPU.

    python examples/accelerate_loop.py --steps 20 --logdir runs/accelerate
    gradlens report runs/accelerate -o runs/accelerate-report

The lens takes the model and the optimizer that ``accelerator.prepare`` returns. accelerate
calls the wrapper's ``optimizer.step()`` at every micro-batch but steps the inner optimizer
only when ``accelerator.sync_gradients``; the lens hooks the inner one, so one lens step is
one real optimizer step. ``grad_norm`` is the clipped gradient the optimizer consumes,
``grad_norm_preclip`` the raw one (the norm ``clip_grad_norm_`` returns).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn

from gradlens import GradLens
from gradlens.data import build_llama


def batches(steps: int, accum: int, micro_batch: int = 4, seq: int = 16, vocab: int = 128,
            seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``steps * accum`` micro-batches of counting sequences (a learnable signal)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps * accum):
        start = torch.randint(0, vocab, (micro_batch, 1), generator=g)
        ids = (start + torch.arange(seq)) % vocab
        out.append({"input_ids": ids, "labels": ids})
    return out


def train(steps: int = 4, accum: int = 2, preset: str = "standard", logdir: str | None = None,
          clip: float = 1.0, seed: int = 0, dtype: torch.dtype = torch.float32,
          probe: Callable[[nn.Module, list[dict]], None] | None = None) -> GradLens:
    """Train and return the (closed) lens. ``probe(model, micro_batches)`` runs at each real
    optimizer step before clipping (the weights of that step; a test's reference)."""
    from accelerate import Accelerator

    torch.manual_seed(seed)
    accelerator = Accelerator(gradient_accumulation_steps=accum, cpu=True)
    model = build_llama("tiny", seed=seed).to(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    window: list[dict] = []
    with GradLens(model, optimizer, logdir=logdir, preset=preset,
                  tensorboard=logdir is not None) as lens:
        for batch in batches(steps, accum, seed=seed):
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)  # divides by gradient_accumulation_steps
                lens.observe_loss(loss.detach() / accum)
                window.append(batch)
                if accelerator.sync_gradients:
                    if probe is not None:
                        probe(model, window)
                    window = []
                    accelerator.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()  # a no-op while accumulating; the lens counts real steps
                optimizer.zero_grad()
    return lens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--preset", default="standard")
    parser.add_argument("--logdir", default="runs/accelerate_loop")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lens = train(args.steps, args.accum, args.preset, args.logdir)
    print(f"{lens.step_count} optimizer steps; wrote {args.logdir}")


if __name__ == "__main__":
    main()
