"""Benchmark: dilated attention (the per-branch path "fast" and the fused
path "flex") against dense SDPA (and, on the CPU, dilated-attention-pytorch;
on CUDA, a gather-then-flash peer).

    python tools/bench_attention.py [--device cpu|cuda] [--preset cpu|gpu|fused-cpu] [--dtype D] [--quick]
                                    [--max-length N] [--budget-s S] [--out PATH] [--resume PATH] [--dapt DIR]

Candidates: tools/attention_candidates.py (names, callables, useful work);
``:fb`` = forward+backward. Presets (``--preset``, default by device):
- cpu: float32, 2 threads, batch 1, 8 heads, head_dim 64, branches (2048, 1),
  (4096, 2), (8192, 4), lengths 8K..1M, one fresh worker process per length
  (for its peak RSS). Candidates ``fast``, ``reference``, ``sdpa``,
  ``fast-grouped``, ``dapt-grouped``; the slow ones skip lengths and rounds.
- gpu: bf16 (``--dtype``), batch 1, 16 heads, head_dim 128 then 64, segments
  2048/4096/8192/16384 with rates 1/2/4/8, lengths 16K..1M, in one process.
  Candidates: ``flex``, ``flex-ordered`` (issue 18's fused path), ``fast``,
  ``gather-flash``, ``residue-permute``, dense SDPA three ways and the kernel
  layer's two dense kernels where dense is affordable; ``flex-causal`` and
  ``fast-causal`` at 16K and 1M (the path choice's causal rows). Cases run
  in priority order, so a short budget keeps what matters: per head_dim the
  shortest and the longest length (16K, 1M), then the middle lengths, then
  the causal cases. Each case is one (head_dim, length, group) with its
  candidates interleaved.
- fused-cpu: the CPU figure of the fused path: ``flex``, ``flex-ordered``,
  ``fast`` and ``residue-permute``, forward, the cpu preset's shape at 16K
  and 32K, 3 rounds each (tools/results/fused_cpu.json).
On the CPU flex has no backward: ``flex*:fb`` candidates are CUDA-only.

Method (tools/benchlib.py): candidates interleaved (A B C A B C ...) with a
square matmul of the same run (CPU fp32 3072^3, CUDA 8192^3 in the dtype);
medians. efficiency = useful FLOP/s / the matmul's FLOP/s;
efficiency_cpu_time: the same with process CPU seconds for both (on a shared
machine, CPU time does not count the time another process held the cores).
Ratios ``a/b``: median over rounds of time(a) / time(b) of the same round;
``dense/flex``: the fastest dense candidate of each round over flex.
Permutation cost: natural minus ordered flex time of the same round. Peak
memory of a forward above everything before it (inputs included in
"before"), over the output's size (benchlib.peak_bytes: RSS high-water mark
with MALLOC_MMAP_THRESHOLD_=1 MiB on the CPU, max_memory_allocated on CUDA).
``choice_table``: per measured (head_dim, length, causal, training) the
faster of "fast" and "flex" and time(fast) / time(flex), rows for the
library's path-choice table. Flex's first call per case (compile included)
is in ``checks``.

``--dapt DIR``: a directory where ``dilated_attention_pytorch==0.2.0`` (and
einops) were installed with ``pip install --no-deps --target DIR``. That
package imports xformers; the worker puts a stand-in ``xformers.ops`` first
on its path, routing ``memory_efficient_attention`` to
``torch.nn.functional.scaled_dot_product_attention`` (the output says so).

Writes tools/results/attention.json and attention.png (``--out``; on CUDA
attention_cuda.json; the fused-cpu preset fused_cpu.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import benchlib
from attention_candidates import (XFORMERS_STANDIN, base_name, function, is_causal, is_flex, is_ordered,
                                  useful_flop)

K = 1024
ALL = tuple(8 * K << i for i in range(8))  # 8K .. 1M
CAUSAL = (16 * K, 1 << 20)  # lengths of the causal rows of the path choice
PRESETS = {
    "cpu": {"heads": 8, "head_dims": (64,), "segments": (2048, 4096, 8192), "rates": (1, 2, 4), "lengths": ALL,
            "matmul": 3072, "threads": 2, "seconds": 0.0,
            # name -> (scheme, lengths run); ":fb" = forward+backward. The slow
            # candidates skip lengths to keep the whole run near 10 minutes on 2 cores.
            "candidates": {"fast": ("longnet", ALL), "reference": ("longnet", (8 * K, 16 * K, 32 * K, 256 * K)),
                           "sdpa": ("dense", (8 * K, 16 * K, 32 * K)), "fast-grouped": ("grouped", ALL),
                           "dapt-grouped": ("grouped", ALL[:6]), "fast:fb": ("longnet", ALL),
                           "reference:fb": ("longnet", (8 * K, 16 * K)), "sdpa:fb": ("dense", (8 * K, 16 * K))}},
    "gpu": {"heads": 16, "head_dims": (128, 64), "segments": (2048, 4096, 8192, 16384), "rates": (1, 2, 4, 8),
            "lengths": ALL[1:], "matmul": 8192, "threads": None, "seconds": 0.5,
            "candidates": {"flex": ("longnet", ALL), "flex-ordered": ("longnet", ALL), "fast": ("longnet", ALL),
                           "gather-flash": ("longnet", ALL), "residue-permute": ("permutation", ALL),
                           "sdpa": ("dense", ALL[:5]), "sdpa-flash": ("dense", ALL[:5]),
                           "sdpa-cudnn": ("dense", ALL[:5]), "flex:fb": ("longnet", ALL),
                           "flex-ordered:fb": ("longnet", ALL), "fast:fb": ("longnet", ALL),
                           "gather-flash:fb": ("longnet", ALL), "sdpa-flash:fb": ("dense", ALL[:4]),
                           "sdpa-cudnn:fb": ("dense", ALL[:4]), "kernel-cuda_cudnn": ("dense", ALL[:5]),
                           "kernel-cuda_flash": ("dense", ALL[:5]), "flex-causal": ("longnet", CAUSAL),
                           "fast-causal": ("longnet", CAUSAL), "flex-causal:fb": ("longnet", CAUSAL),
                           "fast-causal:fb": ("longnet", CAUSAL)}},
    "fused-cpu": {"heads": 8, "head_dims": (64,), "segments": (2048, 4096, 8192), "rates": (1, 2, 4),
                  "lengths": (16 * K, 32 * K), "matmul": 3072, "threads": 2, "seconds": 0.0, "rounds": 3,
                  "candidates": {"flex": ("longnet", ALL), "flex-ordered": ("longnet", ALL),
                                 "fast": ("longnet", ALL), "residue-permute": ("permutation", ALL)}},
}
QUICK = {"heads": 2, "segments": (64, 128), "rates": (1, 2), "lengths": (256, 512), "matmul": 256}
# (slow, fast) candidates whose same-round time ratio is reported
PAIRS = (("reference", "fast"), ("dapt-grouped", "fast-grouped"), ("reference:fb", "fast:fb"),
         ("gather-flash", "fast"), ("gather-flash:fb", "fast:fb"), ("fast", "flex"), ("fast:fb", "flex:fb"),
         ("gather-flash", "flex"), ("gather-flash:fb", "flex:fb"), ("flex", "flex-ordered"),
         ("flex:fb", "flex-ordered:fb"), ("fast-causal", "flex-causal"), ("fast-causal:fb", "flex-causal:fb"))
# ratio key -> (causal, training) of the path choice
CHOICES = {"fast/flex": (False, False), "fast:fb/flex:fb": (False, True), "fast-causal/flex-causal": (True, False),
           "fast-causal:fb/flex-causal:fb": (True, True)}
PER_CASE = ("ratios", "checks", "permutation")  # report dicts keyed by case, kept on resume

def group_of(name: str) -> str:
    """The case group of a candidate: causal candidates are measured after every other case."""
    return "causal" if is_causal(name) else "main"


def cpu_rounds(n: int, name: str, cfg: dict) -> int:
    """Timed calls per candidate on the CPU: the preset's ``rounds``, else more at short lengths."""
    if "rounds" in cfg:
        return cfg["rounds"]
    slow = name.startswith(("reference", "sdpa"))
    if n <= 16 * K:
        return (2 if n <= 8 * K else 1) if slow else 3
    return 1 if slow or n > 64 * K else 2


def dense_over(runs: benchlib.Interleaved, schemes: dict, b: str) -> float | None:
    """Median over rounds of (the fastest dense candidate of the round, same mode) / b."""
    dense = [c for c in runs.times if schemes.get(c) == "dense" and c.endswith(":fb") == b.endswith(":fb")]
    if not dense or b not in runs.times:
        return None
    return statistics.median(min(runs.times[c][i] for c in dense if i < len(runs.times[c])) / t
                             for i, t in enumerate(runs.times[b]) if any(i < len(runs.times[c]) for c in dense))


def permutation(runs: benchlib.Interleaved) -> dict:
    """Natural minus ordered flex time, per mode, from the same rounds; the eager gathers alone beside."""
    out = {}
    for mode, suffix in (("forward", ""), ("forward+backward", ":fb")):
        a, b = "flex" + suffix, "flex-ordered" + suffix
        if a in runs.times and b in runs.times:
            cost = statistics.median(x - y for x, y in zip(runs.times[a], runs.times[b]))
            out[mode] = {"natural_s": runs.median(a), "ordered_s": runs.median(b), "cost_s": cost,
                         "cost_share_of_natural": cost / runs.median(a)}
    if "residue-permute" in runs.times and "forward" in out:
        out["forward"]["eager_gathers_s"] = runs.median("residue-permute")
    return out


def measure_length(n: int, head_dim: int, names: list[str], cfg: dict, device: str, dtype_name: str) -> dict:
    """Every candidate at one length: interleaved rows, same-round ratios, checks, forward peaks."""
    torch.manual_seed(0)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    on_cpu = torch.device(device).type == "cpu"
    if any(map(is_flex, names)):
        benchlib.raise_recompile_limit()
    dtype, heads = getattr(torch, dtype_name), cfg["heads"]
    q, k, v = (torch.randn(1, n, heads, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad_out = torch.randn_like(q)
    inputs = {"natural": (q, k, v)}
    if any(map(is_ordered, names)):  # reordered once, outside every timing
        from attention.residue import residue_modulus, to_residue_order

        modulus = residue_modulus(cfg["rates"])
        inputs["ordered"] = tuple(to_residue_order(x.detach(), modulus).requires_grad_() for x in (q, k, v))
    functions = {name: function(base_name(name), cfg) for name in names}

    def args_of(name: str) -> tuple:
        return inputs["ordered" if is_ordered(name) else "natural"]

    def forward(fn, args):
        def call():
            with torch.no_grad():
                return fn(*args)
        return call

    def backward(fn, args):
        return lambda: torch.autograd.grad(fn(*args), args, grad_out)

    warm = [x[:, :max(cfg["segments"])].detach() for x in (q, k, v)]  # dapt needs whole segments
    calls, failures, first_call = {}, {}, {}
    for name, fn in functions.items():
        try:
            # Plans fetched, kernels loaded, outside every timing; flex compiled at this very shape
            # (its first call, compile included, is recorded), with its backward for ":fb".
            started = time.perf_counter()
            if is_flex(name) and name.endswith(":fb"):
                backward(fn, args_of(name))()
            else:
                with torch.no_grad():
                    fn(*(args_of(name) if is_flex(name) else warm))
            benchlib.synchronize(device)
            if is_flex(name):
                first_call[name] = time.perf_counter() - started
        except Exception as error:  # noqa: BLE001 - recorded, the others go on
            failures[name] = benchlib.failure(error)
            continue
        calls[name] = backward(fn, args_of(name)) if name.endswith(":fb") else forward(fn, args_of(name))
    del warm
    checks = compare_outputs(calls, cfg["rates"])
    if first_call:
        checks["first_call_s"] = first_call
    schemes = {name: cfg["candidates"][name][0] for name in calls}
    runs = benchlib.interleave(
        calls, timed=benchlib.timer(device), warmup=0 if on_cpu else 2, seconds=cfg["seconds"],
        rounds={c: cpu_rounds(n, c, cfg) for c in calls} if on_cpu else None,
        reference=benchlib.matmul(cfg["matmul"], device, torch.float32 if on_cpu else dtype))
    failures.update(runs.failures)
    matmul_flop = 2 * cfg["matmul"] ** 3
    matmul_rate, matmul_cpu_rate = matmul_flop / runs.median("matmul"), matmul_flop / runs.cpu_median("matmul")
    rows = []
    for name in runs.times:
        if name == "matmul":
            continue
        work = useful_flop(name, schemes[name], n, heads, head_dim, cfg["segments"], cfg["rates"])
        rows.append({"length": n, "head_dim": head_dim, "candidate": base_name(name), "scheme": schemes[name],
                     "group": group_of(name), "causal": is_causal(name),
                     "mode": "forward+backward" if name.endswith(":fb") else "forward", **runs.row(name),
                     "useful_tflop": work / 1e12, "useful_tflops": work / runs.median(name) / 1e12,
                     "efficiency": work / runs.median(name) / matmul_rate,
                     "efficiency_cpu_time": work / runs.cpu_median(name) / matmul_cpu_rate})
    for name in [c for c in calls if not c.endswith(":fb") and not is_causal(c)
                 and c.split("-")[0] in ("fast", "reference", "gather", "flex")]:
        benchlib.free_memory()
        out, peak = benchlib.peak_bytes(calls[name], device)
        if peak is not None:
            size = out.numel() * out.element_size()
            rows.append({"length": n, "head_dim": head_dim, "candidate": name, "group": group_of(name),
                         "causal": False, "mode": "memory", "peak_bytes_above_inputs": peak, "output_bytes": size,
                         "peak_over_output": peak / size})
        del out
    ratios = {f"{a}/{b}": runs.ratio(a, b) for a, b in PAIRS if a in runs.times and b in runs.times}
    for b in ("flex", "flex:fb"):
        if (ratio := dense_over(runs, schemes, b)) is not None:
            ratios["dense/flex" if b == "flex" else "dense:fb/flex:fb"] = ratio
    return {"rows": rows, "ratios": ratios, "failures": failures, "matmul_tflops": matmul_rate / 1e12,
            "checks": checks, "permutation": permutation(runs)}


def compare_outputs(calls: dict, rates) -> dict:
    """Relative difference of each peer's forward output from ours (the same function):
    gather-flash, flex and flex-ordered (brought back to natural order) against fast,
    flex-causal against fast-causal."""
    checks = {}
    for ours, peers in (("fast", ("gather-flash", "flex", "flex-ordered")), ("fast-causal", ("flex-causal",))):
        if ours not in calls or not any(p in calls for p in peers):
            continue
        reference = calls[ours]().float()
        for peer in [p for p in peers if p in calls]:
            out = calls[peer]()
            if is_ordered(peer):
                from attention.residue import from_residue_order, residue_modulus

                out = from_residue_order(out, residue_modulus(rates))
            key = f"{peer.replace('-', '_')}_vs_{ours.replace('-', '_')}_relative_difference"
            checks[key] = float((out.float() - reference).norm() / reference.norm())
            del out
        del reference
    return checks


def cpu_worker(n, head_dim, names, cfg, args, dapt, standin) -> dict:
    """measure_length in a fresh process (its peak RSS is this length's alone)."""
    paths = [str(benchlib.REPO)] + ([str(standin), str(dapt)] if dapt else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), MALLOC_MMAP_THRESHOLD_=str(1 << 20),
               OMP_NUM_THREADS=str(cfg["threads"]))
    command = [sys.executable, __file__, "--worker", json.dumps([n, head_dim, names, cfg]),
               "--device", args.device, "--dtype", args.dtype]
    return benchlib.child_json(command, env=env, what=f"worker for n={n}")


def estimate_s(report: benchlib.Report, head_dim: int, n: int, names: list[str], compiles: bool) -> float:
    """Seconds a case will take from the longest shorter length's medians of the
    candidates that run at n: dilated grows linearly, dense quadratically; ~6
    calls each (warm-up, rounds, memory). ``compiles``: flex compiles at this
    case (a new shape state), as long as the longest first-call total so far."""
    def runs_at_n(row: dict) -> bool:
        return row["candidate"] + (":fb" if row["mode"] == "forward+backward" else "") in names

    rows = [r for r in report.data["rows"] if r["head_dim"] == head_dim and r["length"] < n and "median_s" in r
            and runs_at_n(r)]
    longest = max((r["length"] for r in rows), default=None)
    compile_s = max((sum(c.get("first_call_s", {}).values()) for c in report.data["checks"].values()), default=0.0)
    calls = 0.0 if longest is None else 6 * sum(
        r["median_s"] * (n / longest) ** (2 if r["scheme"] == "dense" else 1) for r in rows if r["length"] == longest)
    return calls + (compile_s if compiles else 0.0)


def evaluate(rows: list[dict], report_ratios: dict, preset: str) -> dict:
    """The targets, each with the figures it was judged on (the gpu preset adds those against dense)."""
    def pick(candidate, mode, d=None):
        return {r["length"]: r for r in rows if r["candidate"] == candidate and r["mode"] == mode
                and (d is None or r["head_dim"] == d)}

    def by_case(key, low=0, high=math.inf):
        return {case: r[key] for case, r in report_ratios.items()
                if key in r and low <= int(case.split("/")[1]) <= high}

    targets = {}
    if preset == "cpu":
        for mode, minimum in (("forward", 0.70), ("forward+backward", 0.5)):
            if rows_of := pick("fast", mode):
                effs = {n: r["efficiency"] for n, r in rows_of.items()}
                targets[f"{mode}_efficiency>={minimum}"] = {
                    "met": min(effs.values()) >= minimum, "by_length": effs,
                    "by_length_cpu_time": {n: r["efficiency_cpu_time"] for n, r in rows_of.items()}}
    fwd, peak_fast, peak_reference = pick("fast", "forward"), pick("fast", "memory"), pick("reference", "memory")
    if 1 << 20 in fwd and 64 * K in fwd:  # normalised: single calls minutes apart see the load change
        wall = fwd[1 << 20]["median_s"] / fwd[64 * K]["median_s"]
        normalized = fwd[1 << 20]["matmul_units"] / fwd[64 * K]["matmul_units"]
        targets["time(1M)/time(64K)<=17.6"] = {"met": max(wall, normalized) <= 17.6, "wall_ratio": wall,
                                              "matmul_normalized_ratio": normalized}
    if 256 * K in peak_fast and peak_reference.get(256 * K, {}).get("peak_bytes_above_inputs"):
        share = peak_fast[256 * K]["peak_bytes_above_inputs"] / peak_reference[256 * K]["peak_bytes_above_inputs"]
        targets["fast_peak<=half_reference_at_256K"] = {"met": share <= 0.5, "fast/reference": share}
    if speedups := by_case("reference/fast"):
        targets["fast_faster_than_reference"] = {"met": min(speedups.values()) > 1.0, "by_case": speedups}
    if dapt := by_case("dapt-grouped/fast-grouped", 32 * K):
        targets["grouped>=1.15x_faster_than_dapt_at>=32K"] = {"met": min(dapt.values()) >= 1.15, "by_case": dapt}
    if peer := by_case("gather-flash/fast"):
        targets["fast_faster_than_gather_flash"] = {"met": min(peer.values()) > 1.0, "by_case": peer}
    peaks = {f"d{r['head_dim']}/{r['length']}": r["peak_over_output"] for r in rows
             if r["candidate"] == "fast" and r["mode"] == "memory"}
    if peaks:
        targets["forward_peak_above_inputs<=1.5x_output"] = {"met": max(peaks.values()) <= 1.5, "by_length": peaks}
    # The fused path (issue 18): faster than the per-branch path and the gather peer at every length.
    for peer_name, label in (("fast", "fast"), ("gather-flash", "gather_flash")):
        cases = {f"{case} {mode}": x for mode, key in (("forward", f"{peer_name}/flex"),
                                                       ("forward+backward", f"{peer_name}:fb/flex:fb"))
                 for case, x in by_case(key).items()}
        if cases:
            targets[f"flex_faster_than_{label}"] = {"met": min(cases.values()) > 1.0, "time_peer/flex": cases}
    if preset != "gpu":
        return targets
    for candidate, mode, minimum, high in (("fast", "forward", 0.8, math.inf), ("fast", "forward+backward", 0.7, math.inf),
                                           ("flex", "forward", 0.8, 64 * K), ("flex", "forward+backward", 0.7, 64 * K)):
        dense = {}
        for r in rows:
            if r.get("scheme") == "dense" and r["mode"] == mode:
                key = (r["head_dim"], r["length"])
                dense[key] = max(dense.get(key, 0.0), r["useful_tflops"])
        ratios = {f"d{d}/{n}": r["useful_tflops"] / dense[(d, n)] for d in {r["head_dim"] for r in rows}
                  for n, r in pick(candidate, mode, d).items() if (d, n) in dense and 16 * K <= n <= high}
        if ratios:
            name = f"{mode}_tflops>={minimum}x_dense" if candidate == "fast" else \
                f"flex_{mode}_tflops>={minimum}x_dense_16K-64K"
            targets[name] = {"met": min(ratios.values()) >= minimum, "by_case": ratios}
    if faster := by_case("dense/flex", 16 * K):  # dense runs to 128K; past it dilated wins by the n^2
        targets["flex_forward_faster_than_dense_sdpa_from_16K"] = {"met": min(faster.values()) > 1.0,
                                                                  "time_fastest_dense/flex": faster}
    return targets


def choice_table(report_ratios: dict, device: str, dtype: str) -> list[dict]:
    """The path-choice rows (module docstring): winner and time(fast) / time(flex) per measured case."""
    rows = []
    for case, ratios in sorted(report_ratios.items()):
        head_dim, length = (int(x) for x in case.lstrip("d").split("/"))
        for key, (causal, training) in CHOICES.items():
            if key in ratios:
                rows.append({"device_type": torch.device(device).type, "dtype": dtype, "head_dim": head_dim,
                             "length": length, "causal": causal, "training": training,
                             "winner": "flex" if ratios[key] > 1.0 else "fast", "fast_over_flex": ratios[key]})
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for key in sorted({(r["candidate"], r["mode"], r["head_dim"]) for r in rows if r["mode"] != "memory"}):
        series = sorted((r["length"], r["median_s"]) for r in rows if (r["candidate"], r["mode"], r["head_dim"]) == key)
        ax.plot(*zip(*series), "-o" if key[1] == "forward" else "--s", label=f"{key[0]} {key[1]} d={key[2]}",
                markersize=4)
    ax.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel="median time per call (s)",
           title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merge(into: dict, new: dict) -> None:
    """``into.update(new)``, merging the dicts both hold (first_call_s of two groups) instead of replacing."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


def cases_of(cfg: dict, lengths: list[int], args, dapt) -> list[tuple[int, int, str, list[str]]]:
    """(head_dim, length, group, candidates) in the order they run (module docstring)."""
    order = [(d, n) for d in cfg["head_dims"] for n in (lengths[0], lengths[-1])]
    order += [(d, n) for d in cfg["head_dims"] for n in lengths]
    first = order[0]
    out = []
    for group in ("main", "causal"):
        for d, n in dict.fromkeys(order):
            names = [c for c, (_, run) in cfg["candidates"].items() if group_of(c) == group
                     and (args.quick or n in run) and (dapt or not c.startswith("dapt"))]
            if args.device == "cpu":  # flex: no CPU backward; a compile per shape (~20 s): --quick keeps one case
                names = [c for c in names if not (is_flex(c) and (c.endswith(":fb") or args.quick and (d, n, group)
                                                                 != (*first, "main")))]
            if names and (group == "main" or any(map(is_flex, names))):  # causal rows exist for the choice only
                out.append((d, n, group, names))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    benchlib.add_arguments(parser)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: cpu or gpu by --device")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--max-length", type=int, default=1 << 20)
    parser.add_argument("--dapt", type=Path, default=None, help="directory holding dilated_attention_pytorch 0.2.0")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(measure_length(*json.loads(args.worker), args.device, args.dtype)))
        return
    preset = args.preset or ("gpu" if args.device == "cuda" else "cpu")
    cfg = dict(PRESETS[preset])
    if args.quick:
        cfg.update(QUICK, head_dims=tuple(d // 2 for d in cfg["head_dims"]))
    lengths = [n for n in cfg["lengths"] if n <= args.max_length]
    dapt = args.dapt if args.dapt and (args.dapt / "dilated_attention_pytorch").is_dir() else None
    default = {"cpu": "attention.json", "fused-cpu": "fused_cpu.json"} if args.device == "cpu" else {}
    out = args.out or benchlib.RESULTS / default.get(preset, f"attention_{args.device}.json")
    notes = ["efficiency = useful FLOP/s / FLOP/s of a square matmul interleaved with the candidates",
             "useful work: 4 * head_dim * selected (query, key) pairs per branch and head; forward+backward: 3x",
             "memory rows: forward peak above everything allocated before the call, over the output size",
             f"load average at the start (1, 5, 15 min): {os.getloadavg()}",
             "dilated-attention-pytorch 0.2.0 with a STAND-IN xformers module (memory_efficient_attention -> "
             "torch SDPA)" if dapt else "dilated-attention-pytorch not given (--dapt): no comparison"]
    report = benchlib.Report([out], "tools/bench_attention.py", {**cfg, "preset": preset, "dtype": args.dtype,
                             "lengths": lengths, "notes": notes}, device=args.device, threads=cfg["threads"],
                             resume=args.resume, keep=PER_CASE)
    budget = benchlib.Budget(math.inf if args.budget_s is None else args.budget_s)
    shapes: dict[int, int] = {}  # head_dim -> cases run: flex compiles static, then dynamic (CUDA)
    with tempfile.TemporaryDirectory() as tmp:
        standin = Path(tmp) if dapt else None
        if standin:
            (standin / "xformers").mkdir()
            (standin / "xformers" / "__init__.py").write_text("")
            (standin / "xformers" / "ops.py").write_text(XFORMERS_STANDIN)
        for head_dim, n, group, names in cases_of(cfg, lengths, args, dapt):
            case = {"head_dim": head_dim, "length": n, "group": group}
            compiles = any(map(is_flex, names)) and (args.device == "cpu" or shapes.get(head_dim, 0) < 2)
            if report.has(**case) or not budget.allows(case, estimate_s(report, head_dim, n, names, compiles)):
                continue
            shapes[head_dim] = shapes.get(head_dim, 0) + 1
            try:
                if args.device == "cpu":
                    result = cpu_worker(n, head_dim, names, cfg, args, dapt, standin)
                else:
                    result = measure_length(n, head_dim, names, cfg, args.device, args.dtype)
            except Exception as error:  # noqa: BLE001 - an OOM or a crash at one length; the others go on
                report.fail(case, error)
                benchlib.free_memory()
                continue
            for key in PER_CASE:  # the groups of one (head_dim, length) share its entry
                merge(report.data[key].setdefault(f"d{head_dim}/{n}", {}), result[key])
            report.data["failures"] += [{**case, "candidate": c, **f} for c, f in result["failures"].items()]
            for row in result["rows"]:
                report.add(**row)
                figure = (f"{row['peak_over_output']:.2f}x output" if row["mode"] == "memory" else
                          f"{row['median_s'] * 1e3:10.2f} ms  efficiency {row['efficiency']:.3f}")
                print(f"d={head_dim} n={n:>8} {row['candidate']:>15} {row['mode']:>16}: {figure}", flush=True)
            for key, ratio in result["ratios"].items():
                print(f"d={head_dim} n={n:>8} time ratio {key}: {ratio:.2f}", flush=True)
            for mode, cost in result["permutation"].items():
                print(f"d={head_dim} n={n:>8} permutation cost {mode}: {cost['cost_s'] * 1e3:.2f} ms "
                      f"({cost['cost_share_of_natural']:.1%} of natural flex)", flush=True)
    report.data["skipped"] += budget.skipped
    notes.append(f"load average at the end (1, 5, 15 min): {os.getloadavg()}")  # a shared machine's state
    report.data["targets"] = evaluate(report.data["rows"], report.data["ratios"], preset)
    report.data["choice_table"] = choice_table(report.data["ratios"], args.device, args.dtype)
    report.write()
    if report.data["rows"]:
        plot(report.data["rows"], out.with_suffix(".png"),
             f"Dilated attention, {args.device} {args.dtype}: {cfg['heads']} heads, segments {cfg['segments']}")
    for name, target in report.data["targets"].items():
        print(f"target {name}: {'met' if target['met'] else 'NOT met'}  "
              f"{json.dumps({k: v for k, v in target.items() if k != 'met'})}")
    for row in report.data["choice_table"]:
        print(f"choice d={row['head_dim']} n={row['length']} causal={row['causal']} training={row['training']}: "
              f"{row['winner']} (fast/flex {row['fast_over_flex']:.2f})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
