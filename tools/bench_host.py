"""Host work of one dilated attention call: the ATen ops its fast path
dispatches (docs/design.md section 5, "Host work").

On a GPU every eager op costs host time that the kernels wait for; at short
lengths and in decode that time sets the speed. The op count is exact and
the same on any machine, so it is measured here, without a GPU: the fast
path's forward and backward (``forward_groups`` / ``backward_groups``) run on
``meta`` tensors with the CUDA kernel choice (``backend="cuda"``: the real
fused CUDA ops' meta kernels), under a dispatch mode that counts every op.
Ops are split into views (metadata only: no kernel on a GPU) and the rest
(a kernel launch each on a GPU, or an allocation).

With a CUDA device (``--device cuda``), the same calls are also timed on the
host: no synchronisation inside the timed region, so the wall time is the
host time that issues the work (medians of interleaved rounds).

Configuration: the GPU benchmark's (tools/bench_gpu.py): segments
2048/4096/8192/16384, rates 1/2/4/8, 16 heads, head_dim 128, bf16, batch 1;
prefill at 16K and 64K, and one decode row against a 32K cache (causal).

Block-sparse decode (the gather path, which a GPU takes for queries shorter
than keys): one row against a 32K cache, bigbird and local, block 64,
unidirectional, 8 heads, head_dim 64 (tools/bench_decode.py's layouts). Its
op reads layout values, so it is counted on CPU float32 tensors, with the
explicit tile path a GPU takes (``sparse_forward(..., backend="matmul")``) and
the module's precomputed row groups. "syncs" counts
the ops that make a GPU wait for its queue (value reads, ``nonzero``,
``unique``); a ``.tolist()`` after one of them is not seen by the counter.

    python tools/bench_host.py                 # counts: tools/results/host_ops.json
    python tools/bench_host.py --device cuda   # counts and host times
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import benchlib
from attention import BlockSparseAttention
from patternstore import DilatedSpec, generate

from attention.dilated.fast import backward_groups, forward_groups
from attention.dilated.plan import DilatedPlan
from attention.sparse.tiles import sparse_forward


def plan_groups(spec: DilatedSpec):
    """The dilated plan's head groups of a spec."""
    return DilatedPlan.from_pattern(generate(spec)).groups


RESULTS = benchlib.RESULTS
SEGMENTS, RATES, HEADS, HEAD_DIM = (2048, 4096, 8192, 16384), (1, 2, 4, 8), 16, 128
# (name, q_len, kv_len, causal)
CASES = [("prefill 16K", 16384, 16384, False), ("prefill 64K", 65536, 65536, False), ("decode 32K", 1, 32768, True)]
SPARSE_KINDS, SPARSE_BLOCK, SPARSE_HEADS, SPARSE_HEAD_DIM, SPARSE_CACHE = ("bigbird", "local"), 64, 8, 64, 32768
# Ops after which the host waits for the device: a value read or an output sized by values.
SYNC_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.unique_consecutive.default",
            "aten._unique2.default", "aten.masked_select.default", "aten.repeat_interleave.Tensor"}


class OpCounter(TorchDispatchMode):
    """Counts every ATen op dispatched inside it, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.views = 0
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        self.views += bool(func.is_view)
        # repeat_interleave syncs only when it must read its repeats to size the output.
        if str(func) in SYNC_OPS and not (func is torch.ops.aten.repeat_interleave.Tensor
                                          and (kwargs or {}).get("output_size") is not None):
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def calls(q_len: int, kv_len: int, causal: bool, device: str, backend: str):
    """(forward, backward) closures of one case on ``device``, dispatching as ``backend``."""
    groups = plan_groups(DilatedSpec(SEGMENTS, RATES, HEADS))
    dtype, scale = torch.bfloat16, HEAD_DIM**-0.5
    q = torch.zeros(1, q_len, HEADS, HEAD_DIM, dtype=dtype, device=device)
    k, v = (torch.zeros(1, kv_len, HEADS, HEAD_DIM, dtype=dtype, device=device) for _ in range(2))
    out, lse = forward_groups(q, k, v, None, groups, causal, scale, backend=backend)
    out = out.to(dtype)

    def forward() -> None:
        forward_groups(q, k, v, None, groups, causal, scale, backend=backend)

    def backward() -> None:
        grads = [torch.zeros(x.shape, dtype=torch.float32, device=device) for x in (q, k, v)]
        backward_groups(out, q, k, v, out, lse, None, groups, causal, scale, *grads, backend=backend)

    return forward, backward


def sparse_decode_call(kind: str, device: str):
    """One decode row of the block-sparse op on ``device`` (float32): its forward closure."""
    module = BlockSparseAttention(kind, block_size=SPARSE_BLOCK, attention="unidirectional")
    q = torch.randn(1, 1, SPARSE_HEADS, SPARSE_HEAD_DIM, device=device)
    k, v = (torch.randn(1, SPARSE_CACHE, SPARSE_HEADS, SPARSE_HEAD_DIM, device=device) for _ in range(2))
    first_block = (SPARSE_CACHE - 1) // SPARSE_BLOCK
    plan = module.layouts.plan(SPARSE_CACHE, SPARSE_HEADS, q.device, True, first_block)
    scale = SPARSE_HEAD_DIM**-0.5

    def forward() -> None:  # the "matmul" tiles a GPU takes (the CPU would take its fused kernel)
        sparse_forward(q, k, v, plan.kv_num_blocks, plan.kv_indices, plan.groups, None, None, SPARSE_BLOCK, True,
                       scale, 0.0, True, backend="matmul")

    forward()  # the store lookup and first-call work stay outside what is counted
    return forward


def count(fn) -> dict:
    with OpCounter() as counter:
        fn()
    total = sum(counter.ops.values())
    return {"ops": total, "views": counter.views, "other_ops": total - counter.views, "syncs": counter.syncs,
            "by_op": dict(counter.ops.most_common())}


def host_seconds(fn) -> float:
    """Host wall time of one call: synchronised before, not inside (the host time that issues the work)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def host_times(fns: dict, rounds: int) -> dict:
    """Median host milliseconds of each closure, rounds interleaved."""
    runs = benchlib.interleave(fns, timed=host_seconds, rounds=rounds)
    torch.cuda.synchronize()
    return {name: runs.median(name) * 1e3 for name in fns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="meta", choices=("meta", "cuda"),
                        help="meta: op counts only (any machine); cuda: also host times")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON path (default tools/results/host_ops.json, host_ops_cuda.json with --device cuda)")
    args = parser.parse_args()
    output = args.output or RESULTS / ("host_ops.json" if args.device == "meta" else "host_ops_cuda.json")
    report = {
        "benchmark": "tools/bench_host.py", "machine": benchlib.machine(args.device if args.device == "cuda" else "cpu"),
        "config": {"segments": SEGMENTS, "rates": RATES, "heads": HEADS, "head_dim": HEAD_DIM,
                   "dtype": "bfloat16", "batch": 1, "kernels": "CUDA choice (backend='cuda')"},
        "notes": "ops: every ATen op the fast path dispatches in one call; views: metadata-only ops; "
                 "other_ops: kernel launches or allocations on a GPU",
        "cases": [],
    }
    for name, q_len, kv_len, causal in CASES:
        forward, backward = calls(q_len, kv_len, causal, "meta", "cuda")
        row = {"case": name, "q_len": q_len, "kv_len": kv_len, "causal": causal,
               "forward": count(forward), "backward": count(backward)}
        if args.device == "cuda":
            forward_cuda, backward_cuda = calls(q_len, kv_len, causal, "cuda", "cuda")
            row["host_ms"] = host_times({"forward": forward_cuda, "backward": backward_cuda}, args.rounds)
        report["cases"].append(row)
        print(f"{name:12s} forward {row['forward']['ops']:4d} ops ({row['forward']['other_ops']:3d} not views)   "
              f"backward {row['backward']['ops']:4d} ops ({row['backward']['other_ops']:3d} not views)"
              + (f"   host ms fwd {row['host_ms']['forward']:.2f} bwd {row['host_ms']['backward']:.2f}"
                 if "host_ms" in row else ""))
    for kind in SPARSE_KINDS:
        row = {"case": f"sparse {kind} decode 32K", "q_len": 1, "kv_len": SPARSE_CACHE, "causal": True,
               "forward": count(sparse_decode_call(kind, "cpu"))}
        if args.device == "cuda":
            row["host_ms"] = host_times({"forward": sparse_decode_call(kind, "cuda")}, args.rounds)
        report["cases"].append(row)
        print(f"{row['case']:24s} forward {row['forward']['ops']:4d} ops ({row['forward']['syncs']} syncs)"
              + (f"   host ms {row['host_ms']['forward']:.2f}" if "host_ms" in row else ""))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
