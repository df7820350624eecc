"""Store hits before and after a change, in one run: memory-hit and disk-hit
p50 of a base revision (A) against this working tree (B).

    PYTHONPATH=. python tools/bench_store_ab.py 3283e38 [--pairs 6]

A is checked out into a temporary ``git worktree`` (removed at the end). For
``--pairs`` rounds, A then B, one fresh process per side runs with
PYTHONPATH on its tree (the case code is this file's, the library is the
side's), and times, interleaved within the process:

- memory hit: ``store.get(spec)`` of a held pattern, per call (batches of
  ``--calls`` calls, ``perf_counter_ns``), next to the same loop over a dict
  lookup under a ``threading.Lock`` (the floor: a same-process reference);
- disk hit: ``store.get`` on a store whose memory tier keeps nothing
  (``max_entries=0``), for a dilated entry (a SQLite row) and the
  bigbird 1M-token layout (a 1.8 MB value file), next to a plain read of
  that file into a fresh buffer (the reference).

Per process: the p50 of each. Reported: per side, the median over its
processes; the ratio B / A of those medians, and of the p50 over the
process's own reference (memory hit over the floor, disk hit over the plain
read), which cancels machine drift between processes.
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
import threading
import time
from pathlib import Path

import benchlib

CASES = ("memory hit", "disk hit dilated-8k (row)", "disk hit bigbird-1M (file)")
REFERENCES = {"memory hit": "floor: dict lookup under a lock", "disk hit dilated-8k (row)": "plain read of the file",
              "disk hit bigbird-1M (file)": "plain read of the file"}


def p50(samples: list[float]) -> float:
    return statistics.median(samples)


def child(directory: Path, batches: int, calls: int, rounds: int) -> dict:
    """In the side's process: p50 (ns) of each case and reference, interleaved."""
    import torch

    import patternstore
    from patternstore import DilatedSpec, PatternStore, SparseSpec

    torch.set_num_threads(1)
    dilated = DilatedSpec([2048, 4096, 8192], [1, 2, 4], 8)
    bigbird = SparseSpec("bigbird", seq_len=1048576, block_size=128, num_heads=8, different_layout_per_head=True)
    writer = PatternStore(directory / "disk")
    writer.get(dilated), writer.get(bigbird)
    reader = PatternStore(directory / "disk", max_entries=0)
    (value_file,) = (directory / "disk").rglob("*.val")
    held = PatternStore(directory / "memory")
    held.get(dilated)
    lock, table = threading.Lock(), {dilated.key: held.get(dilated)}
    samples: dict[str, list[float]] = {name: [] for name in (*CASES, *set(REFERENCES.values()))}
    get, key = held.get, dilated.key
    for _ in range(batches):
        start = time.perf_counter_ns()
        for _ in range(calls):
            get(dilated)
        samples["memory hit"].append((time.perf_counter_ns() - start) / calls)
        start = time.perf_counter_ns()
        for _ in range(calls):
            with lock:
                table.get(key)
        samples["floor: dict lookup under a lock"].append((time.perf_counter_ns() - start) / calls)
    for _ in range(rounds):
        for name, spec in (("disk hit dilated-8k (row)", dilated), ("disk hit bigbird-1M (file)", bigbird)):
            start = time.perf_counter_ns()
            reader.get(spec)
            samples[name].append(time.perf_counter_ns() - start)
        start = time.perf_counter_ns()
        with open(value_file, "rb", buffering=0) as source:
            buffer = bytearray(os.fstat(source.fileno()).st_size)
            source.readinto(buffer)
        samples["plain read of the file"].append(time.perf_counter_ns() - start)
    stats = reader.stats()
    assert stats["disk_hits"] == 2 * rounds and stats["generations"] == 0, stats
    return {"patternstore": patternstore.__file__, "p50_ns": {name: p50(values) for name, values in samples.items()}}


def run_child(tree: Path, directory: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(directory), "--batches",
               str(args.batches), "--calls", str(args.calls), "--rounds", str(args.rounds)]
    done = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{tree}: child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", nargs="?", help="revision A (e.g. 3283e38); B is this working tree")
    parser.add_argument("--pairs", type=int, default=6, help="A B rounds, one fresh process each")
    parser.add_argument("--batches", type=int, default=200, help="memory-hit batches per process")
    parser.add_argument("--calls", type=int, default=5000, help="calls per memory-hit batch")
    parser.add_argument("--rounds", type=int, default=60, help="disk hits of each spec per process")
    parser.add_argument("--out", type=Path, default=benchlib.RESULTS / "store_ab.json")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.pairs, args.batches, args.calls, args.rounds) < 1:
        parser.error("--pairs, --batches, --calls and --rounds must be >= 1")
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
    trees = {"A": tmp / "A", "B": benchlib.REPO}
    processes: dict[str, list[dict]] = {"A": [], "B": []}
    try:
        subprocess.run(["git", "worktree", "add", "--detach", str(trees["A"]), base], cwd=benchlib.REPO,
                       check=True, capture_output=True)
        load_before = os.getloadavg()
        for pair in range(args.pairs):
            for side in ("A", "B"):
                work = tmp / f"store-{side}-{pair}"
                result = run_child(trees[side], work, args)
                shutil.rmtree(work, ignore_errors=True)
                processes[side].append(result)
                print(f"pair {pair + 1} {side}: " + ", ".join(
                    f"{name} {value / 1e3:.3f} us" for name, value in result["p50_ns"].items()), flush=True)
        load_after = os.getloadavg()
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(trees["A"])], cwd=benchlib.REPO,
                       capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)

    def median(side: str, name: str) -> float:
        return statistics.median(p["p50_ns"][name] for p in processes[side])

    def relative(side: str, name: str) -> float:
        return statistics.median(p["p50_ns"][name] / p["p50_ns"][REFERENCES[name]] for p in processes[side])

    rows = {name: {"A_p50_us": median("A", name) / 1e3, "B_p50_us": median("B", name) / 1e3,
                   "ratio_b_over_a": median("B", name) / median("A", name),
                   "reference": REFERENCES[name],
                   "ratio_b_over_a_of_p50_over_reference": relative("B", name) / relative("A", name)}
            for name in CASES}
    report = {"benchmark": "tools/bench_store_ab.py", "machine": benchlib.machine("cpu", 1),
              "A": {"revision": args.base, "commit": base}, "B": {"tree": "working tree", "commit": benchlib.commit()},
              "config": {"pairs": args.pairs, "batches": args.batches, "calls": args.calls, "rounds": args.rounds,
                         "threads": 1},
              "load_average_1_5_15_min": {"before": load_before, "after": load_after},
              "rows": rows, "processes": processes}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, row in rows.items():
        print(f"{name:<28} A {row['A_p50_us']:10.3f} us  B {row['B_p50_us']:10.3f} us  B/A {row['ratio_b_over_a']:.3f}"
              f"  (over {row['reference']}: {row['ratio_b_over_a_of_p50_over_reference']:.3f})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
