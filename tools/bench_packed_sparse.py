"""Benchmark of packed documents (``cu_seqlens``) in block-sparse attention.

    python tools/bench_packed_sparse.py [--quick] [--rounds R] [--budget-s S] [--out PATH]
                                        [--device cpu|cuda] [--dtype D] [--resume PATH]

Default: CPU, float32, 2 threads, batch 1, 8 heads of 64, bigbird with
block 128 (DeepSpeed's defaults: 3 window blocks, 1 global, 1 random),
forward. Two document mixes, drawn with a fixed seed: 16 documents
log-uniform in 512..16K, and 256 short documents log-uniform in 64..1K.
``--device cuda`` (``--dtype bfloat16`` from tools/bench_gpu.py, CUDA-event
timer, a 4096^3 matmul): 16 documents in 2K..128K and 256 in 256..8K
(about 0.5M tokens each), no BlockMask part (below: a CPU host-side
measurement). One case per mix, the JSON written after each; ``--budget-s``
stops new mixes from starting, ``--resume`` skips the mixes an earlier JSON
of this commit holds; every mix's targets also at the top level
(``targets``, "<mix>: <target>") for tools/bench_gpu.py.

Candidates, interleaved A B C D (tools/benchlib.py) with a square matmul
in the same rounds, medians:
- (a) ``packed``: one call with ``cu_seqlens``;
- (b) ``padded``: the documents as a batch padded to the longest, with a
  ``key_padding_mask``;
- (c) ``loop``: one call per document, outputs concatenated;
- (d) ``unpacked``: one sequence of the same total length (the reference).
Useful work = 4 * head_dim * heads * the (query, key) pairs the documents'
own layouts allow (partial last blocks counted by their real positions);
(d)'s is its own layout's. Efficiency = useful FLOP/s over the matmul's.
Targets: (a)'s efficiency >= 0.85 of (d)'s; (a) faster than (b) by at least
the padding fraction, time(a) <= (1 - padding) * time(b); (a) never slower
than (c). Also timed: the host plan of a new split (``packed_plan``: store
lookups, the composed CSR, the row groups), median of 5 new splits.

Second part (``blockmask``): the per-batch BlockMask of the fused path for
a packed 1M-token batch of 256 documents (``packed_plan`` +
``block_mask_from_csr``), time and memory, against ``create_block_mask``
with ``and_masks(document, pattern)`` at 16K-64K (as far as fits).

Writes tools/results/packed_sparse_cpu.json (``packed_sparse_cuda.json`` on CUDA).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

import benchlib

K = 1024
MIXES = {"16 docs 512..16K": (16, 512, 16 * K), "256 docs 64..1K": (256, 64, K)}
QUICK_MIXES = {"8 docs 64..1K": (8, 64, K), "64 docs 16..256": (64, 16, 256)}
CUDA_MIXES = {"16 docs 2K..128K": (16, 2 * K, 128 * K), "256 docs 256..8K": (256, 256, 8 * K)}


def document_lengths(count: int, low: int, high: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(count, generator=generator, dtype=torch.float64)
    return [int(x) for x in torch.exp(math.log(low) + u * (math.log(high) - math.log(low))).round().tolist()]


def scaled(lengths: list[int], total: int) -> list[int]:
    """``lengths`` scaled to sum to ``total`` (the last takes the rounding)."""
    out = [n * total // sum(lengths) for n in lengths]
    out[-1] += total - sum(out)
    return out


def allowed_pairs(module, length: int, heads: int) -> int:
    """(query, key) pairs of the module's layout at ``length`` (real positions only)."""
    counts, indices = module.layouts.layout(length, heads, torch.device("cpu"), False)
    bs = module.block_size
    rows = torch.repeat_interleave(torch.arange(counts.numel()), counts.flatten().long()) % counts.shape[1]
    size = lambda block: (length - block * bs).clamp(max=bs)  # noqa: E731 - positions in a block
    per_head = int((size(rows) * size(indices.long())).sum())
    return per_head * (heads if counts.shape[0] == 1 else 1)


def bench_mix(name, spec, module, args, report) -> None:
    from attention.sparse.packed import packed_plan

    count, low, high = spec
    lengths = document_lengths(count, low, high, seed=25)
    total, longest = sum(lengths), max(lengths)
    heads, dim = args.heads, args.head_dim
    device, dtype = args.device, getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, total, heads, dim, generator=generator).to(device, dtype) for _ in range(3))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device=device)
    bounds = cu.tolist()
    padded = [torch.zeros(count, longest, heads, dim, device=device, dtype=dtype) for _ in range(3)]
    mask = torch.ones(count, longest, dtype=torch.bool, device=device)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        for buffer, x in zip(padded, (q, k, v)):
            buffer[i, : b - a] = x[0, a:b]
        mask[i, : b - a] = False

    def loop():
        return torch.cat([module(q[:, a:b], k[:, a:b], v[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])], 1)

    candidates = {
        "packed": lambda: module(q, k, v, cu_seqlens=cu),
        "padded": lambda: module(*padded, key_padding_mask=mask),
        "loop": loop,
        "unpacked": lambda: module(q, k, v),
    }
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16/fp16: the rounding of one output
    with torch.no_grad():
        torch.testing.assert_close(candidates["packed"](), loop(), rtol=tolerance, atol=tolerance)
        runs = benchlib.interleave(candidates, timed=benchlib.timer(device), rounds=args.rounds,
                                   reference=benchlib.matmul(args.matmul, device, dtype))
        plan_s = []
        for seed in range(5):  # a new split of the same documents each time: no plan cache hit
            order = torch.randperm(count, generator=torch.Generator().manual_seed(100 + seed)).tolist()
            split = torch.tensor([0] + torch.tensor([lengths[i] for i in order]).cumsum(0).tolist(), device=device)
            benchlib.synchronize(device)
            start = time.perf_counter()
            packed_plan(split, total, heads, q.device, False, module.block_size, module._description, None, None)
            benchlib.synchronize(device)
            plan_s.append(time.perf_counter() - start)
    matmul_flops = 2 * args.matmul**3 / runs.median("matmul")
    useful = 4 * dim * sum(allowed_pairs(module, n, heads) for n in lengths)
    useful_d = 4 * dim * allowed_pairs(module, total, heads)
    eff = {c: (useful_d if c == "unpacked" else useful) / runs.median(c) / matmul_flops for c in candidates}
    padding = 1 - total / (count * longest)
    aligned = sum(-(-n // module.block_size) * module.block_size for n in lengths)
    row = {
        "mix": name, "documents": count, "total_tokens": total, "longest": longest,
        "padding_fraction": padding, "alignment_fill_fraction": 1 - total / aligned,
        "candidates": {c: runs.row(c) for c in candidates}, "matmul": runs.row("matmul"),
        "efficiency": eff, "host_plan_s_median": statistics.median(plan_s),
        "targets": {
            "a_eff_over_d_eff": eff["packed"] / eff["unpacked"],
            "a_eff_over_d_eff_met": eff["packed"] / eff["unpacked"] >= 0.85,
            "a_time_over_b_time": runs.ratio("packed", "padded"),
            "a_time_over_b_time_bound": 1 - padding,
            "a_vs_b_met": runs.ratio("packed", "padded") <= 1 - padding,
            "a_time_over_c_time": runs.ratio("packed", "loop"),
            "a_vs_c_met": runs.ratio("packed", "loop") <= 1.0,
        },
    }
    report.add(**row)
    print(name, {c: round(runs.median(c), 3) for c in runs.times}, row["targets"], flush=True)


def build_packed_mask(module, heads: int, lengths: list[int], rotate: int, longest_row: bool) -> tuple[float, int]:
    """Seconds and peak RSS growth of the fused path's BlockMask of a new
    split (``lengths`` rotated): ``packed_plan`` + ``block_mask_from_csr``."""
    from attention.block_mask import block_mask_from_csr
    from attention.sparse.packed import packed_plan

    bs, total = module.block_size, sum(lengths)
    order = lengths[rotate:] + lengths[:rotate]
    split = torch.tensor([0] + torch.tensor(order).cumsum(0).tolist())
    benchlib.reset_peak_rss()
    before = benchlib.status_bytes("VmRSS")
    start = time.perf_counter()
    plan = packed_plan(split, total, heads, torch.device("cpu"), False, bs, module._description, None, None)
    block_mask_from_csr(plan.kv_num_blocks, plan.kv_indices, block_size=bs, q_len=plan.length, kv_len=plan.length,
                        causal=False, key_padding_mask=plan.padding, padded_blocks=plan.fill_blocks,
                        width=plan.width if longest_row else None)
    return time.perf_counter() - start, benchlib.status_bytes("VmHWM") - before


def packed_block_mask(module, args) -> dict:
    """The 1M-token batch's BlockMask, four new splits each: rows as wide as
    the longest (what CUDA builds) and ``nb``-wide (what CPU flex needs)."""
    total = args.mask_tokens
    lengths = scaled(document_lengths(args.mask_documents, 64, 16 * K, seed=7), total)
    result = {"tokens": total, "documents": len(lengths)}
    for form in ("longest_row", "nb_wide"):
        runs = [build_packed_mask(module, args.heads, lengths, attempt, form == "longest_row") for attempt in range(4)]
        result[form] = {"median_s": statistics.median(t for t, _ in runs), "times_s": [t for t, _ in runs],
                        "peak_rss_growth_bytes": max(m for _, m in runs)}
    return result


def cbm_lengths(n: int, args, seed: int) -> list[int]:
    """The documents of a create_block_mask case: the 1M mix's density at ``n`` tokens."""
    return scaled(document_lengths(max(1, n * args.mask_documents // args.mask_tokens), 64, 16 * K, seed=seed), n)


def bench_block_mask(module, args, report, budget) -> None:
    """The fused path's per-batch BlockMask against create_block_mask (module docstring)."""
    from torch.nn.attention.flex_attention import and_masks, create_block_mask

    heads, bs = args.heads, module.block_size
    ours = packed_block_mask(module, args)
    report.data["blockmask_packed"] = ours
    report.write()
    print("packed BlockMask", ours, flush=True)
    rows = []
    compiled_cbm = torch.compile(create_block_mask)
    for n in args.cbm_lengths:
        if not budget.allows({"create_block_mask": n}, 0):
            break
        nb = -(-n // bs)
        counts, indices = module.layouts.layout(nb * bs, heads, torch.device("cpu"), False)
        table = torch.zeros(nb, nb, dtype=torch.bool)
        table[torch.repeat_interleave(torch.arange(nb), counts[0].long()), indices.long()] = True
        document, starts = torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)

        def split(seed: int) -> None:
            """A new batch: the tensors the mask_mod reads, rewritten in place (no recompile)."""
            sizes = cbm_lengths(n, args, seed)
            document.copy_(torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)))
            starts.copy_(torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist())[document])

        def same_document(b, h, q_idx, kv_idx):
            return document[q_idx] == document[kv_idx]

        def pattern(b, h, q_idx, kv_idx):  # each document's layout from its first token
            return table[(q_idx - starts[q_idx]) // bs, (kv_idx - starts[kv_idx]) // bs]

        mask_mod = and_masks(same_document, pattern)
        row = {"tokens": n}
        variants = [("compiled_first", compiled_cbm, 1), ("compiled_steady", compiled_cbm, 2)]
        if n <= args.eager_cbm_max:
            variants.insert(0, ("eager", create_block_mask, 0))
        for label, build, seed in variants:
            split(seed)
            try:
                benchlib.reset_peak_rss()
                before = benchlib.status_bytes("VmRSS")
                start = time.perf_counter()
                build(mask_mod, 1, 1, n, n, device="cpu", BLOCK_SIZE=bs)
                row[label] = {"s": time.perf_counter() - start,
                              "peak_rss_growth_bytes": benchlib.status_bytes("VmHWM") - before}
            except Exception as error:  # noqa: BLE001 - recorded, the others go on
                row[label] = benchlib.failure(error)
        if "s" in row.get("compiled_steady", {}):
            row["steady_over_packed_1m"] = row["compiled_steady"]["s"] / ours["longest_row"]["median_s"]
        rows.append(row)
        report.data["blockmask_create_block_mask"] = rows
        report.write()
        print("create_block_mask", row, flush=True)
        if row.get("compiled_steady", {}).get("peak_rss_growth_bytes", 0) > args.cbm_memory_bytes:
            budget.skipped.append({"create_block_mask": "longer lengths", "reason": "memory"})
            break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the script")
    parser.add_argument("--rounds", type=int, default=3)
    benchlib.add_arguments(parser)  # --device, --dtype, --budget-s (default 1800 here), --out, --resume
    parser.add_argument("--skip-blockmask", action="store_true", help="the mixes only (always so on CUDA)")
    parser.add_argument("--packed-blockmask-only", action="store_true",
                        help="measure the packed BlockMask again into the existing --out JSON (its other "
                             "entries kept, the commit of this measurement recorded beside it)")
    args = parser.parse_args()
    args.out = args.out or benchlib.RESULTS / f"packed_sparse_{args.device}.json"
    threads = 2 if args.device == "cpu" else None
    if threads:
        torch.set_num_threads(threads)
    args.heads, args.head_dim, args.block = (2, 16, 16) if args.quick else (8, 64, 128)
    args.matmul = 256 if args.quick else 2048 if args.device == "cpu" else 4096
    args.mask_tokens, args.mask_documents = (4 * K, 16) if args.quick else (1 << 20, 256)
    args.cbm_lengths = (1 * K, 2 * K) if args.quick else (16 * K, 32 * K, 64 * K)
    args.eager_cbm_max = 1 * K if args.quick else 16 * K  # eager materializes n x n int64 intermediates
    args.cbm_memory_bytes = 4 << 30  # stop before a longer length when one took more (shared 24 GiB machine)
    from attention import BlockSparseAttention
    from patternstore import PatternStore

    store = PatternStore(Path(tempfile.mkdtemp(prefix="bench-packed-")))
    module = BlockSparseAttention("bigbird", block_size=args.block, store=store)
    config = {"kind": "bigbird", "block_size": args.block, "params": module.params, "heads": args.heads,
              "head_dim": args.head_dim, "dtype": args.dtype, "threads": threads, "rounds": args.rounds,
              "matmul": args.matmul, "mode": "forward"}
    if args.device != "cpu":
        config["device"] = args.device
    if args.packed_blockmask_only:
        data = json.loads(args.out.read_text())
        ours = packed_block_mask(module, args)
        data["blockmask_packed"] = {**ours, "machine": benchlib.machine("cpu", 2)}
        for row in data.get("blockmask_create_block_mask", []):
            if "s" in row.get("compiled_steady", {}):
                row["steady_over_packed_1m"] = row["compiled_steady"]["s"] / ours["longest_row"]["median_s"]
                # ours on the steady case's own documents (seed 2), three new splits
                runs = [build_packed_mask(module, args.heads, cbm_lengths(row["tokens"], args, 2), r, True)
                        for r in range(3)]
                row["packed_same_length_s"] = statistics.median(t for t, _ in runs)
                row["steady_over_packed_same_length"] = row["compiled_steady"]["s"] / row["packed_same_length_s"]
        args.out.write_text(json.dumps(data, indent=1, default=str) + "\n")
        print("packed BlockMask", ours, flush=True)
        return
    report = benchlib.Report([args.out], "packed_sparse", config, device=args.device, threads=threads,
                             resume=args.resume)
    budget = benchlib.Budget(1800.0 if args.budget_s is None else args.budget_s)
    mixes = QUICK_MIXES if args.quick else MIXES if args.device == "cpu" else CUDA_MIXES
    for name, spec in mixes.items():
        if report.has(mix=name) or not budget.allows({"mix": name}):
            continue
        try:
            bench_mix(name, spec, module, args, report)
        except torch.OutOfMemoryError as error:  # recorded; the next mix goes on (a wrong output still stops)
            report.fail({"mix": name}, error)
        benchlib.free_memory()
        collect_targets(report)
    if args.skip_blockmask or args.device != "cpu":
        budget.skipped.append({"blockmask": "all", "reason": "--skip-blockmask" if args.skip_blockmask else
                               "a CPU host-side measurement"})
    else:
        bench_block_mask(module, args, report, budget)
    report.data["skipped"] = budget.skipped
    collect_targets(report)


def collect_targets(report: benchlib.Report) -> None:
    """Every mix's targets (resumed ones too) at the top level, "<mix>: <target>", as tools/bench_gpu.py reads them."""
    names = {"a_eff_over_d_eff": ("packed/unpacked efficiency", 0.85),
             "a_time_over_b_time": ("time packed/padded", None), "a_time_over_c_time": ("time packed/loop", 1.0)}
    verdicts = {"a_eff_over_d_eff": "a_eff_over_d_eff_met", "a_time_over_b_time": "a_vs_b_met",
                "a_time_over_c_time": "a_vs_c_met"}
    report.data["targets"] = {
        f"{row['mix']}: {label}": {"value": row["targets"][key], "met": row["targets"][verdicts[key]],
                                   "target": row["targets"]["a_time_over_b_time_bound"] if bound is None else bound}
        for row in report.data["rows"] for key, (label, bound) in names.items()}
    report.write()


if __name__ == "__main__":
    main()
