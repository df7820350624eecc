"""Peak memory of the dilated fast path above its inputs, as a multiple of
the output (target: at most 1.5x), forward and backward, on the
CPU or a CUDA device.

Each case runs in a fresh process. CPU: the process runs with
MALLOC_MMAP_THRESHOLD_=1 MiB, so every large allocation is mmap'd and
returned to the OS when freed; the RSS high-water mark is reset before the
call (/proc/self/clear_refs, value 5) and the peak is VmHWM minus the RSS
before it (tools/bench_attention.py does the same). CUDA:
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
the memory allocated before. Forward: everything before the call (inputs,
plan, warmed kernels) is excluded, the output is included. Backward: the
forward's output and saved tensors are excluded; the three input gradients
are included (3x the output for self-attention shapes).

Configuration: the GPU benchmark's branches (segments 2048/4096/8192/16384,
rates 1/2/4/8), 16 heads, head_dim 64, batch 1, non-causal.

    python tools/bench_memory.py [--device cpu|cuda] [--dtype D ...] [--lengths 16384 65536]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import torch

import benchlib

SEGMENTS, RATES, HEADS, HEAD_DIM = (2048, 4096, 8192, 16384), (1, 2, 4, 8), 16, 64


def worker(n: int, dtype_name: str, device: str) -> dict:
    """One case in this process: forward and backward peaks above what existed before each."""
    torch.manual_seed(0)
    module = benchlib.dilated_module("fast", SEGMENTS, RATES)
    q, k, v = (torch.randn(1, n, HEADS, HEAD_DIM, device=device).to(getattr(torch, dtype_name)).requires_grad_()
               for _ in range(3))
    warm = [x[:, :4096].detach().requires_grad_() for x in (q, k, v)]
    module(*warm).sum().backward()  # plan fetched, kernels warmed
    del warm
    out, forward = benchlib.peak_bytes(lambda: module(q, k, v), device)
    grad_out = torch.randn_like(out)
    _, backward = benchlib.peak_bytes(lambda: out.backward(grad_out), device)
    output_bytes = out.numel() * out.element_size()
    return {"length": n, "dtype": dtype_name, "output_bytes": output_bytes,
            "forward_peak_over_output": forward / output_bytes, "backward_peak_over_output": backward / output_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    benchlib.add_arguments(parser, dtype=["bfloat16", "float32"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(int(args.worker[0]), args.worker[1], args.device)))
        return
    out = args.out or benchlib.RESULTS / ("memory.json" if args.device == "cpu" else f"memory_{args.device}.json")
    config = {"segments": SEGMENTS, "rates": RATES, "heads": HEADS, "head_dim": HEAD_DIM, "batch": 1, "causal": False,
              "target": "forward peak above inputs <= 1.5x the output"}
    report = benchlib.Report([out], "tools/bench_memory.py", config, device=args.device, resume=args.resume)
    budget = benchlib.Budget(math.inf if args.budget_s is None else args.budget_s)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(benchlib.REPO), env.get("PYTHONPATH", "")) if p)
    for n in args.lengths:
        for dtype_name in args.dtype:
            case = {"length": n, "dtype": dtype_name}
            if report.has(**case) or not budget.allows(case):
                continue
            done = subprocess.run([sys.executable, __file__, "--device", args.device, "--worker", str(n), dtype_name],
                                  capture_output=True, text=True, env=env)
            if done.returncode != 0:  # an out-of-memory case is recorded, the others go on
                report.data["failures"].append({**case, "failure": "oom" if "out of memory" in done.stderr.lower()
                                                else "error", "message": done.stderr[-300:]})
                continue
            row = json.loads(done.stdout.splitlines()[-1])
            report.add(**row)
            print(f"n={n:7d} {dtype_name:9s} forward {row['forward_peak_over_output']:.2f}x output, "
                  f"backward {row['backward_peak_over_output']:.2f}x output")
    report.data["skipped"] += budget.skipped
    report.data["forward_target_met"] = all(r["forward_peak_over_output"] <= 1.5 for r in report.data["rows"])
    report.write()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
