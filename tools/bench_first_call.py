"""What a user pays for ``torch.compile`` in a fresh process.

    PYTHONPATH=. python tools/bench_first_call.py [--rounds 3]

Each measurement is a new interpreter that imports the library, builds one
module, runs one eager call, then ``torch.compile(module, fullgraph=True)``
and its first call (dynamo, AOT autograd, inductor and, on a cold cache, the
C++ build), then three steady compiled calls. Compile cost = first compiled
call - median steady call; nothing is warmed up beforehand, so the figure
includes importing dynamo and inductor, as a user's first compiled call does.

- cold: an empty ``TORCHINDUCTOR_CACHE_DIR`` (a new machine, a new container);
- warm: the directory the cold run filled (every later process of a user).

Rounds alternate cold and warm (cold, warm, cold, warm, ...), each cold round
with a new directory; medians are reported. CPU, float32, ``no_grad``, batch
1, 2K tokens, 8 heads of 64, 2 threads. Writes tools/results/first_call.json.

``--fused`` (issue 18; tools/bench_gpu.py's first_output section): the first
output of a fresh process for a dilated layer on the fused path
(``DilatedAttention(implementation="flex")``, forward, ``no_grad``) at 1M
tokens on CUDA (the GPU benchmark's shape: 16 heads of 128, segments
2048/4096/8192/16384, rates 1/2/4/8; CPU: 16K, 8 heads of 64, three
branches; ``--quick``: 512 tokens), against building the same BlockMask with
``torch.nn.attention.flex_attention.create_block_mask``, compiled as flex's
documentation advises, on the same mask_mod
(``attention.dilated.flex.residue_mods``). Each figure is a fresh process,
timed from before the module (or the mask) is made to its output
(synchronised), after imports and inputs (untimed, the same for both):

- ours cold: empty inductor, triton and pattern-store directories;
- ours warm: the same directories again: the layout in the store, the
  kernels compiled ("with its layout in hand"); split into plan lookup,
  BlockMask build, and compile + first call;
- create_block_mask: one process over shorter lengths (each length's first
  call, a compile or a recompile included, and a second call where cheap;
  the first length's blocks compared with ours), then the target length in
  a fresh process of its own when its estimate (compile + a * n^2 from the
  longest measured length) fits the budget, else the estimate stands in
  (``"measured": false``).

Target: create_block_mask at the target length over ours warm >= 100x.
Writes tools/results/first_output.json (on CUDA first_output_cuda.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import benchlib
from benchlib import machine

REPO = Path(__file__).resolve().parents[1]

CASES = {
    "dilated": "from attention import ImprovedDilatedAttention as M; module = M([512, 1024, 2048], [1, 2, 4])",
    "bigbird": "from attention import BlockSparseAttention as M; module = M('bigbird', block_size=128)",
}

CHILD = """
import json, sys, time
start = time.perf_counter()
import torch
torch.set_num_threads(2)
{build}
imported = time.perf_counter() - start
q, k, v = (torch.randn(1, 2048, 8, 64) for _ in range(3))
with torch.no_grad():
    t = time.perf_counter(); module(q, k, v, is_causal=True); eager = time.perf_counter() - t
    compiled = torch.compile(module, fullgraph=True)
    t = time.perf_counter(); compiled(q, k, v, is_causal=True); first = time.perf_counter() - t
    steady = []
    for _ in range(3):
        t = time.perf_counter(); compiled(q, k, v, is_causal=True); steady.append(time.perf_counter() - t)
steady = sorted(steady)[1]
print(json.dumps({{"import_and_build_s": imported, "eager_first_call_s": eager, "compiled_first_call_s": first,
                  "steady_call_s": steady, "compile_s": first - steady}}))
"""


def run_child(case: str, cache_dir: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "PYTHONPATH": str(REPO),
           "PATTERNSTORE_DIR": str(Path(cache_dir) / "store")}
    done = subprocess.run([sys.executable, "-c", CHILD.format(build=CASES[case])], env=env, capture_output=True,
                          text=True, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------ --fused
K = 1024
FUSED = {  # target length, the create_block_mask lengths below it, and the layer's shape
    "cuda": {"heads": 16, "head_dim": 128, "segments": (2048, 4096, 8192, 16384), "rates": (1, 2, 4, 8),
             "length": 1024 * K, "cbm_lengths": (64 * K, 256 * K)},
    "cpu": {"heads": 8, "head_dim": 64, "segments": (2048, 4096, 8192), "rates": (1, 2, 4),
            "length": 16 * K, "cbm_lengths": (4 * K, 8 * K)},
    "quick": {"heads": 2, "head_dim": 32, "segments": (64, 128), "rates": (1, 2), "length": 512,
              "cbm_lengths": (256,)},
}
BLOCK = 128  # attention.dilated.flex.FUSED_BLOCK, the module's default
TARGET = 100.0
PROCESS_S = 15.0  # a fresh process's imports and inputs, outside the timings but inside the budget

FUSED_CHILD = """
import json, sys, time
start = time.perf_counter()
sys.path.insert(0, sys.argv[1])  # tools/, for benchlib: a -c child has no script folder on sys.path
import torch
import benchlib
which, device, dtype, cfg = sys.argv[2], sys.argv[3], getattr(torch, sys.argv[4]), json.loads(sys.argv[5])
if device == "cpu":
    torch.set_num_threads(2)
from attention import DilatedAttention
from attention.dilated.flex import plan_branches, residue_block_mask, residue_mods
from attention.residue import residue_modulus
H, d, segments, rates = cfg["heads"], cfg["head_dim"], cfg["segments"], cfg["rates"]
imported = time.perf_counter() - start


def clock():
    benchlib.synchronize(device)
    return time.perf_counter()


def blocks(mask):  # bool (heads, q blocks, kv blocks): partial and full blocks together
    heads, rows = mask.kv_num_blocks.shape[1:]
    out = torch.zeros(heads, rows, -(-mask.seq_lengths[1] // mask.BLOCK_SIZE[1]), dtype=torch.bool,
                      device=mask.kv_num_blocks.device)
    for num, idx in ((mask.kv_num_blocks, mask.kv_indices), (mask.full_kv_num_blocks, mask.full_kv_indices)):
        if num is not None:
            h, r, j = (torch.arange(idx.shape[-1], device=idx.device) < num[0][..., None]).nonzero(as_tuple=True)
            out[h, r, idx[0][h, r, j].long()] = True
    return out


if which == "ours":
    n = cfg["length"]
    q, k, v = (torch.randn(1, n, H, d, device=device, dtype=dtype) for _ in range(3))
    t0 = clock()
    module = DilatedAttention(segments, rates, implementation="flex")
    plan = module.plan(H)
    t1 = clock()
    residue_block_mask(plan, n, cfg["block"], False, True, q.device)  # what the call builds, cached for it
    t2 = clock()
    with torch.no_grad():
        out = module(q, k, v)
    t3 = clock()
    with torch.no_grad():
        module(q, k, v)
    t4 = clock()
    print(json.dumps({"length": n, "first_output_s": t3 - t0, "plan_s": t1 - t0, "block_mask_s": t2 - t1,
                      "compile_and_call_s": t3 - t2, "steady_call_s": t4 - t3, "imports_s": imported,
                      "output_finite": bool(torch.isfinite(out).all())}), flush=True)
else:  # create_block_mask over cfg["lengths"], one line each as it is measured
    from torch.nn.attention.flex_attention import create_block_mask

    build = torch.compile(create_block_mask)
    plan = DilatedAttention(segments, rates, implementation="flex").plan(H)
    for i, n in enumerate(cfg["lengths"]):
        _, mask_mod = residue_mods(plan_branches(plan), n, residue_modulus(rates), False, None, False)
        t0 = clock()
        mask = build(mask_mod, None, H, n, n, device=device, BLOCK_SIZE=cfg["block"])
        row = {"length": n, "first_s": clock() - t0, "imports_s": imported}
        if row["first_s"] < cfg["second_call_below_s"]:
            t0 = clock()
            build(mask_mod, None, H, n, n, device=device, BLOCK_SIZE=cfg["block"])
            row["second_s"] = clock() - t0
        if i == 0:  # the same BlockMask as ours, block by block
            ours = residue_block_mask(plan, n, cfg["block"], False, True, torch.device(device))
            row["same_blocks_as_ours"] = bool(torch.equal(blocks(ours).cpu(), blocks(mask).cpu()))
        print(json.dumps(row), flush=True)
        del mask
"""


def fused_child(which: str, cfg: dict, args, env: dict, timeout_s: float) -> list[dict]:
    """One fresh process of FUSED_CHILD; the JSON lines it printed (those of a killed one included)."""
    command = [sys.executable, "-c", FUSED_CHILD, str(REPO / "tools"), which, args.device, args.dtype, json.dumps(cfg)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
        stdout, error = done.stdout, None if done.returncode == 0 else f"exit {done.returncode}: {done.stderr[-600:]}"
    except subprocess.TimeoutExpired as expired:
        stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        error = f"killed after {timeout_s:.0f} s"
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    if error and not rows:
        raise RuntimeError(error)
    return rows + ([{"error": error}] if error else [])


def cbm_estimate_s(rows: list[dict], n: int) -> float | None:
    """create_block_mask at n in a fresh process: its compile (first minus second call at the
    first length) + a * n^2 from the longest measured length's steadiest call."""
    measured = [r for r in rows if "first_s" in r]
    if not measured:
        return None
    compile_s = measured[0]["first_s"] - measured[0].get("second_s", 0.0)
    longest = measured[-1]
    evaluation = longest.get("second_s", longest["first_s"] - (compile_s if longest is measured[0] else 0.0))
    return compile_s + max(evaluation, 0.0) * (n / longest["length"]) ** 2


def fused_first_output(args) -> None:
    """The --fused measurement (module docstring): rows per process, the target, the JSON."""
    cfg = {**FUSED["quick" if args.quick else args.device], "block": BLOCK, "second_call_below_s": 20.0}
    out = args.out or benchlib.RESULTS / ("first_output.json" if args.device == "cpu" else
                                          f"first_output_{args.device}.json")
    report = benchlib.Report([out], "tools/bench_first_call.py --fused", cfg, device=args.device,
                             threads=2 if args.device == "cpu" else None, resume=args.resume)
    budget = benchlib.Budget(math.inf if args.budget_s is None else args.budget_s)
    cap = 600.0  # no process beyond this, budget or not

    def timeout() -> float:
        return min(cap, max(budget.left(), 0.0) + 30.0)

    with tempfile.TemporaryDirectory(prefix="first_output_") as tmp:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"{tmp}/inductor", TRITON_CACHE_DIR=f"{tmp}/triton",
                   PATTERNSTORE_DIR=f"{tmp}/store",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        filled = False
        for which in ("ours-cold", "ours-warm"):
            case = {"candidate": which}
            earlier = [r["first_output_s"] for r in report.data["rows"] if r.get("candidate") == "ours-cold"]
            if report.has(**case) or not budget.allows(case, PROCESS_S + (earlier[0] if earlier else 0.0)):
                continue
            try:
                if which == "ours-warm" and not filled:  # resumed without the cold run: fill the directories
                    fused_child("ours", cfg, args, env, timeout())
                row = fused_child("ours", cfg, args, env, timeout())[0]
            except Exception as error:  # noqa: BLE001 - a crash or a timeout; the rest goes on
                report.fail(case, error)
                continue
            filled = True
            report.add(**case, **row)
            print(f"{which}: first output {row['first_output_s']:.2f} s (plan {row['plan_s'] * 1e3:.1f} ms, "
                  f"BlockMask {row['block_mask_s'] * 1e3:.1f} ms, compile + call {row['compile_and_call_s']:.2f} s; "
                  f"steady call {row['steady_call_s'] * 1e3:.1f} ms)", flush=True)
        cbm = [r for r in report.data["rows"] if r.get("candidate") == "create_block_mask"]
        shorter = [n for n in cfg["cbm_lengths"] if not any(r["length"] == n for r in cbm)]
        if shorter and budget.allows({"candidate": "create_block_mask", "lengths": shorter}, PROCESS_S):
            try:
                for row in fused_child("cbm", {**cfg, "lengths": shorter}, args, env, timeout()):
                    if "error" in row:
                        report.data["failures"].append({"candidate": "create_block_mask", "message": row["error"]})
                    else:
                        report.add(candidate="create_block_mask", fresh_process=row["length"] == shorter[0], **row)
                        print(f"create_block_mask n={row['length']}: first {row['first_s']:.2f} s, second "
                              f"{row.get('second_s', math.nan):.3f} s", flush=True)
            except Exception as error:  # noqa: BLE001
                report.fail({"candidate": "create_block_mask"}, error)
        cbm = sorted((r for r in report.data["rows"] if r.get("candidate") == "create_block_mask"),
                     key=lambda r: r["length"])
        n = cfg["length"]
        estimate = cbm_estimate_s([r for r in cbm if r["length"] < n], n)
        case = {"candidate": "create_block_mask", "length": n}
        if estimate is not None and not report.has(**case) and budget.allows(case, PROCESS_S + 1.3 * estimate):
            try:
                row = fused_child("cbm", {**cfg, "lengths": [n], "second_call_below_s": 0.0}, args, env, timeout())[0]
                if "error" in row:
                    raise RuntimeError(row["error"])
                report.add(**case, fresh_process=True, **{k: v for k, v in row.items() if k != "length"})
                print(f"create_block_mask n={n} (fresh process): {row['first_s']:.2f} s", flush=True)
            except Exception as error:  # noqa: BLE001 - a timeout: the estimate stands in
                report.fail(case, error)
    report.data["skipped"] += budget.skipped
    report.data["targets"] = fused_targets(report.data["rows"], n, estimate)
    report.write()
    for name, target in report.data["targets"].items():
        print(f"target {name}: {'met' if target['met'] else 'NOT met'} {json.dumps(target)}")
    print(f"wrote {out}")


def fused_targets(rows: list[dict], n: int, estimate: float | None) -> dict:
    """create_block_mask at n (measured in a fresh process, else estimated) over ours warm (and cold)."""
    ours = {r["candidate"]: r["first_output_s"] for r in rows if r.get("candidate", "").startswith("ours")}
    measured = [r["first_s"] for r in rows if r.get("candidate") == "create_block_mask" and r["length"] == n]
    cbm_s = measured[0] if measured else estimate
    if "ours-warm" not in ours or cbm_s is None:
        return {}
    figures = {"length": n, "ours_warm_s": ours["ours-warm"], "ours_cold_s": ours.get("ours-cold"),
               "create_block_mask_s": cbm_s, "measured": bool(measured),
               "create_block_mask_estimate_s": estimate, "ratio_warm": cbm_s / ours["ours-warm"]}
    if "ours-cold" in ours:
        figures["ratio_cold"] = cbm_s / ours["ours-cold"]
    label = f"{n // K}K" if n >= K else str(n)
    return {f"first_output_{label}_>={TARGET:.0f}x_create_block_mask": {"met": figures["ratio_warm"] >= TARGET,
                                                                         **figures}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    benchlib.add_arguments(parser)
    parser.add_argument("--rounds", type=int, default=3, help="compile cost: cold/warm rounds")
    parser.add_argument("--fused", action="store_true", help="the fused path's first output (module docstring)")
    parser.add_argument("--quick", action="store_true", help="--fused at tiny sizes, for a smoke run")
    args = parser.parse_args()
    if args.fused:
        fused_first_output(args)
        return
    if args.device != "cpu":
        parser.error("the compile-cost measurement is CPU-only; --fused runs on CUDA")
    results: dict = {"machine": machine("cpu", threads=2), "rounds": args.rounds, "cases": {}}
    for case in CASES:
        runs: dict[str, list[dict]] = {"cold": [], "warm": []}
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory(prefix="first_call_") as cache_dir:
                runs["cold"].append(run_child(case, cache_dir))
                runs["warm"].append(run_child(case, cache_dir))
        summary = {mode: {field: statistics.median(run[field] for run in rows) for field in rows[0]}
                   for mode, rows in runs.items()}
        results["cases"][case] = {"median": summary, "runs": runs}
        for mode in ("cold", "warm"):
            s = summary[mode]
            print(f"{case:8s} {mode}: compile {s['compile_s']:.1f} s (first compiled call {s['compiled_first_call_s']:.1f} s,"
                  f" steady {s['steady_call_s'] * 1e3:.0f} ms; import+build {s['import_and_build_s']:.1f} s)")
    out = REPO / "tools" / "results" / "first_call.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
