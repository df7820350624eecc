"""Benchmark: per-token decode latency of attention.hf against dense SDPA over
the same KV cache (docs/design.md section 7).

    python tools/bench_decode.py [--contexts 32768,262144] [--reps N]
                                 [--device cuda --dtype bfloat16] [--threads 2]

One decode step of one layer: a query of 1 row, ``heads`` heads, against a
cache of ``context`` rows in transformers' layout ``(batch, kv_heads,
context, head_dim)``, called through the registered transformers attention
functions (``attention.hf`` for ours, transformers' ``sdpa_attention_forward``
for dense), exactly as a Llama layer calls them inside ``generate``.
Candidates: dilated (segments 2048/4096/8192, rates 1/2/4), ``local`` and
``bigbird`` block-sparse, unidirectional (block 64, the kinds' defaults).

Method (tools/benchlib.py): per context, every candidate is called once
untimed (the pattern is fetched from the store, kernels load), then the
candidates run interleaved (dense, dilated, local, bigbird, matmul, dense,
...) ``reps`` times with a ``torch.mm`` of ``MM_SIZE``^3 as the last
candidate; latency is also reported in units of that matmul
(``normalized``) so figures from differently loaded machines compare.
Reported: medians; the speed-up is median(dense) / median(candidate) from
the same interleaved run.

Targets: dilated >= 3x dense at 32K and >= 10x at 256K; local and
bigbird >= 10x at 256K. Writes tools/results/decode.json (``--output``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import torch

import benchlib

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "tools" / "results"

K = 1024
HEADS, KV_HEADS, HEAD_DIM = 8, 8, 64
MM_SIZE = 1024
CANDIDATES = {
    "dilated": ("patternstore_dilated", {"segment_lengths": [2048, 4096, 8192], "dilation_rates": [1, 2, 4]}),
    "local": ("patternstore_sparse", {"kind": "local", "block_size": 64, "attention": "unidirectional"}),
    "bigbird": ("patternstore_sparse", {"kind": "bigbird", "block_size": 64, "attention": "unidirectional"}),
}
TARGETS = {("dilated", 32 * K): 3.0, ("dilated", 256 * K): 10.0, ("local", 256 * K): 10.0, ("bigbird", 256 * K): 10.0}


def machine(device: torch.device, threads: int) -> dict:
    info = benchlib.machine(str(device), threads)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def run_context(context: int, reps: int, device: torch.device, dtype: torch.dtype, names: list[str]) -> dict:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    import attention.hf as hf

    hf.register()
    torch.manual_seed(0)
    factory = {"device": device, "dtype": dtype}
    # The cache as transformers keeps it; the query of one new token.
    key = torch.randn(1, KV_HEADS, context, HEAD_DIM, **factory)
    value = torch.randn(1, KV_HEADS, context, HEAD_DIM, **factory)
    query = torch.randn(1, HEADS, 1, HEAD_DIM, **factory)
    scaling = HEAD_DIM ** -0.5

    functions = {"dense": lambda: sdpa_attention_forward(
        SimpleNamespace(is_causal=True, num_key_value_groups=HEADS // KV_HEADS), query, key, value, None,
        scaling=scaling)}
    for name in names:
        impl, settings = CANDIDATES[name]
        layer = SimpleNamespace(config=SimpleNamespace(patternstore_attention=settings), is_causal=True)
        forward = hf.dilated_attention_forward if impl == hf.DILATED else hf.sparse_attention_forward
        functions[name] = lambda forward=forward, layer=layer: forward(layer, query, key, value, None,
                                                                       scaling=scaling)
    with torch.no_grad():  # a layout that refuses decoding fails its warm-up and says why; the others go on
        runs = benchlib.interleave(functions, timed=benchlib.timer(device), rounds=reps,
                                   reference=benchlib.matmul(MM_SIZE, device, dtype))
    dense = runs.median("dense")
    rows = {name: {"median_ms": runs.median(name) * 1e3, "times_ms": [t * 1e3 for t in runs.times[name]],
                   "median_normalized": runs.units(name), "speedup_vs_dense": dense / runs.median(name),
                   "speedup_vs_dense_same_round": runs.ratio("dense", name)}
            for name in functions if name in runs.times}
    return {"context": context, "reps": reps, "candidates": rows, "refused": runs.failures}


def evaluate(runs: list[dict]) -> dict:
    verdicts = {}
    for run in runs:
        for name, row in run["candidates"].items():
            target = TARGETS.get((name, run["context"]))
            if target is not None:
                verdicts[f"{name}@{run['context'] // K}K"] = {
                    "target_speedup": target, "speedup": row["speedup_vs_dense"],
                    "met": row["speedup_vs_dense"] >= target,
                }
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default=f"{32 * K},{256 * K}", help="comma-separated cache lengths")
    parser.add_argument("--reps", type=int, default=9, help="interleaved timed calls per candidate")
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help=f"subset of {list(CANDIDATES)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=2, help="CPU intra-op threads")
    parser.add_argument("--output", type=Path, default=RESULTS / "decode.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    names = [n for n in args.candidates.split(",") if n]
    unknown = sorted(set(names) - set(CANDIDATES))
    if unknown:
        parser.error(f"--candidates: unknown {unknown}; choose from {list(CANDIDATES)}")
    contexts = [int(c) for c in args.contexts.split(",")]
    runs = []
    for context in contexts:
        run = run_context(context, args.reps, device, dtype, names)
        runs.append(run)
        line = ", ".join(f"{n} {r['median_ms']:.3f} ms ({r['speedup_vs_dense']:.1f}x)"
                         for n, r in run["candidates"].items())
        print(f"context {context // K}K: {line}", flush=True)
    result = {
        "benchmark": "per-token decode latency, one layer, batch 1",
        "config": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "device": args.device,
                   "dtype": args.dtype, "mm_size": MM_SIZE,
                   "candidates": {n: CANDIDATES[n] for n in names}},
        "machine": machine(device, args.threads),
        "runs": runs,
        "targets": evaluate(runs),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["targets"], indent=1))


if __name__ == "__main__":
    main()
