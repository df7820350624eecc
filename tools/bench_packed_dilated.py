"""Benchmark: dilated attention over packed documents (``cu_seqlens``).

    python tools/bench_packed_dilated.py [--rounds N] [--mix long|short ...] [--backward] [--out PATH]

CPU, float32, 2 threads, batch 1, 8 heads of 64, the dilated benchmark
spec of tools/bench_attention.py's cpu preset (branches (2048, 1), (4096,
2), (8192, 4), longnet), forward without gradients (``--backward``: forward
and backward of every candidate, q, k, v needing gradients), non-causal,
``ImprovedDilatedAttention`` ("fast") in every candidate. Two document
mixes (lengths drawn log-uniform with a fixed seed):
- long: 16 documents of 512..16K tokens;
- short: 256 documents of 64..1K tokens.

Candidates, interleaved A B C D A B C D with a 3072^3 matmul (benchlib):
- packed: one call with ``cu_seqlens``;
- padded: the documents as a batch padded to the longest, with
  ``key_padding_mask`` (what a user does without cu_seqlens; a padded
  document of length L < w gets segments of min(w, longest), not min(w, L),
  so this is the cost of the workaround, not the same function);
- loop: one call per document, in Python;
- single: one unpacked sequence of the same total length (the reference
  figure).

Useful work (``attention_candidates.selected_pairs``, 4 * head_dim FLOP a
pair, 3.5 times that with ``--backward``): a document's own pairs for
packed, padded and loop; the whole sequence's pairs for single. Targets
(issue 25): packed's useful FLOP/s at least 0.85 of single's; packed faster
than padded by at least the padding fraction (time(packed) <= (1 -
fraction) * time(padded)); packed never slower than loop. Results:
tools/results/packed_dilated_cpu.json (packed_dilated_backward_cpu.json
with ``--backward``).
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import torch

import benchlib
from attention_candidates import selected_pairs

HEADS, HEAD_DIM = 8, 64
SEGMENTS, RATES = (2048, 4096, 8192), (1, 2, 4)
MIXES = {"long": (16, 512, 16 * 1024), "short": (256, 64, 1024)}
TARGET_SINGLE = 0.85


def lengths_of(mix: str, seed: int = 0) -> list[int]:
    count, low, high = MIXES[mix]
    g = torch.Generator().manual_seed(seed)
    logs = torch.rand(count, generator=g, dtype=torch.float64) * (math.log(high) - math.log(low)) + math.log(low)
    return [int(x) for x in logs.exp().round().tolist()]


def _backward(out) -> None:
    """Backward of one candidate's output (a tensor or a list of them) with an all-ones gradient."""
    for x in out if isinstance(out, list) else [out]:
        x.backward(torch.ones_like(x))


def candidates(lengths: list[int], backward: bool = False) -> tuple[dict, dict]:
    """(name -> callable, name -> useful FLOP): forward only, or forward and
    backward with ``backward`` (inputs needing gradients)."""
    from attention import ImprovedDilatedAttention

    module = ImprovedDilatedAttention(SEGMENTS, RATES)
    total, longest = sum(lengths), max(lengths)
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    cu = torch.tensor(bounds, dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, total, HEADS, HEAD_DIM, generator=g) for _ in range(3))
    batch = [torch.zeros(len(lengths), longest, HEADS, HEAD_DIM) for _ in range(3)]
    pad = torch.ones(len(lengths), longest, dtype=torch.bool)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        for x, y in zip(batch, (q, k, v)):
            x[i, : b - a] = y[0, a:b]
        pad[i, : b - a] = False
    for x in (q, k, v, *batch):
        x.requires_grad_(backward)
    flop = 4.0 * HEAD_DIM * (3.5 if backward else 1.0)  # a backward is 5 pair matmuls to the forward's 2
    own = sum(selected_pairs(n, HEADS, SEGMENTS, RATES, "longnet") for n in lengths) * flop
    calls = {
        "packed": lambda: module(q, k, v, cu_seqlens=cu),
        "padded": lambda: module(*batch, key_padding_mask=pad),
        "loop": lambda: [module(q[:, a:b], k[:, a:b], v[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])],
        "single": lambda: module(q, k, v),
    }
    if backward:
        calls = {name: (lambda call=call: _backward(call())) for name, call in calls.items()}
    work = {"packed": own, "padded": own, "loop": own,
            "single": selected_pairs(total, HEADS, SEGMENTS, RATES, "longnet") * flop}
    return calls, work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mix", nargs="+", default=list(MIXES), choices=list(MIXES))
    parser.add_argument("--backward", action="store_true", help="time forward and backward")
    parser.add_argument("--out", type=Path, default=None,
                        help="default tools/results/packed_dilated_cpu.json (_backward_cpu.json with --backward)")
    args = parser.parse_args()
    out = args.out or benchlib.RESULTS / f"packed_dilated{'_backward' if args.backward else ''}_cpu.json"
    torch.set_num_threads(2)
    config = {"heads": HEADS, "head_dim": HEAD_DIM, "segments": SEGMENTS, "rates": RATES, "dtype": "float32",
              "causal": False, "forward_only": not args.backward, "rounds": args.rounds, "matmul": 3072,
              "mixes": {name: MIXES[name] for name in args.mix}}
    report = benchlib.Report([out], "packed_dilated", config, threads=2)
    timed = benchlib.timer("cpu")
    for mix in args.mix:
        lengths = lengths_of(mix)
        calls, work = candidates(lengths, args.backward)
        with torch.set_grad_enabled(args.backward):
            result = benchlib.interleave(calls, timed=timed, rounds=args.rounds, reference=benchlib.matmul(3072))
        matmul_flops = 2 * 3072 ** 3 / result.median("matmul")
        rows = {}
        for name in calls:
            rows[name] = {**result.row(name), "useful_flop": work[name],
                          "efficiency": work[name] / result.median(name) / matmul_flops}
        total, longest = sum(lengths), max(lengths)
        padding = 1 - total / (len(lengths) * longest)
        flops = {name: work[name] / result.median(name) for name in calls}
        # (value, target, met): useful FLOP/s at least, times at most
        ratio_single = flops["packed"] / flops["single"]
        ratio_padded, ratio_loop = result.ratio("packed", "padded"), result.ratio("packed", "loop")
        targets = {
            "packed/single useful FLOP/s": {"value": ratio_single, "target": TARGET_SINGLE,
                                            "met": ratio_single >= TARGET_SINGLE},
            "time packed/padded": {"value": ratio_padded, "target": 1 - padding, "met": ratio_padded <= 1 - padding},
            "time packed/loop": {"value": ratio_loop, "target": 1.0, "met": ratio_loop <= 1.0},
        }
        report.add(mix=mix, documents=len(lengths), total_tokens=total, longest=longest,
                   lengths=lengths, padding_fraction=padding, candidates=rows, targets=targets,
                   failures=result.failures, median_matmul_s=result.median("matmul"),
                   cpu_ratio_packed_single=statistics.median(
                       a / b for a, b in zip(result.cpu_times["packed"], result.cpu_times["single"])))
        for name, row in rows.items():
            print(f"{mix:5s} {name:7s} {row['median_s']:8.3f} s  {row['matmul_units']:7.2f} matmul units  "
                  f"efficiency {row['efficiency']:.3f}")
        for key, entry in targets.items():
            verdict = "met" if entry["met"] else "MISSED"
            print(f"{mix:5s} {key}: {entry['value']:.3f} (target {entry['target']:.3f}) {verdict}")


if __name__ == "__main__":
    main()
