"""CPU figures of the residue-order block layout (attention.dilated.residue_layout) at
the benchmark's spec: segments 2048/4096/8192/16384, rates 1/2/4/8, 16 heads,
block 128, lengths 64K..1M, causal and not.

Per (length, causal): cold generation time of the layout's CSR and its
transpose (flex's q side), and of the flex BlockMask the forward needs, from
nothing (``residue_block_mask`` on CPU tensors: one period's mask repeated), active / full / partial blocks, the pairs the active
blocks hold, the union of selected pairs (exact: the spec is aligned, so each
block lies inside one run pair and M is constant on it; a partial block's
causal pairs are counted from its first positions), the per-branch pairs
(what today's per-branch path computes), and the points ``create_block_mask``
would evaluate (heads x n x n: the mask depends on the head).

    PYTHONPATH=. python tools/bench_residue.py [--out tools/results/residue.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone

import torch

from attention.dilated.plan import DilatedPlan
from attention.dilated.flex import residue_block_mask
from attention.residue import residue_modulus, residue_position
from attention.dilated.residue_layout import clear_layouts, residue_layout
from patternstore import DilatedSpec, generate

SEGMENTS, RATES, HEADS, BLOCK = (2048, 4096, 8192, 16384), (1, 2, 4, 8), 16, 128


def per_branch_pairs(plan: DilatedPlan, n: int, causal: bool) -> int:
    """Pairs the per-branch path computes: per group, heads x per segment rows^2 (causal: rows (rows+1)/2)."""
    total = 0
    for g in plan.groups:
        s = min(g.segment, n)
        for start in range(0, n, s):
            length = min(s, n - start)
            rows = max(0, -(-(length - g.offset) // g.rate))
            total += (g.head_stop - g.head_start) * (rows * (rows + 1) // 2 if causal else rows * rows)
    return total


def union_pairs(layout, modulus: int) -> int:
    """Selected (M > 0) pairs, from the blocks: full blocks hold block^2; a
    partial (causal diagonal) block inside one run pair (c_q, c_k) holds the
    (m_q, m_k) with c_k + R m_k <= c_q + R m_q."""
    n, block = layout.seq_len, layout.block_size
    assert n % (block * modulus) == 0, "the exact count needs an aligned length"
    heads, nb = layout.kv_num_blocks.shape
    rows = torch.repeat_interleave(torch.arange(heads * nb), layout.kv_num_blocks.flatten().long()) % nb
    partial = ~layout.full
    if not layout.is_causal:
        assert not bool(partial.any()), "non-causal aligned blocks are all full"
        return int(layout.full.sum()) * block * block
    qpos = residue_position(rows[partial] * block, n, modulus)
    kpos = residue_position(layout.kv_indices[partial].long() * block, n, modulus)
    delta = (kpos % modulus > qpos % modulus).long()
    step = torch.arange(block)
    keys = (qpos // modulus)[:, None] + step - delta[:, None] - (kpos // modulus)[:, None] + 1
    return int(layout.full.sum()) * block * block + int(keys.clamp(0, block).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tools/results/residue.json")
    parser.add_argument("--max-log2", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared host)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plan = DilatedPlan.from_pattern(generate(DilatedSpec(SEGMENTS, RATES, HEADS)))
    modulus = residue_modulus(RATES)
    rows = []
    for log2 in range(16, args.max_log2 + 1):
        n = 1 << log2
        for causal in (False, True):
            layout_s, mask_s = [], []
            for _ in range(3):  # cold each time; the best of three on a shared host
                clear_layouts()
                start = time.perf_counter()
                layout = residue_layout(plan, n, BLOCK, causal)
                transposed = residue_layout(plan, n, BLOCK, causal, transposed=True)
                layout_s.append(time.perf_counter() - start)
                clear_layouts()
                residue_block_mask.cache_clear()
                start = time.perf_counter()
                residue_block_mask(plan, n, BLOCK, causal, True, torch.device("cpu"))
                mask_s.append(time.perf_counter() - start)
            layout_s, mask_s = min(layout_s), min(mask_s)
            active = layout.kv_indices.numel()
            full = int(layout.full.sum())
            row = {
                "seq_len": n, "causal": causal, "layout_and_transpose_ms": round(layout_s * 1e3, 1),
                "block_mask_cold_ms": round(mask_s * 1e3, 1), "active_blocks": active, "full_blocks": full,
                "partial_blocks": active - full, "active_block_pairs": active * BLOCK * BLOCK,
                "union_pairs": union_pairs(layout, modulus), "per_branch_pairs": per_branch_pairs(plan, n, causal),
                "create_block_mask_points": HEADS * n * n,
            }
            row["union_over_per_branch"] = round(row["union_pairs"] / row["per_branch_pairs"], 4)
            row["active_over_per_branch"] = round(row["active_block_pairs"] / row["per_branch_pairs"], 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "spec": {"segment_lengths": SEGMENTS, "dilation_rates": RATES, "num_heads": HEADS, "block_size": BLOCK},
        "host": platform.node(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average": os.getloadavg(),
        "note": "cold, best of three; on a shared host the times are upper bounds",
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
