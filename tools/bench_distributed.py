"""Benchmark of sequence-parallel dilated attention on gloo ranks (CPU).

    PYTHONPATH=. python tools/bench_distributed.py [--quick]

For 64K and 256K tokens (batch 1, 8 heads, head_dim 64, float32), runs the
single-process ``ImprovedDilatedAttention`` on the whole sequence and
``DistributedDilatedAttention`` on 2 and 4 gloo ranks of this machine, each
configuration in fresh processes, interleaved (A B C A B C). Reports the
forward time (slowest rank, median over calls and rounds), forward+backward at
64K, and the bytes each rank received per forward, against the bound of
DESIGN.md section 5: ``2 * (s / r) * batch * heads * head_dim * 4`` bytes per
long branch. The machine has 2 cores: 4 ranks share them, so times show the
overhead of splitting, not a speed-up; the bytes are what matters at scale.
Writes tools/results/distributed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import benchlib

# LongNet-style branches (longer segments, sparser). Per head, branch i costs
# about n * s_i / r_i**2 query-key pairs (a head selects n / r_i queries, each
# seeing s_i / r_i keys). At 64K: 8192 local everywhere, 32768 and 65536 (the
# whole sequence) span ranks; at 256K on 4 ranks 131072 and 262144 span ranks.
SEGMENTS = (8192, 32768, 131072, 262144)
RATES = (4, 8, 16, 32)
HEADS, HEAD_DIM, BATCH = 8, 64, 1
RESULTS = Path(__file__).resolve().parent / "results" / "distributed.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _byte_bound(n: int, world: int) -> int:
    """DESIGN.md bound, summed over the branches that communicate."""
    chunk = n // world
    return sum(
        2 * (min(w, n) // r) * BATCH * HEADS * HEAD_DIM * 4
        for w, r in zip(SEGMENTS, RATES)
        if min(w, n) > chunk
    )


def _measure(module, chunk: torch.Tensor, backward: bool, calls: int) -> list[float]:
    q, k, v = (chunk.clone().requires_grad_(backward) for _ in range(3))
    times = []
    for _ in range(calls + 1):  # the first call fetches the plan: not timed
        start = time.perf_counter()
        out = module(q, k, v, is_causal=True)
        if backward:
            out.sum().backward()
        times.append(time.perf_counter() - start)
    return times[1:]


def _rank(rank: int, world: int, port: int, n: int, backward: bool, calls: int, out_file: str, store_dir: str) -> None:
    os.environ["PATTERNSTORE_DIR"] = store_dir
    torch.set_num_threads(max(1, 2 // world))
    from attention import DistributedDilatedAttention

    generator = torch.Generator().manual_seed(rank)
    chunk = torch.randn(BATCH, n // world, HEADS, HEAD_DIM, generator=generator)
    if world == 1:
        times = _measure(benchlib.dilated_module("fast", SEGMENTS, RATES), chunk, backward, calls)
        received = 0
    else:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(minutes=10))
        module = DistributedDilatedAttention(SEGMENTS, RATES)
        times = _measure(module, chunk, backward, calls)
        received = module.bytes_received // (calls + 1)
        slowest = torch.tensor(times)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        times = slowest.tolist()
        dist.destroy_process_group()
    if rank == 0:
        Path(out_file).write_text(json.dumps({"times": times, "bytes_received_per_forward": received}))


def _run(world: int, n: int, backward: bool, calls: int, store_dir: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out_file = handle.name
    mp.spawn(_rank, args=(world, _free_port(), n, backward, calls, out_file, store_dir), nprocs=world, join=True)
    result = json.loads(Path(out_file).read_text())
    os.unlink(out_file)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round, 64K only")
    args = parser.parse_args()
    lengths = (65536,) if args.quick else (65536, 262144)
    rounds = 1 if args.quick else 2
    cases = [(n, world, False) for n in lengths for world in (1, 2, 4)]
    cases += [(65536, world, True) for world in (1, 2, 4)]
    samples: dict[tuple, list[float]] = {case: [] for case in cases}
    received: dict[tuple, int] = {}
    gflops_before = benchlib.matmul_gflops()
    with tempfile.TemporaryDirectory() as store_dir:
        for _ in range(rounds):
            for n, world, backward in cases:
                result = _run(world, n, backward, calls=2, store_dir=store_dir)
                samples[(n, world, backward)] += result["times"]
                received[(n, world, backward)] = result["bytes_received_per_forward"]
    gflops_after = benchlib.matmul_gflops()

    rows = []
    print(f"{'tokens':>8} {'ranks':>5} {'pass':>8} {'seconds':>9} {'vs 1 rank':>9} {'MiB recv/rank':>14} {'bound MiB':>10}")
    for n, world, backward in cases:
        seconds = statistics.median(samples[(n, world, backward)])
        single = statistics.median(samples[(n, 1, backward)])
        bound = _byte_bound(n, world) if world > 1 else 0
        got = received[(n, world, backward)]
        rows.append({
            "seq_len": n, "world_size": world, "pass": "forward+backward" if backward else "forward",
            "seconds_median": seconds, "samples": samples[(n, world, backward)],
            "time_over_single_process": seconds / single,
            "bytes_received_per_rank_per_forward": got, "byte_bound_per_rank": bound,
        })
        print(f"{n:>8} {world:>5} {'fwd+bwd' if backward else 'fwd':>8} {seconds:>9.2f} {seconds / single:>9.2f} "
              f"{got / 2**20:>14.2f} {bound / 2**20:>10.2f}")
    print(f"fp32 mm 1024: {gflops_before:.1f} / {gflops_after:.1f} GFLOP/s (before / after)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "distributed",
        "machine": benchlib.machine("cpu", 2), "backend": "gloo",
        "threads_per_rank": {str(w): max(1, 2 // w) for w in (1, 2, 4)},
        "config": {"segment_lengths": SEGMENTS, "dilation_rates": RATES, "batch": BATCH, "heads": HEADS,
                   "head_dim": HEAD_DIM, "dtype": "float32", "causal": True},
        "fp32_mm_1024_gflops": {"before": gflops_before, "after": gflops_after},
        "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
