"""FSDP2 (``fully_shard``) under torchrun: SCALE and the lens on sharded parameters.

    torchrun --nproc_per_node 2 examples/torchrun_fsdp2.py --steps 20 --logdir runs/fsdp2
    gradlens report runs/fsdp2 -o runs/fsdp2-report

gloo on the CPU when there is no CUDA device, NCCL with one GPU per rank otherwise. Every
decoder layer and the root are sharded on dim 0, so parameters and gradients are ``DTensor``
shards. SCALE updates the local shards and all-reduces only the embedding's per-feature sums of
squares (its normalization axis, the vocabulary, is the sharded one). The lens logs global
statistics: partial norms, per-unit vectors and micro-batch sums of every rank go into one
all-reduce per logged step; the micro-batch hooks sit on FSDP2's unsharded parameters, so the
two-batch noise scale works as under DDP. ``--bf16`` computes in bfloat16
(``MixedPrecisionPolicy``); the lens accumulates in float32 either way. Only rank 0 writes.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from gradlens import SCALE, GradLens, scale_param_groups
from gradlens.data import build_llama


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--batch", type=int, default=4, help="rows per rank and micro-batch")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--size", default="tiny", help="tiny | small | 60m | ...")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-1d", type=float, default=2e-2)
    parser.add_argument("--log-every", type=int, default=1)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 compute (mixed precision)")
    parser.add_argument("--logdir", default="runs/torchrun_fsdp2")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        model = build_llama(args.size, seed=0).to(device)  # same weights on every rank
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if args.bf16 else None,
                                      reduce_dtype=torch.float32 if args.bf16 else None)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)  # embedding, final norm, lm_head
        # build the optimizer and the lens after sharding: they hold the DTensor parameters
        optimizer = SCALE(scale_param_groups(model, lr=args.lr, lr_1d=args.lr_1d))
        vocab = model.config.vocab_size
        rows = torch.Generator().manual_seed(1000 + rank)  # each rank draws its own rows
        with GradLens(model, optimizer, logdir=args.logdir, preset="standard",
                      log_every=args.log_every, meta={"strategy": "fsdp2"}) as lens:
            for _ in range(args.steps):
                for k in range(args.accum):
                    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=rows)
                    ids = ids.to(device)
                    # reduce-scatter on the last micro-batch only (FSDP2's no_sync)
                    model.set_requires_gradient_sync(k == args.accum - 1)
                    loss = model(input_ids=ids, labels=ids).loss / args.accum
                    loss.backward()
                    lens.observe_loss(loss)
                optimizer.step()  # the lens finalizes the step in a pre-hook
                optimizer.zero_grad(set_to_none=True)
        if rank == 0:
            print(f"wrote {args.logdir} ({world} ranks x {args.accum} x {args.batch} rows, "
                  f"{args.steps} steps)")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
