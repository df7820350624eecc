"""Benchmark: dilated attention over packed documents (``cu_seqlens``).

    python tools/bench_packed_dilated.py [--rounds N] [--mix long|short ...] [--backward] [--quick]
                                         [--device cpu|cuda] [--dtype D] [--budget-s S] [--out PATH]
                                         [--resume PATH]

Default (no device flags): CPU, float32, 2 threads, batch 1, 8 heads of 64,
the dilated benchmark spec of tools/bench_attention.py's cpu preset
(branches (2048, 1), (4096, 2), (8192, 4), longnet), forward without
gradients (``--backward``: forward and backward of every candidate, q, k, v
needing gradients), non-causal, ``ImprovedDilatedAttention`` ("fast") in
every candidate. Two document mixes (lengths drawn log-uniform with a fixed
seed), by device:
- cpu: long, 16 documents of 512..16K tokens; short, 256 documents of 64..1K;
- cuda (``--dtype bfloat16`` from tools/bench_gpu.py, CUDA-event timer):
  long, 16 documents of 2K..128K; short, 256 documents of 256..8K (about
  0.5M tokens each; a few seconds of calls per mix on an H100 besides the
  flex compile);
- ``--quick`` (either device): long, 4 documents of 256..2K; short, 32 of
  16..256 (seconds on the CPU).

Candidates, interleaved A B C D A B C D with a square matmul (benchlib;
3072^3 on the CPU, 8192^3 in the run's dtype on CUDA):
- packed: one call with ``cu_seqlens``;
- flex (CUDA only): ``DilatedAttention(..., implementation="flex")`` with
  ``cu_seqlens``, one FlexAttention call over the documents' residue
  layouts (left out on the CPU, where it compiles for 10+ s a shape);
- padded: the documents as a batch padded to the longest, with
  ``key_padding_mask`` (what a user does without cu_seqlens; a padded
  document of length L < w gets segments of min(w, longest), not min(w, L),
  so this is the cost of the workaround, not the same function);
- loop: one call per document, in Python;
- single: one unpacked sequence of the same total length (the reference
  figure).

Useful work (``attention_candidates.selected_pairs``, 4 * head_dim FLOP a
pair, 3.5 times that with ``--backward``): a document's own pairs for
packed, flex, padded and loop; the whole sequence's pairs for single.
Targets (issue 25): packed's useful FLOP/s at least 0.85 of single's;
packed faster than padded by at least the padding fraction (time(packed)
<= (1 - fraction) * time(padded)); packed never slower than loop; also
collected at the top level (``targets``, "<mix>: <target>") for
tools/bench_gpu.py. One case per mix: the JSON is written after each, a
``--budget-s`` stops new mixes from starting, ``--resume`` skips the mixes
an earlier JSON of this commit holds. Results:
tools/results/packed_dilated_cpu.json (packed_dilated_backward_cpu.json
with ``--backward``; ``_cuda`` on CUDA).
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch

import benchlib
from attention_candidates import selected_pairs

HEADS, HEAD_DIM = 8, 64
SEGMENTS, RATES = (2048, 4096, 8192), (1, 2, 4)
K = 1024
# (documents, shortest, longest) per mix, by preset
PRESETS = {"cpu": {"long": (16, 512, 16 * K), "short": (256, 64, K)},
           "cuda": {"long": (16, 2 * K, 128 * K), "short": (256, 256, 8 * K)},
           "quick": {"long": (4, 256, 2 * K), "short": (32, 16, 256)}}
MATMUL = {"cpu": 3072, "cuda": 8192, "quick": 256}
TARGET_SINGLE = 0.85


def lengths_of(spec: tuple[int, int, int], seed: int = 0) -> list[int]:
    count, low, high = spec
    g = torch.Generator().manual_seed(seed)
    logs = torch.rand(count, generator=g, dtype=torch.float64) * (math.log(high) - math.log(low)) + math.log(low)
    return [int(x) for x in logs.exp().round().tolist()]


def _backward(out) -> None:
    """Backward of one candidate's output (a tensor or a list of them) with an all-ones gradient."""
    for x in out if isinstance(out, list) else [out]:
        x.backward(torch.ones_like(x))


def candidates(lengths: list[int], backward: bool = False, device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[dict, dict]:
    """(name -> callable, name -> useful FLOP): forward only, or forward and
    backward with ``backward`` (inputs needing gradients); "flex" on CUDA only."""
    from attention import DilatedAttention, ImprovedDilatedAttention

    module = ImprovedDilatedAttention(SEGMENTS, RATES)
    total, longest = sum(lengths), max(lengths)
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, total, HEADS, HEAD_DIM, generator=g).to(device, dtype) for _ in range(3))
    batch = [torch.zeros(len(lengths), longest, HEADS, HEAD_DIM, device=device, dtype=dtype) for _ in range(3)]
    pad = torch.ones(len(lengths), longest, dtype=torch.bool, device=device)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        for x, y in zip(batch, (q, k, v)):
            x[i, : b - a] = y[0, a:b]
        pad[i, : b - a] = False
    for x in (q, k, v, *batch):
        x.requires_grad_(backward)
    flop = 4.0 * HEAD_DIM * (3.5 if backward else 1.0)  # a backward is 5 pair matmuls to the forward's 2
    own = sum(selected_pairs(n, HEADS, SEGMENTS, RATES, "longnet") for n in lengths) * flop
    calls = {"packed": lambda: module(q, k, v, cu_seqlens=cu)}
    if torch.device(device).type == "cuda":
        fused = DilatedAttention(SEGMENTS, RATES, implementation="flex")
        calls["flex"] = lambda: fused(q, k, v, cu_seqlens=cu)
    calls.update({
        "padded": lambda: module(*batch, key_padding_mask=pad),
        "loop": lambda: [module(q[:, a:b], k[:, a:b], v[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])],
        "single": lambda: module(q, k, v),
    })
    if backward:
        calls = {name: (lambda call=call: _backward(call())) for name, call in calls.items()}
    work = {name: own for name in calls}
    work["single"] = selected_pairs(total, HEADS, SEGMENTS, RATES, "longnet") * flop
    return calls, work


def collect_targets(report: benchlib.Report) -> None:
    """Every mix's targets (resumed ones too) at the top level, "<mix>: <target>", as tools/bench_gpu.py reads them."""
    report.data["targets"] = {f"{row['mix']}: {key}": entry for row in report.data["rows"]
                              for key, entry in row["targets"].items()}
    report.write()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    benchlib.add_arguments(parser)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mix", nargs="+", default=["long", "short"], choices=["long", "short"])
    parser.add_argument("--backward", action="store_true", help="time forward and backward")
    parser.add_argument("--quick", action="store_true", help="tiny mixes: a smoke run of the script")
    args = parser.parse_args()
    preset = "quick" if args.quick else args.device
    suffix = f"{'_backward' if args.backward else ''}_{args.device}"
    out = args.out or benchlib.RESULTS / f"packed_dilated{suffix}.json"
    dtype = getattr(torch, args.dtype)
    threads = None
    if args.device == "cpu":
        torch.set_num_threads(2)
        threads = 2
    else:
        benchlib.raise_recompile_limit()  # flex compiles once per mix (its total length)
    matmul = MATMUL[preset]
    config = {"heads": HEADS, "head_dim": HEAD_DIM, "segments": SEGMENTS, "rates": RATES, "dtype": args.dtype,
              "causal": False, "forward_only": not args.backward, "rounds": args.rounds, "matmul": matmul,
              "mixes": {name: PRESETS[preset][name] for name in args.mix}}
    if preset != "cpu":
        config["preset"] = preset
    report = benchlib.Report([out], "packed_dilated", config, device=args.device, threads=threads,
                             resume=args.resume)
    budget = benchlib.Budget(math.inf if args.budget_s is None else args.budget_s)
    timed = benchlib.timer(args.device)
    for mix in args.mix:
        if report.has(mix=mix) or not budget.allows({"mix": mix}):
            continue
        lengths = lengths_of(PRESETS[preset][mix])
        try:
            calls, work = candidates(lengths, args.backward, args.device, dtype)
            with torch.set_grad_enabled(args.backward):
                result = benchlib.interleave(calls, timed=timed, rounds=args.rounds,
                                             reference=benchlib.matmul(matmul, args.device, dtype))
        except Exception as error:  # noqa: BLE001 - an OOM or a failure at one mix; the next goes on
            report.fail({"mix": mix}, error)
            benchlib.free_memory()
            continue
        matmul_flops = 2 * matmul ** 3 / result.median("matmul")
        timed_calls = [name for name in calls if name in result.times]  # a candidate failing its warm-up is out
        rows = {}
        for name in timed_calls:
            rows[name] = {**result.row(name), "useful_flop": work[name],
                          "efficiency": work[name] / result.median(name) / matmul_flops}
        total, longest = sum(lengths), max(lengths)
        padding = 1 - total / (len(lengths) * longest)
        flops = {name: work[name] / result.median(name) for name in timed_calls}
        # (value, target, met): useful FLOP/s at least, times at most; those whose candidates all ran
        targets = {}
        if {"packed", "single"} <= flops.keys():
            ratio_single = flops["packed"] / flops["single"]
            targets["packed/single useful FLOP/s"] = {"value": ratio_single, "target": TARGET_SINGLE,
                                                      "met": ratio_single >= TARGET_SINGLE}
        if {"packed", "padded"} <= flops.keys():
            ratio_padded = result.ratio("packed", "padded")
            targets["time packed/padded"] = {"value": ratio_padded, "target": 1 - padding,
                                             "met": ratio_padded <= 1 - padding}
        if {"packed", "loop"} <= flops.keys():
            ratio_loop = result.ratio("packed", "loop")
            targets["time packed/loop"] = {"value": ratio_loop, "target": 1.0, "met": ratio_loop <= 1.0}
        extra = {"time_flex_over_packed": result.ratio("flex", "packed")} if "flex" in timed_calls else {}
        report.add(mix=mix, documents=len(lengths), total_tokens=total, longest=longest,
                   lengths=lengths, padding_fraction=padding, candidates=rows, targets=targets,
                   failures=result.failures, median_matmul_s=result.median("matmul"),
                   cpu_ratio_packed_single=statistics.median(
                       a / b for a, b in zip(result.cpu_times["packed"], result.cpu_times["single"]))
                   if {"packed", "single"} <= flops.keys() else None, **extra)
        collect_targets(report)
        for name, row in rows.items():
            print(f"{mix:5s} {name:7s} {row['median_s']:8.3f} s  {row['matmul_units']:7.2f} matmul units  "
                  f"efficiency {row['efficiency']:.3f}")
        for key, entry in targets.items():
            verdict = "met" if entry["met"] else "MISSED"
            print(f"{mix:5s} {key}: {entry['value']:.3f} (target {entry['target']:.3f}) {verdict}", flush=True)
        del calls
        benchlib.free_memory()
    report.data["skipped"] += budget.skipped
    collect_targets(report)


if __name__ == "__main__":
    main()
