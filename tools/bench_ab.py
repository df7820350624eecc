"""A/B of two commits on one CPU case, in matmul units.

    python tools/bench_ab.py 69d2baf HEAD --case dilated --length 16384 [--pairs 3] [--calls 7] [--padded]

Each revision is checked out into a temporary ``git worktree`` (removed at
the end). For ``--pairs`` rounds, A then B, one fresh process per revision
runs with PYTHONPATH set to that worktree (the case code is this file's, the
library is the revision's), 2 threads, float32, under ``torch.no_grad()``
(69d2baf fails under ``inference_mode``). Each process makes the module,
calls it once untimed (its store, a fresh directory per revision, generates
the plan), then interleaves ``--calls`` calls of the case with a 2048^3
matmul and reports the median of each: the case in matmul units is what
compares across processes and load. Printed and written: per process, the
medians; per revision, the median over its processes; the ratio B / A of the
matmul units.

Cases, built only from names both 69d2baf and today export
(``ImprovedDilatedAttention``, ``BlockSparseAttention``): batch 1, 8 heads,
head_dim 64; ``dilated``: segments 2048/4096/8192, rates 1/2/4 (the CPU
benchmark's); ``sparse``: bigbird, block 128 (DeepSpeed's defaults).
``--padded``: batch 2, the second sequence's last eighth of keys padded
(a ``key_padding_mask``), for what the padded path costs.
``sparse-packed``: the same bigbird module over 256 packed documents
(``cu_seqlens``; ``tools/bench_packed_sparse.py``'s short mix, log-uniform
64..1K, seed 25, scaled to ``--length`` tokens); besides the forward, each
process times the host plan of 5 new splits (``packed_plan``, median:
``host_plan_s``), compared B / A in seconds.
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
from pathlib import Path

import benchlib

THREADS, HEADS, HEAD_DIM, MM_SIZE = 2, 8, 64, 2048
SEGMENTS, RATES = (2048, 4096, 8192), (1, 2, 4)
SPARSE_KIND, SPARSE_BLOCK = "bigbird", 128
CASES = ("dilated", "sparse", "sparse-packed")


def child(case: str, n: int, calls: int, padded: bool) -> dict:
    """In the revision's process: medians of the case and of the matmul, interleaved."""
    import torch

    import attention
    from attention import BlockSparseAttention, ImprovedDilatedAttention

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    module = ImprovedDilatedAttention(SEGMENTS, RATES) if case == "dilated" else \
        BlockSparseAttention(SPARSE_KIND, block_size=SPARSE_BLOCK)
    batch = 2 if padded else 1
    q, k, v = (torch.randn(batch, n, HEADS, HEAD_DIM) for _ in range(3))
    pad = None
    if padded:
        pad = torch.zeros(batch, n, dtype=torch.bool)
        pad[1, n - n // 8:] = True
    extra, call = {}, lambda: module(q, k, v, key_padding_mask=pad)
    if case == "sparse-packed":
        extra["host_plan_s"] = packed_host_plan_s(module, n)
        cu = torch.tensor([0, *torch.tensor(packed_lengths(n)).cumsum(0).tolist()])
        call = lambda: module(q, k, v, key_padding_mask=pad, cu_seqlens=cu)  # noqa: E731
    with torch.no_grad():
        runs = benchlib.interleave({case: call}, timed=benchlib.timer("cpu"), rounds=calls,
                                   reference=benchlib.matmul(MM_SIZE))
    if runs.failures:
        raise RuntimeError(f"{case} failed: {runs.failures}")
    return {"attention": attention.__file__, **runs.row(case), "matmul_s": runs.median("matmul"), **extra}


def packed_lengths(n: int) -> list[int]:
    from bench_packed_sparse import K, document_lengths, scaled

    return scaled(document_lengths(256, 64, K, seed=25), n)


def packed_host_plan_s(module, n: int) -> float:
    """Median host plan (``packed_plan``) of 5 new splits of the packed documents: no plan cache hit."""
    import time

    import torch
    from attention.sparse.packed import packed_plan

    lengths, times = packed_lengths(n), []
    for seed in range(5):
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(100 + seed)).tolist()
        split = torch.tensor([0, *torch.tensor([lengths[i] for i in order]).cumsum(0).tolist()])
        start = time.perf_counter()
        packed_plan(split, n, HEADS, torch.device("cpu"), False, module.block_size, module._description, None, None)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_child(worktree: Path, store: Path, case: str, n: int, calls: int, padded: bool, timeout_s: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(worktree), PATTERNSTORE_DIR=str(store), OMP_NUM_THREADS=str(THREADS))
    command = [sys.executable, str(Path(__file__).resolve()), "--child", case, "--length", str(n),
               "--calls", str(calls)] + (["--padded"] if padded else [])
    return benchlib.child_json(command, env=env, what=f"{worktree.name}: {case} at {n}", cwd=worktree,
                               timeout=timeout_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", nargs="?", help="revision A (e.g. 69d2baf)")
    parser.add_argument("b", nargs="?", help="revision B (e.g. HEAD)")
    parser.add_argument("--case", default="dilated", choices=CASES)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--pairs", type=int, default=3, help="A B rounds, one fresh process each")
    parser.add_argument("--calls", type=int, default=7, help="timed calls per process (median)")
    parser.add_argument("--padded", action="store_true", help="batch 2 with a key_padding_mask")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="limit of one process")
    parser.add_argument("--out", type=Path, default=benchlib.RESULTS / "ab.json")
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.length < 1 or args.pairs < 1 or args.calls < 1:
        parser.error(f"--length, --pairs and --calls must be >= 1, got {args.length}, {args.pairs}, {args.calls}")
    if args.padded and "sparse-packed" in (args.case, args.child):
        parser.error("--padded is for one sequence per row; the sparse-packed case packs its documents in one row")
    if args.child:
        print(json.dumps(child(args.child, args.length, args.calls, args.padded)))
        return
    if not (args.a and args.b):
        parser.error("give two revisions, A and B")
    revisions = {}
    for label, rev in (("A", args.a), ("B", args.b)):
        done = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], capture_output=True, text=True,
                              cwd=benchlib.REPO)
        if done.returncode != 0:
            parser.error(f"revision {label}: {rev!r} is not a commit of {benchlib.REPO}")
        revisions[label] = (rev, done.stdout.strip())

    tmp = Path(tempfile.mkdtemp(prefix="bench-ab-"))
    trees: dict[str, Path] = {}
    try:
        for label, (_, full) in revisions.items():
            trees[label] = tmp / label
            subprocess.run(["git", "worktree", "add", "--detach", str(trees[label]), full], cwd=benchlib.REPO,
                           check=True, capture_output=True)
        processes: dict[str, list[dict]] = {"A": [], "B": []}
        for pair in range(args.pairs):
            for label in ("A", "B"):
                result = run_child(trees[label], tmp / f"store-{label}", args.case, args.length, args.calls,
                                   args.padded, args.timeout_s)
                processes[label].append(result)
                plan = f", host plan {result['host_plan_s'] * 1e3:.2f} ms" if "host_plan_s" in result else ""
                print(f"pair {pair + 1} {label} ({revisions[label][0]}): {result['median_s'] * 1e3:9.2f} ms, "
                      f"matmul {result['matmul_s'] * 1e3:7.2f} ms, {result['matmul_units']:.3f} matmul units{plan}",
                      flush=True)
    finally:
        for tree in trees.values():
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=benchlib.REPO,
                           capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)

    medians = {label: {"revision": rev, "commit": full,
                       "matmul_units": statistics.median(p["matmul_units"] for p in processes[label]),
                       "median_s": statistics.median(p["median_s"] for p in processes[label])}
               for label, (rev, full) in revisions.items()}
    ratio = medians["B"]["matmul_units"] / medians["A"]["matmul_units"]
    if args.case == "sparse-packed":
        for label in medians:
            medians[label]["host_plan_s"] = statistics.median(p["host_plan_s"] for p in processes[label])
    report = {"benchmark": "tools/bench_ab.py", "machine": benchlib.machine("cpu", THREADS),
              "config": {"case": args.case, "length": args.length, "padded": args.padded, "pairs": args.pairs,
                         "calls": args.calls,
                         "threads": THREADS, "heads": HEADS, "head_dim": HEAD_DIM, "dtype": "float32",
                         "matmul": MM_SIZE, "no_grad": True},
              "processes": processes, "medians": medians, "ratio_b_over_a_matmul_units": ratio}
    if args.case == "sparse-packed":
        report["ratio_b_over_a_host_plan_s"] = medians["B"]["host_plan_s"] / medians["A"]["host_plan_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"A {args.a}: {medians['A']['matmul_units']:.3f}, B {args.b}: {medians['B']['matmul_units']:.3f} "
          f"matmul units (median of {args.pairs}); B/A {ratio:.3f} -> {args.out}")


if __name__ == "__main__":
    main()
