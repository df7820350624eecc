"""Benchmark: dilated attention against dense SDPA (and, on the CPU,
dilated-attention-pytorch; on CUDA, a gather-then-flash peer).

    python tools/bench_attention.py [--device cpu|cuda] [--dtype D] [--quick] [--max-length N]
                                    [--budget-s S] [--out PATH] [--resume PATH] [--dapt DIR]

Presets (``--preset``, default by device):
- cpu: float32, 2 threads, batch 1, 8 heads, head_dim 64, branches (2048, 1),
  (4096, 2), (8192, 4), lengths 8K..1M, one fresh worker process per length
  (for its peak RSS). Candidates: ``fast`` and ``reference`` (the two
  implementations of the dilated module), ``sdpa`` (dense), ``fast-grouped``
  and ``dapt-grouped`` (the grouped scheme, identical work); ``:fb`` =
  forward+backward. The slow ones skip lengths and rounds (``CPU``).
- gpu: bf16 (``--dtype``), batch 1, 16 heads, head_dim 128 then 64, segments
  2048/4096/8192/16384 with rates 1/2/4/8, lengths 16K..1M, in one process.
  Candidates: ``fast``; ``gather-flash`` (what torchscale does: gather each
  branch's dilated rows with ``index_select``, FlashAttention per segment,
  scatter back, merge by log-sum-exp weights computed without gradient);
  ``sdpa``, ``sdpa-flash``, ``sdpa-cudnn`` (dense SDPA: default dispatch,
  FlashAttention forced, cuDNN forced) where dense is affordable, and
  ``kernel-cuda_cudnn`` / ``kernel-cuda_flash``: ``attention.kernels.attend``
  on the same dense problem with that backend (forward; the measurement
  behind the kernel layer's default half kernel).

Method (tools/benchlib.py): candidates interleaved (A B C A B C ...) with a
square matmul of the same run (CPU fp32 3072^3, CUDA 8192^3 in the dtype);
medians. Useful work: 4 * head_dim * selected query-key pairs per branch and
head, counted from docs/design.md's rules (tests/dense_reference.py's head
offsets, not the module's plan); dense: 4 * d * n^2 * heads;
forward+backward: 3x. efficiency = useful FLOP/s / the matmul's FLOP/s;
efficiency_cpu_time: the same with process CPU seconds for both (on a shared
machine, CPU time does not count the time another process held the cores).
Peak memory of a forward above everything before it (inputs included in
"before"), over the output's size (benchlib.peak_bytes: RSS high-water mark
with MALLOC_MMAP_THRESHOLD_=1 MiB on the CPU, max_memory_allocated on CUDA).

``--dapt DIR``: a directory where ``dilated_attention_pytorch==0.2.0`` (and
einops) were installed with ``pip install --no-deps --target DIR``. That
package imports xformers; the worker puts a stand-in ``xformers.ops`` first
on its path, routing ``memory_efficient_attention`` to
``torch.nn.functional.scaled_dot_product_attention`` (the output says so).

Writes tools/results/attention.json and attention.png (``--out``; on CUDA
attention_cuda.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import benchlib
from tests.dense_reference import head_offsets

K = 1024
ALL = tuple(8 * K << i for i in range(8))  # 8K .. 1M
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
            "candidates": {"fast": ("longnet", ALL), "gather-flash": ("longnet", ALL), "sdpa": ("dense", ALL[:5]),
                           "sdpa-flash": ("dense", ALL[:5]), "sdpa-cudnn": ("dense", ALL[:5]),
                           "fast:fb": ("longnet", ALL), "gather-flash:fb": ("longnet", ALL),
                           "sdpa-flash:fb": ("dense", ALL[:4]), "sdpa-cudnn:fb": ("dense", ALL[:4]),
                           "kernel-cuda_cudnn": ("dense", ALL[:5]), "kernel-cuda_flash": ("dense", ALL[:5])}},
}
QUICK = {"heads": 2, "segments": (64, 128), "rates": (1, 2), "lengths": (256, 512), "matmul": 256}
# (slow, fast) candidates whose same-round time ratio is reported
PAIRS = (("reference", "fast"), ("dapt-grouped", "fast-grouped"), ("reference:fb", "fast:fb"),
         ("gather-flash", "fast"), ("gather-flash:fb", "fast:fb"))

XFORMERS_STANDIN = '''"""Stand-in for xformers.ops on CPU (written by tools/bench_attention.py):
memory_efficient_attention -> torch.nn.functional.scaled_dot_product_attention."""
from typing import Any
import torch.nn.functional as F

AttentionOp = Any


class LowerTriangularMask:
    pass


def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, op=None):
    # xformers layout (batch, seq, heads, dim); SDPA wants (batch, heads, seq, dim)
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
        dropout_p=p, is_causal=isinstance(attn_bias, LowerTriangularMask), scale=scale,
    )
    return out.transpose(1, 2)
'''


def selected_pairs(n: int, heads: int, segments, rates, scheme: str) -> int:
    """Query-key pairs the dilated pattern selects (non-causal), over branches and heads."""
    total = 0
    for (w, r), offsets in zip(zip(segments, rates), head_offsets(heads, segments, rates, scheme)):
        s = min(w, n)
        full, tail = divmod(n, s)
        total += sum(full * len(range(o, s, r)) ** 2 + len(range(o, tail, r)) ** 2 for o in offsets if o is not None)
    return total


def gather_flash(q, k, v, segments, rates):
    """The peer (torchscale's algorithm, see the module docstring); (b, n, h, d)
    in and out, n a multiple of every min(w, n)."""
    b, n, h, d = q.shape
    outs, lses = [], []
    for w, r in zip(segments, rates):
        s = min(w, n)
        group = -(-h // r)
        out = q.new_zeros(b, n, h, d)
        lse = torch.full((b, n, h), -math.inf, dtype=torch.float32, device=q.device)
        for o in range(r):
            heads = slice(o * group, min(h, (o + 1) * group))
            hg = heads.stop - heads.start
            if hg <= 0:
                continue
            within = torch.arange(o, s, r, device=q.device)
            index = (torch.arange(n // s, device=q.device)[:, None] * s + within[None]).flatten()
            parts = [x.index_select(1, index)[:, :, heads].reshape(-1, within.numel(), hg, d).transpose(1, 2)
                     for x in (q, k, v)]
            if q.device.type == "cuda":
                o_part, l_part, *_ = torch.ops.aten._scaled_dot_product_flash_attention(*parts, 0.0, False, False)
            else:
                o_part, l_part = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*parts, 0.0, False)
            out[:, index, heads] = o_part.transpose(1, 2).reshape(b, index.numel(), hg, d)
            lse[:, index, heads] = l_part.float().reshape(b, n // s, hg, -1).transpose(2, 3).reshape(b, -1, hg)
        outs.append(out)
        lses.append(lse)
    with torch.no_grad():
        weights = torch.softmax(torch.stack(lses), dim=0)
    return sum(wt.unsqueeze(-1).to(q.dtype) * o for wt, o in zip(weights, outs))


def sdpa(backend=None):
    """Dense SDPA on (b, n, h, d), with one SDPA backend forced (torch.nn.attention.sdpa_kernel) or not."""
    def call(q, k, v):
        args = [x.transpose(1, 2) for x in (q, k, v)]
        if backend is None:
            return F.scaled_dot_product_attention(*args).transpose(1, 2)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(*args).transpose(1, 2)
    return call


def function(name: str, cfg: dict):
    """The (b, n, h, d) -> (b, n, h, d) callable of a candidate (``:fb`` stripped)."""
    segments, rates = cfg["segments"], cfg["rates"]
    if name in ("fast", "reference"):
        return benchlib.dilated_module(name, segments, rates)
    if name == "fast-grouped":
        return benchlib.dilated_module("fast", segments, rates, scheme="grouped")
    if name == "dapt-grouped":
        from dilated_attention_pytorch.dilated_attention import DilatedAttention as DaptAttention

        return DaptAttention(segments, rates)
    if name == "gather-flash":
        return lambda q, k, v: gather_flash(q, k, v, segments, rates)
    if name.startswith("kernel-"):  # one kernel of the kernel layer, chosen by its public backend name
        from attention.kernels import attend

        def kernel(q, k, v, backend=name.split("-", 1)[1]):
            args = [x.transpose(1, 2) for x in (q, k, v)]
            return attend(*args, causal=False, scale=None, backend=backend)[0].transpose(1, 2)
        return kernel
    if name.startswith("sdpa"):
        from torch.nn.attention import SDPBackend

        return sdpa({"sdpa": None, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
                     "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}[name])
    raise ValueError(name)


def cpu_rounds(n: int, name: str) -> int:
    """Timed calls per candidate on the CPU: more at short lengths, where calls are cheap."""
    slow = name.startswith(("reference", "sdpa"))
    if n <= 16 * K:
        return (2 if n <= 8 * K else 1) if slow else 3
    return 1 if slow or n > 64 * K else 2


def measure_length(n: int, head_dim: int, names: list[str], cfg: dict, device: str, dtype_name: str) -> dict:
    """Every candidate at one length: interleaved rows, same-round ratios, forward peaks."""
    torch.manual_seed(0)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    dtype, heads = getattr(torch, dtype_name), cfg["heads"]
    q, k, v = (torch.randn(1, n, heads, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad_out = torch.randn_like(q)
    functions = {name: function(name.split(":")[0], cfg) for name in names}

    def forward(fn):
        def call():
            with torch.no_grad():
                return fn(q, k, v)
        return call

    def backward(fn):
        return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)

    warm = [x[:, :max(cfg["segments"])].detach() for x in (q, k, v)]  # dapt needs whole segments
    calls, failures = {}, {}
    for name, fn in functions.items():
        try:
            with torch.no_grad():
                fn(*warm)  # plans fetched, kernels loaded, outside every timing
        except Exception as error:  # noqa: BLE001 - recorded, the others go on
            failures[name] = benchlib.failure(error)
            continue
        calls[name] = backward(fn) if name.endswith(":fb") else forward(fn)
    del warm
    checks = {}
    if "gather-flash" in calls and "fast" in calls:  # the peer must compute the same function
        ours, peer = (calls[name]().float() for name in ("fast", "gather-flash"))
        checks["gather_flash_vs_fast_relative_difference"] = float((peer - ours).norm() / ours.norm())
        del ours, peer
    on_cpu = torch.device(device).type == "cpu"
    runs = benchlib.interleave(
        calls, timed=benchlib.timer(device), warmup=0 if on_cpu else 2, seconds=cfg["seconds"],
        rounds={c: cpu_rounds(n, c) for c in calls} if on_cpu else None,
        reference=benchlib.matmul(cfg["matmul"], device, torch.float32 if on_cpu else dtype))
    failures.update(runs.failures)
    matmul_flop = 2 * cfg["matmul"] ** 3
    matmul_rate, matmul_cpu_rate = matmul_flop / runs.median("matmul"), matmul_flop / runs.cpu_median("matmul")
    rows = []
    for name in runs.times:
        if name == "matmul":
            continue
        scheme = cfg["candidates"][name][0]
        work = 4.0 * head_dim * (n * n * heads if scheme == "dense" else
                                 selected_pairs(n, heads, cfg["segments"], cfg["rates"], scheme))
        work *= 3 if name.endswith(":fb") else 1
        rows.append({"length": n, "head_dim": head_dim, "candidate": name.split(":")[0], "scheme": scheme,
                     "mode": "forward+backward" if name.endswith(":fb") else "forward", **runs.row(name),
                     "useful_tflop": work / 1e12, "useful_tflops": work / runs.median(name) / 1e12,
                     "efficiency": work / runs.median(name) / matmul_rate,
                     "efficiency_cpu_time": work / runs.cpu_median(name) / matmul_cpu_rate})
    for name in [c for c in calls if not c.endswith(":fb") and c.split("-")[0] in ("fast", "reference", "gather")]:
        benchlib.free_memory()
        out, peak = benchlib.peak_bytes(calls[name], device)
        if peak is not None:
            size = out.numel() * out.element_size()
            rows.append({"length": n, "head_dim": head_dim, "candidate": name, "mode": "memory",
                         "peak_bytes_above_inputs": peak, "output_bytes": size, "peak_over_output": peak / size})
        del out
    ratios = {f"{a}/{b}": runs.ratio(a, b) for a, b in PAIRS if a in runs.times and b in runs.times}
    return {"rows": rows, "ratios": ratios, "failures": failures, "matmul_tflops": matmul_rate / 1e12,
            "checks": checks}


def cpu_worker(n, head_dim, names, cfg, args, dapt, standin) -> dict:
    """measure_length in a fresh process (its peak RSS is this length's alone)."""
    paths = [str(benchlib.REPO)] + ([str(standin), str(dapt)] if dapt else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), MALLOC_MMAP_THRESHOLD_=str(1 << 20),
               OMP_NUM_THREADS=str(cfg["threads"]))
    command = [sys.executable, __file__, "--worker", json.dumps([n, head_dim, names, cfg]),
               "--device", args.device, "--dtype", args.dtype]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"worker for n={n} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def estimate_s(report: benchlib.Report, head_dim: int, n: int, names: list[str]) -> float:
    """Seconds length n will take from the longest shorter length's medians of the
    candidates that run at n: dilated grows linearly, dense quadratically; ~6
    calls each (warm-up, rounds, memory)."""
    def runs_at_n(row: dict) -> bool:
        return row["candidate"] + (":fb" if row["mode"] == "forward+backward" else "") in names

    rows = [r for r in report.data["rows"] if r["head_dim"] == head_dim and r["length"] < n and "median_s" in r
            and runs_at_n(r)]
    longest = max((r["length"] for r in rows), default=None)
    if longest is None:
        return 0.0
    return 6 * sum(r["median_s"] * (n / longest) ** (2 if r["scheme"] == "dense" else 1)
                   for r in rows if r["length"] == longest)


def evaluate(rows: list[dict], report_ratios: dict, preset: str) -> dict:
    """The targets, each with the figures it was judged on (the gpu preset adds TFLOP/s against dense)."""
    def pick(candidate, mode, d=None):
        return {r["length"]: r for r in rows if r["candidate"] == candidate and r["mode"] == mode
                and (d is None or r["head_dim"] == d)}

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
    speedups = {key: r["reference/fast"] for key, r in report_ratios.items() if "reference/fast" in r}
    if speedups:
        targets["fast_faster_than_reference"] = {"met": min(speedups.values()) > 1.0, "by_case": speedups}
    dapt = {key: r["dapt-grouped/fast-grouped"] for key, r in report_ratios.items()
            if "dapt-grouped/fast-grouped" in r and int(key.split("/")[1]) >= 32 * K}
    if dapt:
        targets["grouped>=1.15x_faster_than_dapt_at>=32K"] = {"met": min(dapt.values()) >= 1.15, "by_case": dapt}
    peer = {key: r["gather-flash/fast"] for key, r in report_ratios.items() if "gather-flash/fast" in r}
    if peer:
        targets["fast_faster_than_gather_flash"] = {"met": min(peer.values()) > 1.0, "by_case": peer}
    peaks = {f"d{r['head_dim']}/{r['length']}": r["peak_over_output"] for r in rows
             if r["candidate"] == "fast" and r["mode"] == "memory"}
    if peaks:
        targets["forward_peak_above_inputs<=1.5x_output"] = {"met": max(peaks.values()) <= 1.5, "by_length": peaks}
    for mode, minimum in (("forward", 0.8), ("forward+backward", 0.7)):
        dense = {}
        for r in rows:
            if r.get("scheme") == "dense" and r["mode"] == mode:
                key = (r["head_dim"], r["length"])
                dense[key] = max(dense.get(key, 0.0), r["useful_tflops"])
        ratios = {f"d{d}/{n}": r["useful_tflops"] / dense[(d, n)] for d in {r["head_dim"] for r in rows}
                  for n, r in pick("fast", mode, d).items() if (d, n) in dense and n >= 16 * K}
        if ratios and preset == "gpu":
            targets[f"{mode}_tflops>={minimum}x_dense"] = {"met": min(ratios.values()) >= minimum, "by_case": ratios}
    return targets


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
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    if preset == "gpu":  # the shortest, the longest (the 1M target), then the rest: a short budget drops the middle
        lengths = list(dict.fromkeys([lengths[0], lengths[-1], *lengths[1:-1]]))
    dapt = args.dapt if args.dapt and (args.dapt / "dilated_attention_pytorch").is_dir() else None
    out = args.out or benchlib.RESULTS / ("attention.json" if args.device == "cpu" else f"attention_{args.device}.json")
    notes = ["efficiency = useful FLOP/s / FLOP/s of a square matmul interleaved with the candidates",
             "useful work: 4 * head_dim * selected (query, key) pairs per head; forward+backward: 3x",
             "memory rows: forward peak above everything allocated before the call, over the output size",
             "dilated-attention-pytorch 0.2.0 with a STAND-IN xformers module (memory_efficient_attention -> "
             "torch SDPA)" if dapt else "dilated-attention-pytorch not given (--dapt): no comparison"]
    report = benchlib.Report([out], "tools/bench_attention.py", {**cfg, "preset": preset, "dtype": args.dtype,
                             "lengths": lengths, "notes": notes}, device=args.device, threads=cfg["threads"],
                             resume=args.resume)
    report.data.setdefault("ratios", {})
    budget = benchlib.Budget(math.inf if args.budget_s is None else args.budget_s)
    with tempfile.TemporaryDirectory() as tmp:
        standin = Path(tmp) if dapt else None
        if standin:
            (standin / "xformers").mkdir()
            (standin / "xformers" / "__init__.py").write_text("")
            (standin / "xformers" / "ops.py").write_text(XFORMERS_STANDIN)
        for head_dim in cfg["head_dims"]:
            for n in lengths:
                names = [c for c, (_, run) in cfg["candidates"].items()
                         if (args.quick or n in run) and (dapt or not c.startswith("dapt"))]
                case = {"head_dim": head_dim, "length": n}
                if report.has(**case) or not budget.allows(case, estimate_s(report, head_dim, n, names)):
                    continue
                try:
                    if args.device == "cpu":
                        result = cpu_worker(n, head_dim, names, cfg, args, dapt, standin)
                    else:
                        result = measure_length(n, head_dim, names, cfg, args.device, args.dtype)
                except Exception as error:  # noqa: BLE001 - an OOM or a crash at one length; the others go on
                    report.fail(case, error)
                    benchlib.free_memory()
                    continue
                report.data["ratios"][f"d{head_dim}/{n}"] = result["ratios"]
                report.data.setdefault("checks", {})[f"d{head_dim}/{n}"] = result["checks"]
                report.data["failures"] += [{**case, "candidate": c, **f} for c, f in result["failures"].items()]
                for row in result["rows"]:
                    report.add(**row)
                    figure = (f"{row['peak_over_output']:.2f}x output" if row["mode"] == "memory" else
                              f"{row['median_s'] * 1e3:10.2f} ms  efficiency {row['efficiency']:.3f}")
                    print(f"d={head_dim} n={n:>8} {row['candidate']:>13} {row['mode']:>16}: {figure}", flush=True)
                for key, ratio in result["ratios"].items():
                    print(f"d={head_dim} n={n:>8} time ratio {key}: {ratio:.2f}", flush=True)
    report.data["skipped"] += budget.skipped
    report.data["targets"] = evaluate(report.data["rows"], report.data["ratios"], preset)
    report.write()
    if report.data["rows"]:
        plot(report.data["rows"], out.with_suffix(".png"),
             f"Dilated attention, {args.device} {args.dtype}: {cfg['heads']} heads, segments {cfg['segments']}")
    for name, target in report.data["targets"].items():
        print(f"target {name}: {'met' if target['met'] else 'NOT met'}  "
              f"{json.dumps({k: v for k, v in target.items() if k != 'met'})}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
