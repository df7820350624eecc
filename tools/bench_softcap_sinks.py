"""What soft-capping and attention sinks cost (attention/sinks.py) against
the same call without them, on the CPU.

    PYTHONPATH=. python tools/bench_softcap_sinks.py [--lengths 4096 8192] [--out tools/results/softcap_sinks.json]
        [--documents D]

Per (module, length, pass): four candidates interleaved round by round with
a 1024^3 matmul (benchlib.interleave): "plain", "softcap" (c = 50, Gemma 2's),
"sinks" (one logit per head) and "both"; medians, and each candidate's
ratio to "plain" as the median over rounds of the same round's ratio (and
the ratio of this process's CPU-time medians, which other processes on a
shared host inflate less).
Modules: ``ImprovedDilatedAttention`` (segments 2048/4096, rates 1/2, causal)
and ``BlockSparseAttention`` (bigbird, block 128, unidirectional); batch 1,
8 heads, head_dim 64, float32. Passes: "forward" (under no_grad) and
"train" (forward and backward of q, k, v and the sinks). ``--documents D``
(D > 1): every call is a packed batch (``cu_seqlens``) of D documents of
uneven lengths (``document_bounds``), the same in every candidate.

Expectation, from where each feature runs: a sink is one merge of the final
(out, lse), O(rows x heads x head_dim), against the call's O(rows x keys x
head_dim); a soft-cap needs a kernel with a score modifier, so the call
walks from the fused CPU flash kernel to the explicit matmul kernel.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch

import benchlib
from attention import BlockSparseAttention, ImprovedDilatedAttention

HEADS, HEAD_DIM, SOFTCAP = 8, 64, 50.0
CANDIDATES = ("plain", "softcap", "sinks", "both")


def modules(name: str) -> dict[str, torch.nn.Module]:
    """The module without and with a soft-cap."""
    if name == "dilated":
        return {cap: ImprovedDilatedAttention([2048, 4096], [1, 2], softcap=SOFTCAP if cap else None)
                for cap in (False, True)}
    return {cap: BlockSparseAttention("bigbird", block_size=128, attention="unidirectional",
                                      softcap=SOFTCAP if cap else None) for cap in (False, True)}


def document_bounds(n: int, documents: int) -> Optional[torch.Tensor]:
    """``cu_seqlens`` of ``documents`` documents over ``n`` tokens, lengths rising 1 : 2 : ... : D
    (None for one document: an unpacked call)."""
    if documents <= 1:
        return None
    weights = torch.arange(1, documents + 1, dtype=torch.float64)
    ends = (weights.cumsum(0) / weights.sum() * n).round().to(torch.int64)
    return torch.cat([torch.zeros(1, dtype=torch.int64), ends])


def calls(name: str, n: int, train: bool, documents: int = 1) -> dict:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, n, HEADS, HEAD_DIM, requires_grad=train) for _ in range(3))
    sinks = torch.randn(HEADS, requires_grad=train)
    built = modules(name)
    cu_seqlens = document_bounds(n, documents)

    def run(cap: bool, with_sinks: bool):
        def call():
            with torch.set_grad_enabled(train):
                out = built[cap](q, k, v, is_causal=True, sinks=sinks if with_sinks else None,
                                 cu_seqlens=cu_seqlens)
                if train:
                    out.sum().backward()
        return call

    return {"plain": run(False, False), "softcap": run(True, False), "sinks": run(False, True),
            "both": run(True, True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default="tools/results/softcap_sinks.json")
    parser.add_argument("--documents", type=int, default=1, help="D > 1: packed batches of D documents")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = {"heads": HEADS, "head_dim": HEAD_DIM, "softcap": SOFTCAP, "dtype": "float32", "batch": 1,
              "dilated": {"segment_lengths": [2048, 4096], "dilation_rates": [1, 2]},
              "sparse": {"kind": "bigbird", "block_size": 128, "attention": "unidirectional"},
              "rounds": args.rounds, "reference": "matmul 1024^3 float32", "documents": args.documents}
    report = benchlib.Report([Path(args.out)], "softcap_sinks", config, threads=args.threads)
    for name in ("dilated", "sparse"):
        for n in args.lengths:
            for train in (False, True):
                case = {"module": name, "seq_len": n, "pass": "train" if train else "forward"}
                try:
                    runs = benchlib.interleave(calls(name, n, train, args.documents), timed=benchlib.timer("cpu"),
                                               rounds=args.rounds, reference=benchlib.matmul(1024))
                except Exception as error:  # noqa: BLE001 - recorded, the other cases go on
                    report.fail(case, error)
                    continue
                row = {**case, **{c: runs.row(c) for c in CANDIDATES},
                       "ratio_to_plain": {c: round(runs.ratio(c, "plain"), 3) for c in CANDIDATES[1:]},
                       # this process's CPU seconds: what the other processes of a shared host do not inflate
                       "cpu_ratio_to_plain": {c: round(runs.cpu_median(c) / runs.cpu_median("plain"), 3)
                                              for c in CANDIDATES[1:]},
                       "matmul_s": runs.median("matmul"), "failures": runs.failures}
                report.add(**row)
                print(case, row["ratio_to_plain"], row["cpu_ratio_to_plain"],
                      {c: round(runs.median(c) * 1e3, 1) for c in CANDIDATES}, flush=True)


if __name__ == "__main__":
    main()
