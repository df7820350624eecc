"""The main job of ``make run``.

``make run`` first seeds the default store with ``patternstore precompute
--preset default``; this script then builds attention modules on that store,
compiles one with ``torch.compile(fullgraph=True)``, and prints timings and
the store's counters: the plans come from disk, nothing is generated.
"""

from __future__ import annotations

import time

import torch

from attention import ImprovedDilatedAttention
from patternstore import default_store


def main() -> None:
    torch.manual_seed(0)
    store = default_store()
    print(f"store: {store.directory}")
    batch, seq_len, heads, head_dim = 1, 32 * 1024, 8, 64
    module = ImprovedDilatedAttention([2048, 4096, 8192], [1, 2, 4], store=store)
    q, k, v = (torch.randn(batch, seq_len, heads, head_dim) for _ in range(3))

    start = time.perf_counter()
    eager = module(q, k, v)
    print(f"eager forward, {seq_len} tokens, {heads} heads: {time.perf_counter() - start:.3f} s")

    compiled = torch.compile(module, fullgraph=True)
    start = time.perf_counter()
    out = compiled(q, k, v)
    print(f"compiled forward, first call (compiles): {time.perf_counter() - start:.1f} s")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        out = compiled(q, k, v)
        times.append(time.perf_counter() - start)
    print(f"compiled forward, steady state: {sorted(times)[1]:.3f} s (median of 3)")
    print(f"compiled vs eager max abs difference: {(out - eager).abs().max().item():.2e}")

    stats = store.stats()
    print("store stats: " + ", ".join(f"{name}={value}" for name, value in stats.items()))
    if stats["generations"]:
        print("note: some plans were generated here; `patternstore precompute --preset default` seeds them")


if __name__ == "__main__":
    main()
