"""Peak memory of dilated attention above its inputs, as a multiple of the
output (target: at most 1.5x for the forward), forward and backward, on the
CPU or a CUDA device, for the per-branch path and the fused path.

Implementations (``--implementation``, several allowed):
- ``fast``: ``DilatedAttention(implementation="fast")``, the per-branch path;
- ``flex``: ``DilatedAttention(implementation="flex")``, the fused path on
  natural-order inputs (it gathers q, k, v into residue order and the output
  back, inside its compiled graph);
- ``flex-ordered``: ``attention.dilated.flex.dilated_flex_attention(...,
  ordered=True)`` on inputs already in residue order (reordered before the
  measurement, like a model that keeps its activations in that order).

Each case runs in a fresh process. CPU: the process runs with
MALLOC_MMAP_THRESHOLD_=1 MiB, so every large allocation is mmap'd and
returned to the OS when freed; the RSS high-water mark is reset before the
call (/proc/self/clear_refs, value 5) and the peak is VmHWM minus the RSS
before it (tools/bench_attention.py does the same). CUDA:
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
the memory allocated before. Forward: everything before the call (inputs,
plan, warmed kernels) is excluded, the output and what autograd saves are
included. Backward: the forward's output and saved tensors are excluded; the
three input gradients are included (3x the output for self-attention
shapes). Flex is warmed at the measured length (it compiles per shape) on
inputs that share the measured ones' storage, so no gradient stays behind.
On the CPU flex has no backward: its forward runs under ``no_grad`` and no
backward figure is given (``"grad": false`` in the row).

Configuration: the GPU benchmark's branches (segments 2048/4096/8192/16384,
rates 1/2/4/8), 16 heads, head_dim 64, batch 1, non-causal. Cases run in
the order given: lengths outer, implementations inner.

    python tools/bench_memory.py [--device cpu|cuda] [--dtype D ...] [--lengths 16384 65536]
                                 [--implementation fast flex flex-ordered]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

import benchlib

SEGMENTS, RATES, HEADS, HEAD_DIM = (2048, 4096, 8192, 16384), (1, 2, 4, 8), 16, 64
IMPLEMENTATIONS = ("fast", "flex", "flex-ordered")
TARGET = 1.5  # forward peak above the inputs, over the output


def attention_of(implementation: str):
    """(callable on (b, n, h, d) tensors, inputs -> the tensors it takes) of an implementation."""
    from attention.residue import residue_modulus, to_residue_order

    module = benchlib.dilated_module("flex" if implementation.startswith("flex") else "fast", SEGMENTS, RATES)
    if implementation != "flex-ordered":
        return module, lambda x: x
    from attention.dilated.flex import dilated_flex_attention

    plan, modulus = module.plan(HEADS), residue_modulus(RATES)
    return (lambda q, k, v: dilated_flex_attention(q, k, v, plan, ordered=True),
            lambda x: to_residue_order(x, modulus))


def worker(n: int, dtype_name: str, device: str, implementation: str) -> dict:
    """One case in this process: forward and backward peaks above what existed before each."""
    torch.manual_seed(0)
    flex, on_cpu = implementation.startswith("flex"), torch.device(device).type == "cpu"
    grad = not (flex and on_cpu)  # flex has no CPU backward
    attend, arrange = attention_of(implementation)
    q, k, v = (arrange(torch.randn(1, n, HEADS, HEAD_DIM, device=device)).to(getattr(torch, dtype_name))
               .requires_grad_(grad) for _ in range(3))
    # Plan fetched, kernels warmed (flex: compiled at this very shape, with autograd when it
    # has a backward); the warm-up's gradients go to leaves of its own and are freed.
    warm = [x.detach().requires_grad_(grad) for x in (q, k, v)] if flex else \
        [x[:, :4096].detach().requires_grad_() for x in (q, k, v)]
    with torch.set_grad_enabled(grad):
        first = attend(*warm)
        if first.requires_grad:
            first.sum().backward()
    del warm, first
    benchlib.free_memory()
    with torch.set_grad_enabled(grad):
        out, forward = benchlib.peak_bytes(lambda: attend(q, k, v), device)
    output_bytes = out.numel() * out.element_size()
    row = {"length": n, "dtype": dtype_name, "implementation": implementation, "grad": grad,
           "output_bytes": output_bytes, "forward_peak_over_output": forward / output_bytes}
    if grad:
        grad_out = torch.randn_like(out)
        _, backward = benchlib.peak_bytes(lambda: out.backward(grad_out), device)
        row["backward_peak_over_output"] = backward / output_bytes
    return row


def targets(rows: list[dict]) -> dict:
    """Forward peak <= 1.5x the output, per implementation (the fused path's: ordered mode)."""
    out = {}
    for implementation in IMPLEMENTATIONS:
        peaks = {f"{r['length']}/{r['dtype']}": r["forward_peak_over_output"] for r in rows
                 if r.get("implementation", "fast") == implementation}
        if peaks:
            out[f"{implementation}_forward_peak<={TARGET}x_output"] = {"met": max(peaks.values()) <= TARGET,
                                                                      "by_case": peaks}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    benchlib.add_arguments(parser, dtype=["bfloat16", "float32"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--implementation", nargs="+", choices=IMPLEMENTATIONS, default=["fast"])
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        n, dtype_name, implementation = args.worker
        print(json.dumps(worker(int(n), dtype_name, args.device, implementation)))
        return
    out = args.out or benchlib.RESULTS / ("memory.json" if args.device == "cpu" else f"memory_{args.device}.json")
    config = {"segments": SEGMENTS, "rates": RATES, "heads": HEADS, "head_dim": HEAD_DIM, "batch": 1, "causal": False,
              "implementations": args.implementation, "target": f"forward peak above inputs <= {TARGET}x the output"}
    report = benchlib.Report([out], "tools/bench_memory.py", config, device=args.device, resume=args.resume)
    budget = benchlib.Budget(math.inf if args.budget_s is None else args.budget_s)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(benchlib.REPO), env.get("PYTHONPATH", "")) if p)
    walls: dict[str, tuple[int, float]] = {}  # implementation -> (length, seconds) of its last case
    for n in args.lengths:
        for implementation in args.implementation:
            for dtype_name in args.dtype:
                case = {"length": n, "dtype": dtype_name, "implementation": implementation}
                last_n, last_s = walls.get(implementation, (n, 0.0))
                # a process start and a compile dominate: the last case's wall time, at least
                if report.has(**case) or not budget.allows(case, last_s * max(1.0, n / last_n) ** 0.5):
                    continue
                command = [sys.executable, __file__, "--device", args.device, "--worker", str(n), dtype_name,
                           implementation]
                started = time.monotonic()
                try:
                    done = subprocess.run(command, capture_output=True, text=True, env=env,
                                          timeout=None if math.isinf(budget.left()) else max(budget.left(), 0) + 60)
                except subprocess.TimeoutExpired:
                    report.data["failures"].append({**case, "failure": "timeout", "message": "past the budget"})
                    continue
                walls[implementation] = (n, time.monotonic() - started)
                if done.returncode != 0:  # an out-of-memory case is recorded, the others go on
                    report.data["failures"].append({**case, "failure": "oom" if "out of memory" in done.stderr.lower()
                                                    else "error", "message": done.stderr[-300:]})
                    continue
                row = json.loads(done.stdout.splitlines()[-1])
                report.add(**row)
                backward = row.get("backward_peak_over_output")
                print(f"n={n:7d} {implementation:12s} {dtype_name:9s} forward {row['forward_peak_over_output']:.2f}x "
                      f"output, backward " + (f"{backward:.2f}x output" if backward is not None else "-"), flush=True)
    report.data["skipped"] += budget.skipped
    report.data["targets"] = targets(report.data["rows"])
    report.data["forward_target_met"] = all(r["forward_peak_over_output"] <= TARGET for r in report.data["rows"]
                                            if r.get("implementation", "fast") == "fast")
    report.write()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
