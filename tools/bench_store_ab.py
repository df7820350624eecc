"""Store hits before and after a change, in one run: memory-hit and disk-hit
p50 of a base revision (A) against this working tree (B), in the same
processes.

    PYTHONPATH=. python tools/bench_store_ab.py 3283e38 [--processes 6]

A's ``patternstore`` is extracted from git (``git archive``) and imported as
``patternstore_base`` next to this tree's ``patternstore`` (the package uses
relative imports only), so one process holds both and interleaves them call
by call: a process's load and caches fall on A and B alike. Each of
``--processes`` fresh processes times, with the thread's CPU clock
(``time.thread_time_ns``: on a shared, overloaded machine wall time counts
the slices other programs take; a page-cache read is CPU work and is
counted):

- memory hit: ``store.get(spec)`` of a held dilated pattern, per call
  (batches of ``--calls`` calls, A and B alternating batch by batch);
- disk hit: ``store.get`` on a store whose memory tier keeps nothing
  (``max_entries=0``), for a dilated entry (a SQLite row) and the bigbird
  1M-token layout (a 1.8 MB value file), A and B alternating call by call,
  each version on a directory it wrote itself.

Per process: the p50 of each case and side. Reported: per case, the median
over processes of A's and B's p50, and the median of the per-process ratios
B / A.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib

CASES = ("memory hit", "disk hit dilated-8k (row)", "disk hit bigbird-1M (file)")


def child(directory: Path, batches: int, calls: int, rounds: int) -> dict:
    """In one process, both versions: p50 (ns) of each case and side."""
    import importlib

    import torch

    torch.set_num_threads(1)
    clock = time.thread_time_ns
    sides = {"A": importlib.import_module("patternstore_base"), "B": importlib.import_module("patternstore")}
    held, readers, specs = {}, {}, {}
    for side, package in sides.items():
        dilated = package.DilatedSpec([2048, 4096, 8192], [1, 2, 4], 8)
        bigbird = package.SparseSpec("bigbird", seq_len=1048576, block_size=128, num_heads=8,
                                     different_layout_per_head=True)
        writer = package.PatternStore(directory / side / "disk")
        writer.get(dilated), writer.get(bigbird)
        readers[side] = package.PatternStore(directory / side / "disk", max_entries=0)
        held[side] = package.PatternStore(directory / side / "memory")
        held[side].get(dilated)
        specs[side] = {"dilated": dilated, "bigbird": bigbird}
    samples: dict[str, dict[str, list[float]]] = {side: {name: [] for name in CASES} for side in sides}
    for _ in range(batches):
        for side in sides:
            get, spec = held[side].get, specs[side]["dilated"]
            start = clock()
            for _ in range(calls):
                get(spec)
            samples[side]["memory hit"].append((clock() - start) / calls)
    for _ in range(rounds):
        for name, which in (("disk hit dilated-8k (row)", "dilated"), ("disk hit bigbird-1M (file)", "bigbird")):
            for side in sides:
                start = clock()
                readers[side].get(specs[side][which])
                samples[side][name].append(clock() - start)
    for side in sides:
        stats = readers[side].stats()
        assert stats["disk_hits"] == 2 * rounds and stats["generations"] == 0, (side, stats)
    return {"packages": {side: package.__file__ for side, package in sides.items()},
            "p50_ns": {side: {name: statistics.median(values) for name, values in by.items()}
                       for side, by in samples.items()}}


def run_child(base: Path, directory: Path, args: argparse.Namespace) -> dict:
    path = os.pathsep.join([str(benchlib.REPO), str(base)])
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(directory), "--batches",
               str(args.batches), "--calls", str(args.calls), "--rounds", str(args.rounds)]
    return benchlib.child_json(command, env=env, what="child", cwd=benchlib.REPO, timeout=1800)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", nargs="?", help="revision A (e.g. 3283e38); B is this working tree")
    parser.add_argument("--processes", type=int, default=6, help="fresh processes, each timing A and B")
    parser.add_argument("--batches", type=int, default=200, help="memory-hit batches per side and process")
    parser.add_argument("--calls", type=int, default=2000, help="calls per memory-hit batch")
    parser.add_argument("--rounds", type=int, default=60, help="disk hits of each spec per side and process")
    parser.add_argument("--out", type=Path, default=benchlib.RESULTS / "store_ab.json")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.processes, args.batches, args.calls, args.rounds) < 1:
        parser.error("--processes, --batches, --calls and --rounds must be >= 1")
    if args.child:
        print(json.dumps(child(args.child, args.batches, args.calls, args.rounds)))
        return
    if not args.base:
        parser.error("give the base revision")
    done = subprocess.run(["git", "rev-parse", "--verify", f"{args.base}^{{commit}}"], capture_output=True,
                          text=True, cwd=benchlib.REPO)
    if done.returncode != 0:
        parser.error(f"base: {args.base!r} is not a commit of {benchlib.REPO}")
    base = done.stdout.strip()

    tmp = Path(tempfile.mkdtemp(prefix="bench-store-ab-"))
    processes = []
    try:
        archive = subprocess.run(["git", "archive", base, "patternstore"], cwd=benchlib.REPO, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        (tmp / "patternstore").rename(tmp / "patternstore_base")
        load_before = os.getloadavg()
        for index in range(args.processes):
            result = run_child(tmp, tmp / f"stores-{index}", args)
            processes.append(result)
            print(f"process {index + 1}: " + "; ".join(
                f"{name} A {result['p50_ns']['A'][name] / 1e3:.3f} B {result['p50_ns']['B'][name] / 1e3:.3f} us"
                for name in CASES), flush=True)
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = {}
    for name in CASES:
        a = [p["p50_ns"]["A"][name] for p in processes]
        b = [p["p50_ns"]["B"][name] for p in processes]
        rows[name] = {"A_p50_us": statistics.median(a) / 1e3, "B_p50_us": statistics.median(b) / 1e3,
                      "ratio_b_over_a": statistics.median(y / x for x, y in zip(a, b))}
    report = {"benchmark": "tools/bench_store_ab.py", "machine": benchlib.machine("cpu", 1),
              "A": {"revision": args.base, "commit": base}, "B": {"tree": "working tree", "commit": benchlib.commit()},
              "config": {"processes": args.processes, "batches": args.batches, "calls": args.calls,
                         "rounds": args.rounds, "threads": 1, "clock": "time.thread_time_ns"},
              "load_average_1_5_15_min": {"before": load_before, "after": load_after},
              "rows": rows, "processes": processes}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, row in rows.items():
        print(f"{name:<28} A {row['A_p50_us']:10.3f} us  B {row['B_p50_us']:10.3f} us  "
              f"B/A (median of per-process ratios) {row['ratio_b_over_a']:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
