"""Fused dilated attention (one flex call over the residue order) against
dense SDPA over all pairs and the per-branch path, for the GPU driver.

Per length: forward wall time of the fused path (natural order: gathers in
the graph; ordered mode: none), of ``attention.dilated.dilated_attention``
(per-branch) and of ``scaled_dot_product_attention`` (dense), and with
``--backward`` forward+backward; candidates interleaved in one process, the
median of ``--repeats`` after ``--warmup``. The per-layer permutation cost is
natural minus ordered. On the CPU (a functional check at tiny sizes) only
forwards run: flex has no CPU backward.

    PYTHONPATH=. python tools/bench_fused.py --device cuda --lengths 16384 32768 65536 --backward
    PYTHONPATH=. python tools/bench_fused.py --device cpu --lengths 256 --heads 2 --head-dim 16 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

from attention.dilated import DilatedPlan, dilated_attention
from attention.dilated_flex import FUSED_BLOCK, dilated_flex_attention
from attention.residue import residue_modulus, to_residue_order
from patternstore import DilatedSpec, generate

SEGMENTS, RATES = (2048, 4096, 8192, 16384), (1, 2, 4, 8)


def timed(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn()`` (synchronized on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def candidates(q, k, v, plan, causal: bool, backward: bool, block: int) -> dict:
    modulus = residue_modulus(RATES)
    qo, ko, vo = (to_residue_order(x, modulus).detach().requires_grad_(x.requires_grad) for x in (q, k, v))

    def run(forward, inputs):
        def step():
            out = forward(*inputs)
            if backward:
                out.backward(torch.ones_like(out))
        return step

    return {
        "fused": run(lambda a, b, c: dilated_flex_attention(a, b, c, plan, is_causal=causal, block_size=block), (q, k, v)),
        "fused_ordered": run(
            lambda a, b, c: dilated_flex_attention(a, b, c, plan, is_causal=causal, ordered=True, block_size=block),
            (qo, ko, vo)),
        "per_branch": run(lambda a, b, c: dilated_attention(a, b, c, plan, is_causal=causal), (q, k, v)),
        "sdpa_dense": run(
            lambda a, b, c: F.scaled_dot_product_attention(
                a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2), is_causal=causal).transpose(1, 2),
            (q, k, v)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block", type=int, default=FUSED_BLOCK)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.backward and device.type == "cpu":
        parser.error("--backward needs a CUDA device: flex_attention has no CPU backward")
    plan = DilatedPlan.from_pattern(generate(DilatedSpec(SEGMENTS, RATES, args.heads)))
    rows = []
    for n in args.lengths:
        q, k, v = (torch.randn(1, n, args.heads, args.head_dim, device=device, dtype=dtype,
                               requires_grad=args.backward) for _ in range(3))
        row = {"seq_len": n}
        with torch.set_grad_enabled(args.backward):
            for name, step in candidates(q, k, v, plan, args.causal, args.backward, args.block).items():
                row[f"{name}_ms"] = round(timed(step, device, args.warmup, args.repeats) * 1e3, 3)
        row["permutation_ms"] = round(row["fused_ms"] - row["fused_ordered_ms"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype, "heads": args.heads, "head_dim": args.head_dim, "block": args.block,
        "causal": args.causal, "backward": args.backward, "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
