"""Benchmark of the pattern store: memory hit, disk hit, generation.

    PYTHONPATH=. python tools/bench_store.py [--quick]

Writes tools/results/store.json and prints a table. Cases, for a small
dilated plan and a large block-sparse layout (bigbird, 1M tokens, 8 heads):

- memory hit: ``store.get(spec)`` in a tight loop, timed per batch of calls
  with ``perf_counter_ns`` (one call is below the timer's resolution); the
  per-call figures are batch time / batch size. Interleaved with the same
  loop over a bare dict lookup under a ``threading.Lock`` (the floor).
- disk hit, same process: ``store.get`` on a store whose memory tier keeps
  nothing (``max_entries=0``), so every call reads the value (format 2: one
  read of the file into the buffer the arrays view) and checks it.
- disk hit, fresh process: the first ``get`` in a new interpreter on a warm
  directory (import and store construction timed separately), interleaved
  with the first ``generate`` in a new interpreter (the like-for-like cost).
- generation: ``generate(spec)``, interleaved with the disk reads (A B A B).
- miss: a full cold ``get`` (lock, generate, encode, write), after ``evict``.
- 8 processes released at once on one cold key: generations across them.
- stored bytes: the size of each spec's value as the disk tier stores it.

Machine drift: ratios come from interleaved runs; figures are medians (p50)
and nearest-rank p99 (with few samples, p99 is the maximum).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import torch

import benchlib
from patternstore import PatternStore, generate
from patternstore.codec import encode

SPECS_SOURCE = """
from patternstore import DilatedSpec, SparseSpec
SPECS = {
    "dilated-8k": DilatedSpec([2048, 4096, 8192], [1, 2, 4], 8),  # length-free: serves 8K and every other length
    "bigbird-1M": SparseSpec("bigbird", seq_len=1048576, block_size=128, num_heads=8,
                             different_layout_per_head=True),
}
"""
_namespace: dict = {}
exec(SPECS_SOURCE, _namespace)
SPECS: dict = _namespace["SPECS"]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summary(samples_ns: list[float]) -> dict:
    return {
        "n": len(samples_ns),
        "p50_us": percentile(samples_ns, 0.50) / 1e3,
        "p99_us": percentile(samples_ns, 0.99) / 1e3,
    }


def child_env() -> dict:
    path = os.pathsep.join(filter(None, [str(benchlib.REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


# ------------------------------------------------------------------ cases
def memory_hits(store: PatternStore, spec, batches: int, calls: int) -> tuple[list[float], list[float], list[float]]:
    """Per-call ns of store.get (memory hit), of store.get with a device whose
    copy is cached (``meta`` stands in for a GPU: same code path, no transfer
    timed), and of a dict lookup under a lock, batch by batch, interleaved."""
    meta = torch.device("meta")
    store.get(spec)
    store.get(spec, meta)
    get, key = store.get, spec.key
    lock, table = threading.Lock(), {key: store.get(spec)}
    ours, on_device, floor = [], [], []
    for _ in range(batches):
        start = time.perf_counter_ns()
        for _ in range(calls):
            get(spec)
        ours.append((time.perf_counter_ns() - start) / calls)
        start = time.perf_counter_ns()
        for _ in range(calls):
            get(spec, meta)
        on_device.append((time.perf_counter_ns() - start) / calls)
        start = time.perf_counter_ns()
        for _ in range(calls):
            with lock:
                table.get(key)
        floor.append((time.perf_counter_ns() - start) / calls)
    return ours, on_device, floor


def disk_vs_generate(directory: Path, spec, rounds: int) -> tuple[list[float], list[float], list[float]]:
    """Interleaved: disk hit (memory tier keeps nothing), generate(spec), and a
    full miss (evict, then get: lock, generate, encode, write)."""
    reader = PatternStore(directory, max_entries=0)
    writer = PatternStore(directory)
    writer.get(spec)
    disk, gen, miss = [], [], []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        reader.get(spec)
        disk.append(time.perf_counter_ns() - start)
        start = time.perf_counter_ns()
        generate(spec)
        gen.append(time.perf_counter_ns() - start)
        writer.evict(spec)
        start = time.perf_counter_ns()
        writer.get(spec)
        miss.append(time.perf_counter_ns() - start)
    assert reader.stats()["disk_hits"] == rounds and reader.stats()["generations"] == 0
    return disk, gen, miss


FRESH_CHILD = """
import json, sys, time
start = time.perf_counter_ns()
from patternstore import PatternStore, generate
exec(sys.argv[2])
imported = time.perf_counter_ns()
store = PatternStore(sys.argv[1])
opened = time.perf_counter_ns()
if sys.argv[4] == "get":
    store.get(SPECS[sys.argv[3]])
    assert store.stats()["disk_hits"] == 1, store.stats()
else:
    generate(SPECS[sys.argv[3]])
done = time.perf_counter_ns()
print(json.dumps({"import_ns": imported - start, "open_ns": opened - imported, "first_call_ns": done - opened}))
"""


def fresh_process_calls(directory: Path, names: list[str], rounds: int) -> dict[tuple[str, str], list[dict]]:
    """(spec name, "get" | "generate") -> one run per round: the first such
    call in a new interpreter, on a warm directory; interleaved."""
    for name in names:
        PatternStore(directory).get(SPECS[name])
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(rounds):
        for name in names:
            for call in ("get", "generate"):
                out = subprocess.run(
                    [sys.executable, "-c", textwrap.dedent(FRESH_CHILD), str(directory), SPECS_SOURCE, name, call],
                    env=child_env(), capture_output=True, text=True, check=True,
                ).stdout
                results.setdefault((name, call), []).append(json.loads(out))
    return results


CONCURRENT_CHILD = """
import json, os, sys, time
from patternstore import PatternStore
exec(sys.argv[3])
store = PatternStore(sys.argv[1])
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.001)
start = time.perf_counter_ns()
store.get(SPECS["bigbird-1M"])
took = time.perf_counter_ns() - start
stats = store.stats()
print(json.dumps({"generations": stats["generations"], "disk_hits": stats["disk_hits"],
                  "lock_timeouts": stats["lock_timeouts"], "get_ns": took}))
"""


def processes_on_one_cold_key(directory: Path, processes: int) -> dict:
    go = directory.parent / "go"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(CONCURRENT_CHILD), str(directory), str(go), SPECS_SOURCE],
            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(processes)
    ]
    for child in children:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
    go.touch()
    reports = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return {
        "processes": processes,
        "generations": sum(r["generations"] for r in reports),
        "disk_hits": sum(r["disk_hits"] for r in reports),
        "lock_timeouts": sum(r["lock_timeouts"] for r in reports),
        "slowest_get_ms": max(r["get_ns"] for r in reports) / 1e6,
    }


# ------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    parser.add_argument("--out", default=str(benchlib.RESULTS / "store.json"))
    args = parser.parse_args()
    batches, calls = (30, 2_000) if args.quick else (300, 10_000)
    rounds = {"dilated-8k": 10 if args.quick else 100, "bigbird-1M": 3 if args.quick else 15}
    fresh_rounds = 2 if args.quick else 8

    work = Path(tempfile.mkdtemp(prefix="bench-store-"))
    rows, extra = [], {}
    try:
        load_before = os.getloadavg()  # other programs' share of the cores, recorded beside the figures
        gflops_before = benchlib.matmul_gflops(calls=20)
        for name, spec in SPECS.items():
            store = PatternStore(work / f"memory-{name}")
            ours, on_device, floor = memory_hits(store, spec, batches, calls)
            rows.append({"spec": name, "case": "memory hit", **summary(ours)})
            rows.append({"spec": name, "case": "memory hit, device=tensor.device", **summary(on_device)})
            rows.append({"spec": name, "case": "  floor: dict lookup under a lock", **summary(floor)})
            disk, gen, miss = disk_vs_generate(work / f"disk-{name}", spec, rounds[name])
            rows.append({"spec": name, "case": "disk hit (same process)", **summary(disk)})
            rows.append({"spec": name, "case": "generation", **summary(gen)})
            rows.append({"spec": name, "case": "miss (lock+generate+encode+write)", **summary(miss)})
            extra[name] = {
                "nbytes": generate(spec).nbytes,
                "stored_bytes": len(encode(generate(spec))),
                "generate_over_disk_hit_p50": percentile(gen, 0.5) / percentile(disk, 0.5),
            }
        fresh = fresh_process_calls(work / "fresh", list(SPECS), fresh_rounds)
        for name in SPECS:
            hits, generations = fresh[(name, "get")], fresh[(name, "generate")]
            rows.append({"spec": name, "case": "disk hit (fresh process, first get)",
                         **summary([r["first_call_ns"] for r in hits])})
            rows.append({"spec": name, "case": "generation (fresh process, first call)",
                         **summary([r["first_call_ns"] for r in generations])})
            rows.append({"spec": name, "case": "  fresh process: open store",
                         **summary([r["open_ns"] for r in hits])})
            p50 = {r["case"]: r["p50_us"] for r in rows if r["spec"] == name}
            first_get = p50["disk hit (fresh process, first get)"]
            extra[name]["generate_over_fresh_process_hit_p50"] = p50["generation"] / first_get
            extra[name]["fresh_generate_over_fresh_process_hit_p50"] = (
                p50["generation (fresh process, first call)"] / first_get)
        concurrent = processes_on_one_cold_key(work / "concurrent" / "store", 8)
        gflops_after = benchlib.matmul_gflops(calls=20)
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    memory_p50 = max(r["p50_us"] for r in rows if r["case"] == "memory hit")
    large = extra["bigbird-1M"]
    dilated_stored = extra["dilated-8k"]["stored_bytes"]
    targets = {
        "memory hit p50 <= 0.5 us": {"value_us": memory_p50, "met": memory_p50 <= 0.5},
        "bigbird-1M disk hit >= 20x cheaper than generating (same process)": {
            "ratio": large["generate_over_disk_hit_p50"], "met": large["generate_over_disk_hit_p50"] >= 20},
        "bigbird-1M disk hit >= 10x cheaper than generating (both the first call of a fresh process)": {
            "ratio": large["fresh_generate_over_fresh_process_hit_p50"],
            "met": large["fresh_generate_over_fresh_process_hit_p50"] >= 10},
        "dilated entry stored in < 4 KiB": {"stored_bytes": dilated_stored, "met": dilated_stored < 4096},
        "8 processes on one cold key: exactly 1 generation": {
            "generations": concurrent["generations"], "met": concurrent["generations"] == 1},
    }
    result = {
        "benchmark": "store",
        "machine": benchlib.machine("cpu"),
        "fp32_mm_1024_gflops": {"before": gflops_before, "after": gflops_after},
        "load_average_1_5_15_min": {"before": load_before, "after": load_after},
        "settings": {"batches": batches, "calls_per_batch": calls, "rounds": rounds, "fresh_rounds": fresh_rounds},
        "specs": {name: {"spec": repr(spec), "key": spec.key, **extra[name]} for name, spec in SPECS.items()},
        "rows": rows,
        "concurrent_cold_key": concurrent,
        "targets": targets,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{'spec':<11} {'case':<40} {'n':>6} {'p50 us':>12} {'p99 us':>12}")
    for r in rows:
        print(f"{r['spec']:<11} {r['case']:<40} {r['n']:>6} {r['p50_us']:>12.3f} {r['p99_us']:>12.3f}")
    print(f"memory hit p50: {memory_p50:.3f} us")
    print(f"8 processes, one cold key: {concurrent}")
    print(f"fp32 mm 1024: {gflops_before:.1f} / {gflops_after:.1f} GFLOP/s (before / after)")
    for name, target in targets.items():
        print(f"[{'met' if target['met'] else 'NOT MET'}] {name}: "
              + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in target.items() if k != "met"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
