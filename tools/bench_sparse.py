"""Benchmark of block-sparse attention against FlexAttention and masked SDPA.

    python tools/bench_sparse.py [--device cpu|cuda] [--dtype D] [--quick] [--budget-s S]
                                 [--out PATH] [--resume PATH]

Presets (by device):
- cpu: float32, batch 1, 8 heads, head_dim 64, block 128, forward only (CPU
  FlexAttention has no backward); kinds bigbird, bslongformer, local, fixed
  (DeepSpeed's defaults) at 4K, 16K, 64K; target 1: >= 5x faster than masked
  SDPA at 32K with about 90% block sparsity (``SPARSE_90``); target 2: first
  output of a fresh process at 256K with the layout in the store >= 10x faster
  than building the mask with ``create_block_mask``.
- gpu: bf16 (``--dtype``), 16 heads, head_dim 128, block 128; bigbird,
  bslongformer, local at 32K..256K, forward and forward+backward; target:
  within 5% of flex; first output at the longest length run; a profile
  (``benchlib.profile_calls``: host ops, kernels and the top kernels per
  call) of ours and flex-cbm at the first kind and length, forward.

Candidates of a case, interleaved with a square matmul (tools/benchlib.py),
medians: ``ours`` (``BlockSparseAttention``, layout already looked up);
``flex-cbm`` (compiled ``flex_attention`` on a ``BlockMask`` from
``create_block_mask`` whose mask_mod reads the same layout as a block table,
what a flex user writes; its first call is reported apart); ``sdpa-mask``
(SDPA with the dense boolean mask, built outside the timing, where it fits).
Mask building is timed beside: ``create_block_mask`` eager (short lengths)
and compiled (first call and steady), against the block mask built from the
stored layout. First output: one fresh process per candidate, from before the
module (or mask) is made to the output, after imports and inputs (the same
for both); the eager ``create_block_mask`` at that length is extrapolated as
a * n^2 from the cheapest measured a.

Efficiency = useful FLOP/s / matmul FLOP/s, useful work = 4 * head_dim *
allowed query-key pairs (forward; forward+backward 3x). Writes
tools/results/bench_sparse.json and .png (on CUDA bench_sparse_cuda.*).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import benchlib

K = 1024
PRESETS = {
    "cpu": {"heads": 8, "head_dim": 64, "block": 128, "kinds": ("bigbird", "bslongformer", "local", "fixed"),
            "lengths": (4 * K, 16 * K, 64 * K), "modes": ("forward",), "matmul": 2048, "seconds": 0.0,
            "rounds": 3, "small": 16 * K, "sparse_90_length": 32 * K, "first_output_length": 256 * K,
            "profile": False},
    "gpu": {"heads": 16, "head_dim": 128, "block": 128, "kinds": ("bigbird", "bslongformer", "local"),
            "lengths": (32 * K, 64 * K, 128 * K, 256 * K), "modes": ("forward", "forward+backward"),
            "matmul": 8192, "seconds": 0.5, "rounds": None, "small": 64 * K, "sparse_90_length": None,
            "first_output_length": None, "profile": True},
}
QUICK = {"heads": 2, "head_dim": 32, "block": 16, "kinds": ("bigbird", "local"), "lengths": (256, 512),
         "matmul": 256, "small": 512, "sparse_90_length": 512, "first_output_length": 512, "profile": True}
# A layout of ~90% block sparsity at 32K (target 1); fixed's global columns
# grow with n (25% dense, ~40 s a call at 64K): it runs up to "small" only.
SPARSE_90 = ("bigbird", {"num_sliding_window_blocks": 21, "num_random_blocks": 3, "num_global_blocks": 1})


def block_table(spec, device) -> torch.Tensor:
    """bool [layout_heads, nb, nb] of active block pairs, from the layout's CSR."""
    from patternstore import generate

    pattern = generate(spec)
    counts, indices = pattern["kv_num_blocks"], pattern["kv_indices"]
    layout_heads, nb = counts.shape
    table = torch.zeros(layout_heads * nb, nb, dtype=torch.bool)
    table[torch.repeat_interleave(torch.arange(layout_heads * nb), counts.flatten().long()), indices.long()] = True
    return table.view(layout_heads, nb, nb).to(device)


def table_mask_mod(table: torch.Tensor, block: int, causal: bool):
    """A mask_mod that reads the layout as a block table; per-head tables are indexed by head."""
    per_head = table.shape[0] > 1

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = table[h if per_head else 0, q_idx // block, kv_idx // block]
        return allowed & (kv_idx <= q_idx) if causal else allowed
    return mask_mod


def make_cbm(table, block: int, n: int, device: str, causal: bool, compiled: bool = True):
    from torch.nn.attention.flex_attention import create_block_mask

    build = torch.compile(create_block_mask) if compiled else create_block_mask
    return build(table_mask_mod(table, block, causal), None, None, n, n, device=device, BLOCK_SIZE=block)


def allowed_pairs(table: torch.Tensor, block: int, heads: int, causal: bool) -> int:
    """Query-key pairs the layout allows over all heads (n a multiple of the block)."""
    diagonal = int(table.diagonal(dim1=1, dim2=2).sum())
    off = int(table.sum()) - diagonal
    return (off * block * block + diagonal * (block * (block + 1) // 2 if causal else block * block)) \
        * (heads // table.shape[0])


FLEX: dict[str, object] = {}


def compiled_flex():
    if "flex" not in FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        FLEX["flex"] = torch.compile(flex_attention, dynamic=False)
    return FLEX["flex"]


def timed_once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_case(cfg, device, dtype, kind, params, n, mode, store) -> dict:
    """One (kind, params, n, mode): mask-building times and the interleaved candidates."""
    from attention import BlockSparseAttention
    from patternstore import SparseSpec

    heads, d, block = cfg["heads"], cfg["head_dim"], cfg["block"]
    spec = SparseSpec(kind, seq_len=n, block_size=block, num_heads=heads, **params)
    causal = spec.params["attention"] == "unidirectional"
    module = BlockSparseAttention(kind, block_size=block, store=store, **params)
    table = block_table(spec, device)
    row = {"kind": kind, "params": params, "length": n, "mode": mode, "causal": causal,
           "active_block_fraction": float(table.float().mean())}
    q, k, v = (torch.randn(1, n, heads, d, device=device, dtype=dtype, requires_grad=mode != "forward")
               for _ in range(3))
    grad_out = torch.randn_like(q)
    with torch.no_grad():
        module(q, k, v)  # the layout lookup, outside the timings
    if device == "cpu":  # every case compiles afresh: first-call figures include the compile
        torch._dynamo.reset()  # (not on CUDA: a compile per case would take most of its budget)
    row["stored_block_mask_s"] = timed_once(lambda: benchlib.block_mask(store.get(spec)))
    if n <= cfg["small"] and mode == "forward":
        row["create_block_mask_eager_s"] = timed_once(lambda: make_cbm(table, block, n, device, causal, False))
    start = time.perf_counter()
    cbm = make_cbm(table, block, n, device, causal)
    row["create_block_mask_compiled_first_s"] = time.perf_counter() - start
    row["create_block_mask_compiled_s"] = timed_once(lambda: make_cbm(table, block, n, device, causal))
    flex = compiled_flex()

    def flex_cbm(q, k, v):
        return flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=cbm).transpose(1, 2)

    functions = {"ours": module, "flex-cbm": flex_cbm}
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else 1 << 62
    if mode == "forward" and n <= cfg["small"] and n * n * (1 + torch.finfo(dtype).bits // 8) < free // 4:
        position = torch.arange(n, device=device)
        dense = table[:, position // block][:, :, position // block]  # [layout_heads, n, n]
        if causal:
            dense &= position[None, :] <= position[:, None]
        functions["sdpa-mask"] = lambda q, k, v: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=dense[None]).transpose(1, 2)
    if mode == "forward":
        with torch.no_grad():
            row["flex_first_call_s"] = timed_once(lambda: flex_cbm(q, k, v))
    calls = {}
    for name, fn in functions.items():
        if mode == "forward":
            def call(fn=fn):
                with torch.no_grad():
                    return fn(q, k, v)
        else:
            def call(fn=fn):
                return torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)
        calls[name] = call
    runs = benchlib.interleave(calls, timed=benchlib.timer(device), rounds=cfg["rounds"], seconds=cfg["seconds"],
                               warmup=1 if device == "cpu" else 2,
                               reference=benchlib.matmul(cfg["matmul"], device, dtype if device == "cuda" else
                                                         torch.float32))
    if cfg["profile"] and mode == "forward" and (kind, n) == (cfg["kinds"][0], cfg["lengths"][0]):
        # Where a gap to flex goes: host ops, kernels launched and the top kernels, one case.
        row["profile"] = benchlib.profile_calls({name: calls[name] for name in ("ours", "flex-cbm")}, device)
    work = 4 * d * allowed_pairs(table, block, heads, causal) * (1 if mode == "forward" else 3)
    matmul_rate = 2 * cfg["matmul"] ** 3 / runs.median("matmul")
    row.update(useful_gflop=work / 1e9, failures=runs.failures,
               candidates={name: {**runs.row(name), "efficiency": work / runs.median(name) / matmul_rate}
                           for name in runs.times if name != "matmul"},
               ours_over={name: runs.ratio("ours", name) for name in runs.times if name not in ("ours", "matmul")}
               if "ours" in runs.times else {})
    return row


CHILD = """
import json, sys, time
import torch
sys.path.insert(0, sys.argv[1])  # tools/ (benchlib, bench_sparse): a -c child has no script folder on sys.path
import benchlib
from attention import BlockSparseAttention
from patternstore import SparseSpec
which, kind, n, heads, d, block, device, dtype = sys.argv[2:]
n, heads, d, block, dtype = int(n), int(heads), int(d), int(block), getattr(torch, dtype)
torch.manual_seed(0)
q, k, v = (torch.randn(1, n, heads, d, device=device, dtype=dtype) for _ in range(3))
benchlib.synchronize(device)
result = {}
if which == "flex-cbm":  # without a store the layout must be generated: timed apart, not counted
    import bench_sparse as bench
    start = time.perf_counter()
    spec = SparseSpec(kind, seq_len=n, block_size=block, num_heads=heads)
    table = bench.block_table(spec, device)
    result["layout_generation_s"] = time.perf_counter() - start
    causal = spec.params["attention"] == "unidirectional"
start = time.perf_counter()
with torch.no_grad():
    if which == "ours":
        out = BlockSparseAttention(kind, block_size=block)(q, k, v)
    else:
        cbm = bench.make_cbm(table, block, n, device, causal)
        out = bench.compiled_flex()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                    block_mask=cbm).transpose(1, 2)
    benchlib.synchronize(device)
result["first_output_s"] = time.perf_counter() - start
result["output_finite"] = bool(torch.isfinite(out).all())
print(json.dumps(result))
"""


def first_output(cfg, device: str, dtype_name: str, kind: str, n: int, timeout_s: float) -> dict:
    """Fresh processes: ours once to put the layout in the store (untimed), then ours and flex-cbm."""
    row = {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(benchlib.REPO), os.environ.get("PYTHONPATH")])))
    for which in ("ours", "ours", "flex-cbm"):
        command = [sys.executable, "-c", CHILD, str(Path(__file__).parent), which, kind, str(n), str(cfg["heads"]),
                   str(cfg["head_dim"]), str(cfg["block"]), device, dtype_name]
        row[which] = benchlib.child_json(command, env=env, what=f"first output {which}", timeout=timeout_s)
    row["speedup"] = row["flex-cbm"]["first_output_s"] / row["ours"]["first_output_s"]
    return row


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = [r for r in data["rows"] if r.get("section") == "kinds"]
    for i, (kind, mode) in enumerate(sorted({(r["kind"], r["mode"]) for r in rows})):
        for name, style in (("ours", "-o"), ("flex-cbm", ":^"), ("sdpa-mask", "--s")):
            points = [(r["length"], r["candidates"][name]["median_s"]) for r in rows
                      if (r["kind"], r["mode"]) == (kind, mode) and name in r["candidates"]]
            if points:
                left.plot(*zip(*points), style, color=f"C{i}", label=f"{kind} {mode[:3]} {name}")
    left.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="median time (s)")
    left.legend(fontsize=6, ncol=2)
    first = [r for r in data["rows"] if r.get("section") == "first_output"]
    labels = [f"{r['kind']} {r['length'] // K}K" for r in first]
    right.bar(labels, [r["speedup"] for r in first])
    right.set(ylabel="first output: create_block_mask+flex / ours", yscale="log")
    fig.suptitle(f"{data['machine'].get('device_name', data['machine']['cpu'])}, {data['config']['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    benchlib.add_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = parser.parse_args()
    preset = "gpu" if args.device == "cuda" else "cpu"
    cfg = {**PRESETS[preset], **(QUICK if args.quick else {})}
    dtype = getattr(torch, args.dtype)
    out = args.out or benchlib.RESULTS / ("bench_sparse.json" if args.device == "cpu" else
                                          f"bench_sparse_{args.device}.json")
    os.environ["PATTERNSTORE_DIR"] = tempfile.mkdtemp(prefix="bench-sparse-store-")  # never the user's cache
    from patternstore import default_store

    store = default_store()
    for option in ("cache_size_limit", "recompile_limit"):  # one flex compile per (kind, length)
        if hasattr(torch._dynamo.config, option):
            setattr(torch._dynamo.config, option, 64)
    report = benchlib.Report([out], "tools/bench_sparse.py", {**cfg, "preset": preset, "dtype": args.dtype},
                             device=args.device, resume=args.resume)
    budget = benchlib.Budget(math.inf if args.budget_s is None else args.budget_s)
    torch.manual_seed(0)
    cases = [("kinds", kind, {}, n, mode) for mode in cfg["modes"] for n in cfg["lengths"] for kind in cfg["kinds"]
             if not (kind == "fixed" and n > cfg["small"])]
    if cfg["sparse_90_length"]:
        cases.append(("sparse_90", SPARSE_90[0], SPARSE_90[1], cfg["sparse_90_length"], "forward"))
    walls: dict[tuple[str, str], tuple[int, float]] = {}  # (kind, mode) -> (length, seconds) of its last case
    for section, kind, params, n, mode in cases:
        case = {"section": section, "kind": kind, "length": n, "mode": mode}
        last_n, last_s = walls.get((kind, mode), (n, 0.0))
        if report.has(**case) or not budget.allows(case, last_s * n / last_n):  # compiles and calls: ~linear in n
            continue
        started = time.monotonic()
        try:
            row = run_case(cfg, args.device, dtype, kind, params, n, mode, store)
        except Exception as error:  # noqa: BLE001 - an OOM or a failure at one case; the others go on
            report.fail(case, error)
            benchlib.free_memory()
            continue
        walls[(kind, mode)] = (n, time.monotonic() - started)
        report.add(**case, **{k: v for k, v in row.items() if k not in case})
        print(f"{section} {kind:12s} n={n:>7} {mode:16s} active {row['active_block_fraction']:.3f} "
              + " ".join(f"{name} {c['median_s'] * 1e3:.2f}ms" for name, c in row["candidates"].items())
              + f" | create_block_mask compiled {row['create_block_mask_compiled_first_s']:.2f}/"
              f"{row['create_block_mask_compiled_s']:.3f}s, stored {row['stored_block_mask_s'] * 1e3:.1f}ms", flush=True)
        benchlib.free_memory()
    done = [r for r in report.data["rows"] if r.get("section") == "kinds" and "ours" in r["candidates"]]
    n_first = cfg["first_output_length"] or max((r["length"] for r in done), default=None)
    for kind in cfg["kinds"][:1 if preset == "cpu" else None]:
        case = {"section": "first_output", "kind": kind, "length": n_first}
        if n_first is None or report.has(**case) or not budget.allows(case, 20.0):
            continue
        try:
            report.add(**{**case, **first_output(cfg, args.device, args.dtype, kind, n_first,
                                                   max(min(budget.left(), 600.0), 60.0))})
        except Exception as error:  # noqa: BLE001 - subprocess failure or timeout
            report.fail(case, error)
    report.data["skipped"] += budget.skipped
    report.data["targets"] = targets(report.data["rows"])
    report.write()
    if report.data["rows"]:
        plot(report.data, out.with_suffix(".png"))
    for name, target in report.data["targets"].items():
        print(f"target {name}: {'met' if target['met'] else 'NOT met'} {json.dumps(target)}")
    print(f"wrote {out}")


def targets(rows: list[dict]) -> dict:
    """Target 1 (x masked SDPA), within 5% of flex, first output (x create_block_mask), each with its figures."""
    out = {}
    for r in rows:
        if r.get("section") == "sparse_90" and "sdpa-mask" in r.get("ours_over", {}):
            out["sparse_90_>=5x_faster_than_sdpa_mask"] = {"met": 1 / r["ours_over"]["sdpa-mask"] >= 5.0,
                                                           "speedup": 1 / r["ours_over"]["sdpa-mask"]}
    flex = {f"{r['kind']}/{r['length']}/{r['mode']}": r["ours_over"]["flex-cbm"] for r in rows
            if r.get("section") == "kinds" and "flex-cbm" in r.get("ours_over", {})}
    if flex:
        out["within_5%_of_flex"] = {"met": max(flex.values()) <= 1.05, "ours_over_flex": flex}
    eager = [r["create_block_mask_eager_s"] / r["length"] ** 2 for r in rows if "create_block_mask_eager_s" in r]
    for r in rows:
        if r.get("section") == "first_output":
            ours = r["ours"]["first_output_s"]
            figures = {"ours_s": ours, "create_block_mask_flex_s": r["flex-cbm"]["first_output_s"],
                       "speedup": r["speedup"]}
            if eager:
                figures["create_block_mask_eager_fit_s"] = min(eager) * r["length"] ** 2
                figures["speedup_vs_eager_fit"] = figures["create_block_mask_eager_fit_s"] / ours
            out[f"first_output_{r['kind']}_{r['length']}_>=10x"] = {"met": r["speedup"] >= 10.0, **figures}
    return out


if __name__ == "__main__":
    main()
