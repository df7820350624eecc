"""How the generation-cost estimate (``patternstore.cost``) compares with what
``generate`` really takes: peak resident memory above the process before the
call, and CPU time, per spec of every kind.

    PYTHONPATH=. python tools/bench_generation_cost.py [--rounds N]

The estimate must bound the peak (``estimate / peak >= 1``) and be near
enough that the 4 GiB limit refuses only what is large (the ratio is a few);
``ns per estimated byte`` says what the limit means in time on this machine.
Specs run interleaved (A B C ... A B C ...), one thread, medians of
``--rounds``; the process runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed
arrays leave the resident set. CPU time (``time.process_time``) does not
count the time other work on a shared machine held the core. Writes
tools/results/generation_cost.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from benchlib import machine, peak_bytes  # noqa: E402
from patternstore import generate  # noqa: E402
from patternstore.cost import generation_cost  # noqa: E402
from patternstore.spectext import parse_spec  # noqa: E402

BRANCH = "segment_lengths=256,64:dilation_rates=2,4"
SPECS = [
    "dense:seq_len=65536:block_size=64",
    "dense:seq_len=262144:block_size=64:attention=unidirectional",
    "fixed:seq_len=262144:block_size=128:horizontal_global_attention=true",
    "bigbird:seq_len=1048576:block_size=128:num_heads=8:different_layout_per_head=true",
    "bigbird:seq_len=65536:block_size=64:num_heads=4:different_layout_per_head=true:num_random_blocks=64",
    "bslongformer:seq_len=65536:block_size=16:num_heads=2:global_block_indices=0,100:global_block_end_indices=50,400",
    "variable:seq_len=65536:block_size=32:num_random_blocks=8:local_window_blocks=4,64",
    "local:seq_len=1048576:block_size=16:num_sliding_window_blocks=33",
    f"dilated_blocks:seq_len=16384:block_size=16:num_heads=8:{BRANCH}",
    "dilated_blocks:seq_len=16384:block_size=16:num_heads=8:segment_lengths="
    + ",".join(["256"] * 100 + ["64"]) + ":dilation_rates=" + ",".join(["2"] * 100 + ["4"]),
    "dilated:segment_lengths=2048,4096,8192,16384,32768:dilation_rates=1,2,4,6,12:num_heads=16",
]


def measure(spec) -> tuple[int, float]:
    """(peak resident bytes above the start, CPU seconds) of one generation."""
    gc.collect()
    start = time.process_time()
    _, peak = peak_bytes(lambda: generate(spec), "cpu")
    return peak, time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # set before the allocator starts: re-run
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    torch.set_num_threads(1)
    specs = [parse_spec(text) for text in SPECS]
    for spec in specs:  # warm-up: first-call costs out of the figures
        generate(spec)
    peaks: dict[int, list[int]] = {i: [] for i in range(len(specs))}
    times: dict[int, list[float]] = {i: [] for i in range(len(specs))}
    for _ in range(args.rounds):
        for i, spec in enumerate(specs):
            peak, seconds = measure(spec)
            peaks[i].append(peak)
            times[i].append(seconds)
    rows = []
    for i, (text, spec) in enumerate(zip(SPECS, specs)):
        cost = generation_cost(spec)
        peak, seconds = statistics.median(peaks[i]), statistics.median(times[i])
        rows.append({"spec": text if len(text) < 120 else text[:117] + "...", "estimate_bytes": cost.written,
                     "layout_bytes": generate(spec).nbytes, "peak_rss_bytes": peak, "cpu_s": round(seconds, 4),
                     "estimate_over_peak": round(cost.written / peak, 2) if peak >= 1 << 20 else None,  # < 1 MiB: noise
                     "ns_per_estimated_byte": round(seconds * 1e9 / cost.written, 3)})
        print(f"{spec.kind:<15} estimate {cost.written / 2**20:9.1f} MiB  peak {peak / 2**20:8.1f} MiB  "
              f"x{rows[-1]['estimate_over_peak']}  {seconds:7.3f} s  {seconds * 1e9 / cost.written:6.3f} ns/B")
    report = {
        "what": "generation cost estimate (patternstore.cost) vs peak RSS above the start and CPU time of "
                "generate(spec); one thread, medians of interleaved rounds",
        "rounds": args.rounds,
        "machine": {**machine("cpu", threads=1), "load_average_1min_after": round(os.getloadavg()[0], 2)},
        "cases": rows,
    }
    out = REPO / "tools" / "results" / "generation_cost.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
