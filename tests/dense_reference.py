"""Naive dense dilated attention, written from docs/design.md section 2.1 alone.

Key k counts for query p as many times as there are branches selecting the
pair, so the result is ``softmax(S + log m) @ v`` with multiplicity ``m`` and
``log 0 = -inf``; a query with no key at all outputs 0. Everything here is
O(n^2) and float64: for tests only. Head groups and offsets are derived again
from the rules in docs/design.md, not taken from the generator.
"""

from __future__ import annotations

import math

import torch


def head_offsets(num_heads: int, segment_lengths, dilation_rates, scheme: str) -> list[list[int | None]]:
    """offsets[i][j]: offset of head j in branch i, None when branch i skips head j."""
    k = len(segment_lengths)
    if scheme == "longnet":
        offsets = []
        for r in dilation_rates:
            g = -(-num_heads // r)
            offsets.append([j // g for j in range(num_heads)])
        return offsets
    sizes = [num_heads // k + (1 if i < num_heads % k else 0) for i in range(k)]
    owner = [i for i, size in enumerate(sizes) for _ in range(size)]
    return [[i % dilation_rates[i] if owner[j] == i else None for j in range(num_heads)] for i in range(k)]


def multiplicity(seq_len, num_heads, segment_lengths, dilation_rates, scheme, is_causal) -> torch.Tensor:
    """m[j, p, q]: how many branches let query p attend key q on head j."""
    pos = torch.arange(seq_len)
    m = torch.zeros(num_heads, seq_len, seq_len, dtype=torch.float64)
    offsets = head_offsets(num_heads, segment_lengths, dilation_rates, scheme)
    for (w, r), branch_offsets in zip(zip(segment_lengths, dilation_rates), offsets):
        s = min(w, seq_len)
        same_segment = (pos // s)[:, None] == (pos // s)[None, :]
        if is_causal:
            same_segment &= pos[None, :] <= pos[:, None]
        for j, o in enumerate(branch_offsets):
            if o is None:
                continue
            inside = pos % s
            selected = (inside >= o) & ((inside - o) % r == 0)
            m[j] += (selected[:, None] & selected[None, :] & same_segment).double()
    return m


def dense_dilated_attention(
    q, k, v, segment_lengths, dilation_rates, *, scheme="longnet", is_causal=False, key_padding_mask=None, scale=None
) -> torch.Tensor:
    """(b, n, h, d) float64 in and out; differentiable (no NaN for dead rows)."""
    b, n, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    m = multiplicity(n, h, segment_lengths, dilation_rates, scheme, is_causal)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale + m.log()
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], -math.inf)
    live = (scores > -math.inf).any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~live, 0.0), dim=-1) * live
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)
