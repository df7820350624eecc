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

``--model``: the decode step of a whole model through transformers' fast
path instead: a 2-layer Llama (the heads above, hidden 512) per
implementation ("sdpa" as dense), a ``StaticCache`` filled to ``context``
rows through its public ``update`` (random keys and values: attention
costs the same), and ``model.forward`` under ``torch.compile(fullgraph=True,
mode="reduce-overhead")`` on CUDA (CUDA graphs; default mode on the CPU),
as ``generate`` compiles it for a static cache. Each call decodes one token
(the cache grows by one); three untimed calls compile and record first.
Issue 18's target: faster than dense at 32K and 256K. Results are written
after each context.
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

    import attention.hf.registration as hf

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


MODEL = {"layers": 2, "vocab": 1024, "intermediate": 1024}
MODEL_SLACK = 64  # cache rows past the context: the warm-up and timed steps


def model_step(impl: str, settings: dict | None, context: int, device: torch.device, dtype: torch.dtype):
    """One token per call through a compiled tiny Llama over a static cache of ``context`` rows."""
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    config = LlamaConfig(vocab_size=MODEL["vocab"], hidden_size=HEADS * HEAD_DIM, intermediate_size=MODEL["intermediate"],
                         num_hidden_layers=MODEL["layers"], num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=context + MODEL_SLACK, attn_implementation=impl,
                         **({"patternstore_attention": settings} if settings else {}))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device, dtype).eval()
    length = context + MODEL_SLACK
    cache = StaticCache(config=config, max_cache_len=length)
    for layer in range(MODEL["layers"]):
        cache.update(*(torch.randn(1, KV_HEADS, context, HEAD_DIM, device=device, dtype=dtype) for _ in range(2)),
                     layer)
    forward = torch.compile(model.forward, fullgraph=True, mode="reduce-overhead" if device.type == "cuda" else None)
    mask = torch.ones(1, length, dtype=torch.long, device=device)  # one shape for every step: no recompile
    position = [context]

    def step():
        p = position[0]
        position[0] += 1
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        ids = torch.full((1, 1), p % MODEL["vocab"], device=device)
        at = torch.full((1, 1), p, device=device)
        return forward(input_ids=ids, attention_mask=mask, position_ids=at, cache_position=at[0],
                       past_key_values=cache, use_cache=True).logits
    return step


def run_model_context(context: int, reps: int, device: torch.device, dtype: torch.dtype, names: list[str]) -> dict:
    import attention.hf.registration as hf

    hf.register()
    functions = {"dense": model_step("sdpa", None, context, device, dtype)}
    for name in names:
        functions[name] = model_step(*CANDIDATES[name], context, device, dtype)
    with torch.no_grad():
        runs = benchlib.interleave(functions, timed=benchlib.timer(device), rounds=min(reps, MODEL_SLACK - 4),
                                   warmup=3, reference=benchlib.matmul(MM_SIZE, device, dtype))
    dense = runs.median("dense") if "dense" in runs.times else float("nan")
    rows = {name: {"median_ms": runs.median(name) * 1e3, "times_ms": [t * 1e3 for t in runs.times[name]],
                   "median_normalized": runs.units(name), "speedup_vs_dense": dense / runs.median(name)}
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
    parser.add_argument("--output", type=Path, default=None,
                        help="default tools/results/decode.json (decode_model.json with --model)")
    parser.add_argument("--model", action="store_true", help="a compiled 2-layer Llama over a static cache")
    args = parser.parse_args()
    args.output = args.output or RESULTS / ("decode_model.json" if args.model else "decode.json")

    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    names = [n for n in args.candidates.split(",") if n]
    unknown = sorted(set(names) - set(CANDIDATES))
    if unknown:
        parser.error(f"--candidates: unknown {unknown}; choose from {list(CANDIDATES)}")
    contexts = [int(c) for c in args.contexts.split(",")]
    runs = []
    result = {
        "benchmark": ("per-token decode latency of a compiled 2-layer Llama over a static cache, batch 1"
                      if args.model else "per-token decode latency, one layer, batch 1"),
        "config": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "device": args.device,
                   "dtype": args.dtype, "mm_size": MM_SIZE, **({"model": MODEL} if args.model else {}),
                   "candidates": {n: CANDIDATES[n] for n in names}},
        "machine": machine(device, args.threads),
        "runs": runs,
    }
    for context in contexts:
        try:
            run = (run_model_context if args.model else run_context)(context, args.reps, device, dtype, names)
        except Exception as error:  # noqa: BLE001 - e.g. out of memory at 256K: the other contexts stand
            run = {"context": context, "failure": benchlib.failure(error), "candidates": {}}
        runs.append(run)
        line = ", ".join(f"{n} {r['median_ms']:.3f} ms ({r['speedup_vs_dense']:.1f}x)"
                         for n, r in run["candidates"].items())
        print(f"context {context // K}K: {line or run.get('failure')}", flush=True)
        result["targets"] = evaluate(runs) if not args.model else {
            f"{n}@{r['context'] // K}K faster than dense": {"speedup": c["speedup_vs_dense"],
                                                          "met": c["speedup_vs_dense"] > 1.0}
            for r in runs for n, c in r["candidates"].items() if n != "dense"}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")  # after each context: a kill loses one
    print(json.dumps(result["targets"], indent=1))


if __name__ == "__main__":
    main()
