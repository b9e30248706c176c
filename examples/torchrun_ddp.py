"""DDP under torchrun: SCALE on a small LLaMA with the lens attached, each rank on its own rows.

    torchrun --nproc_per_node 2 examples/torchrun_ddp.py --steps 20 --logdir runs/ddp
    gradlens report runs/ddp -o runs/ddp-report

gloo on the CPU when there is no CUDA device, NCCL with one GPU per rank otherwise. A hook sees
each rank's micro-batch gradient before DDP's all-reduce: that is the small batch of the
two-batch estimator, so the run has per-layer noise scales even with ``--accum 1``. With
``--accum K`` the first K-1 backwards run under ``no_sync()``. The lens reduces what is
rank-local (micro-batch sums, the loss) with one all-reduce per logged step; only rank 0
writes the run directory.
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

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
    parser.add_argument("--logdir", default="runs/torchrun_ddp")
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
        ddp = DDP(model, device_ids=[local_rank] if cuda else None)
        optimizer = SCALE(scale_param_groups(model, lr=args.lr, lr_1d=args.lr_1d))
        vocab = model.config.vocab_size
        rows = torch.Generator().manual_seed(1000 + rank)  # each rank draws its own rows
        with GradLens(ddp, optimizer, logdir=args.logdir, preset="standard",
                      log_every=args.log_every, meta={"strategy": "ddp"}) as lens:
            for _ in range(args.steps):
                for k in range(args.accum):
                    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=rows)
                    ids = ids.to(device)
                    sync = k == args.accum - 1  # all-reduce on the last micro-batch only
                    with contextlib.nullcontext() if sync else ddp.no_sync():
                        loss = ddp(input_ids=ids, labels=ids).loss / args.accum
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
