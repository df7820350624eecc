"""Sequence-parallel LongNet attention with torchrun.

    torchrun --nproc-per-node 2 examples/distributed_dilated.py [--seq-len 131072]

Each rank holds a contiguous chunk of the sequence. Branches whose segment
fits in a chunk run locally; longer ones all-gather only the dilated keys and
values of the ranks sharing the segment. Ranks on one machine share the
pattern store's disk tier, so the plan is generated once. gloo runs on CPUs;
on GPUs pass --backend nccl (each rank then uses cuda:LOCAL_RANK).
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from attention import DistributedDilatedAttention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    args = parser.parse_args()

    dist.init_process_group(args.backend, timeout=timedelta(minutes=2))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if args.backend == "nccl" else torch.device("cpu")
    if args.seq_len % world:
        raise SystemExit(f"--seq-len {args.seq_len} must be divisible by the world size {world}")
    chunk = args.seq_len // world

    # LongNet-style branches with a constant s / r = 512 keys per segment.
    # ``timeout`` bounds everything the module waits on (shape agreement,
    # all-gathers, reduce-scatters): a rank that never calls makes the others
    # raise CollectiveError after it, naming the collective and the group.
    attention = DistributedDilatedAttention([2048, 8192, 32768, 131072], [4, 16, 64, 256],
                                            timeout=timedelta(minutes=1))
    generator = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, chunk, args.heads, args.head_dim, generator=generator).to(device) for _ in range(3))

    start = time.perf_counter()
    out = attention(q, k, v, is_causal=True)
    seconds = time.perf_counter() - start
    print(f"rank {rank}/{world}: positions [{rank * chunk}, {(rank + 1) * chunk}), output {tuple(out.shape)}, "
          f"{seconds:.2f} s, received {attention.bytes_received / 2**20:.2f} MiB")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
