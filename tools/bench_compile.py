"""Benchmark: what ``torch.compile(..., fullgraph=True, dynamic=True)`` of the
attention modules costs against the static-shape compile.

    PYTHONPATH=. python tools/bench_compile.py [--quick]

CPU, float32, batch 1, 8 heads, head_dim 64, forward under ``no_grad``, for
``ImprovedDilatedAttention`` (segments 2048/4096/8192, rates 1/2/4, causal)
and ``BlockSparseAttention`` (bigbird, block 128, causal). For each module
and mode (static ``dynamic=False``, dynamic ``dynamic=True``):

- first call: wall seconds of the first call of a fresh compile at 2K tokens
  (trace + inductor + the call), in the order A B B A after a
  ``torch._dynamo.reset()`` each, with inductor's FX graph cache and the AOT
  autograd cache off so every compile is real. The process starts with an
  empty inductor cache directory, so each mode's first round also compiles
  its C++ kernels ("cold"), its second round finds them on disk ("warm disk
  cache", what every later process of a user pays). Compile seconds = first
  call - steady compiled call.
- compiles over 8 distinct lengths: graphs handed to the backend (a counting
  wrapper around inductor's ``compile_fx``); the recompile limit is raised
  to 64 for the run so the static mode is counted, not failed. Also the
  count after the first length: graphs made later are recompiles.
- steady state at 2K, 4K, 8K: static, dynamic and eager calls interleaved
  (A B C A B C ...) with an fp32 1024^3 ``torch.mm`` as one more candidate
  (tools/benchlib.py), medians, also in units of that matmul, so a load
  change on the machine moves both; dynamic/static is the median of
  same-round ratios.

Writes tools/results/compile.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

# an empty inductor cache: the first compile of each mode builds its kernels
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_compile_inductor_")

import torch  # noqa: E402
from torch._inductor.compile_fx import compile_fx  # noqa: E402

import benchlib  # noqa: E402
from attention import BlockSparseAttention  # noqa: E402

THREADS = 2  # as tools/bench_attention.py
HEADS, HEAD_DIM, K = 8, 64, 1024
SEGMENTS, RATES = (2048, 4096, 8192), (1, 2, 4)
FIRST_LENGTH = 2 * K
STEADY_LENGTHS = (2 * K, 4 * K, 8 * K)
# 8 distinct lengths, multiples of the 128-token block; the steady lengths first
COUNT_LENGTHS = (2 * K, 4 * K, 8 * K, 2560, 3072, 3584, 5120, 6144)
MM_SIZE = 1024


def modules() -> dict[str, Callable[[], torch.nn.Module]]:
    return {
        "ImprovedDilatedAttention": lambda: benchlib.dilated_module("fast", SEGMENTS, RATES),
        "BlockSparseAttention": lambda: BlockSparseAttention("bigbird", block_size=128, num_random_blocks=1),
    }


class CountingBackend:
    """inductor, counting the graphs dynamo hands it."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        self.graphs += 1
        return compile_fx(gm, example_inputs)


def inputs(n: int) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(1, n, HEADS, HEAD_DIM) for _ in range(3))


def timed(fn: Callable, args: tuple) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        fn(*args, is_causal=True)
        return time.perf_counter() - start


def first_calls(make: Callable[[], torch.nn.Module], rounds: int) -> dict[str, list[float]]:
    """Wall seconds of the first call of a fresh compile, modes in A B B A order."""
    out: dict[str, list[float]] = {"static": [], "dynamic": []}
    order = ["static", "dynamic", "dynamic", "static"][: 2 * rounds]
    args = inputs(FIRST_LENGTH)
    for mode in order:
        torch._dynamo.reset()
        module = make()
        timed(module, args)  # the store lookup and eager warm-up are not the compile's cost
        compiled = torch.compile(module, fullgraph=True, dynamic=mode == "dynamic", backend=CountingBackend())
        out[mode].append(timed(compiled, args))
    return out


def run_module(name: str, make: Callable[[], torch.nn.Module], rounds: int, reps: int) -> dict:
    first = first_calls(make, rounds)
    torch._dynamo.reset()
    module = make()
    backends = {"static": CountingBackend(), "dynamic": CountingBackend()}
    compiled = {mode: torch.compile(module, fullgraph=True, dynamic=mode == "dynamic", backend=backends[mode])
                for mode in backends}
    graphs_after_first_length: dict[str, int] = {}
    for n in COUNT_LENGTHS:
        args = inputs(n)
        for mode in ("static", "dynamic"):
            timed(compiled[mode], args)
        if not graphs_after_first_length:
            graphs_after_first_length = {mode: backend.graphs for mode, backend in backends.items()}
    graphs = {mode: backend.graphs for mode, backend in backends.items()}

    candidates = {"static": compiled["static"], "dynamic": compiled["dynamic"], "eager": module}
    steady: dict[str, dict[str, Any]] = {}
    for n in STEADY_LENGTHS:
        args = inputs(n)
        runs = benchlib.interleave({c: lambda fn=fn: timed(fn, args) for c, fn in candidates.items()},
                                   timed=benchlib.timer("cpu"), rounds=reps, reference=benchlib.matmul(MM_SIZE))
        # graphs are counted after the steady calls too: they must not have recompiled
        steady[str(n)] = {c: {"median_ms": 1e3 * runs.median(c), "times_ms": [1e3 * t for t in runs.times[c]],
                              "median_over_mm": runs.units(c)} for c in candidates}
        steady[str(n)]["dynamic_over_static"] = runs.ratio("dynamic", "static")
    graphs_after_steady = {mode: backend.graphs for mode, backend in backends.items()}
    static_call = steady[str(FIRST_LENGTH)]["static"]["median_ms"] / 1e3
    dynamic_call = steady[str(FIRST_LENGTH)]["dynamic"]["median_ms"] / 1e3
    return {
        "module": name,
        "first_call_s": first,
        "compile_s_cold": {"static": first["static"][0] - static_call, "dynamic": first["dynamic"][0] - dynamic_call},
        "compile_s_warm_disk_cache": {"static": first["static"][-1] - static_call,
                                      "dynamic": first["dynamic"][-1] - dynamic_call},
        "graphs_after_first_length": graphs_after_first_length,
        "graphs_over_8_lengths": graphs,
        "graphs_after_steady_calls": graphs_after_steady,
        "steady": steady,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one first-call round, 3 reps (smoke run)")
    parser.add_argument("--out", type=Path, default=benchlib.RESULTS / "compile.json")
    args = parser.parse_args()
    rounds, reps = (1, 3) if args.quick else (2, 7)

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    torch._dynamo.config.recompile_limit = 64
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    # Warm inductor's imports and worker pool on an unrelated function, so the
    # first measured compile does not pay them.
    torch.compile(lambda x: (x.sin() @ x).relu(), fullgraph=True)(torch.randn(8, 8))
    load_before = os.getloadavg()
    results = [run_module(name, make, rounds, reps) for name, make in modules().items()]
    report = {
        "benchmark": "compile",
        "machine": {**benchlib.machine("cpu", THREADS), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg()},
        "settings": {"heads": HEADS, "head_dim": HEAD_DIM, "dtype": "float32", "batch": 1, "causal": True,
                     "first_length": FIRST_LENGTH, "count_lengths": COUNT_LENGTHS, "steady_lengths": STEADY_LENGTHS,
                     "first_call_rounds": rounds, "reps": reps, "mm_size": MM_SIZE, "fx_graph_cache": False},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for r in results:
        cold, warm = r["compile_s_cold"], r["compile_s_warm_disk_cache"]
        print(f"{r['module']}: compile s (first call - steady call at {FIRST_LENGTH}), cold / warm disk cache: "
              f"static {cold['static']:.2f} / {warm['static']:.2f}, dynamic {cold['dynamic']:.2f} / {warm['dynamic']:.2f}; "
              f"graphs over 8 lengths: static {r['graphs_over_8_lengths']['static']}, "
              f"dynamic {r['graphs_over_8_lengths']['dynamic']} (after the first length: {r['graphs_after_first_length']}; after steady calls: {r['graphs_after_steady_calls']})")
        for n, row in r["steady"].items():
            print(f"  {n:>5}: static {row['static']['median_ms']:8.2f} ms  dynamic {row['dynamic']['median_ms']:8.2f} ms"
                  f"  eager {row['eager']['median_ms']:8.2f} ms  dynamic/static (mm-normalized) "
                  f"{row['dynamic_over_static']:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
