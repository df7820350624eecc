"""The one dense attention reference of the tests and tools, in float64.

``dense_attention`` is softmax attention written from its definition:
``softmax(S + log W) @ V`` with ``log 0 = -inf``, where ``W`` is a bool
"may attend" mask or an integer multiplicity (how many branches select a pair,
docs/design.md section 2.1). Masked keys are *removed*, never added as a bias,
so a NaN or Inf in a masked key changes nothing; a row with no key outputs 0.
``softcap`` c replaces each scaled score s by ``c * tanh(s / c)`` before the
weights and masks (Gemma 2); ``sinks`` (one logit per head, gpt-oss) are a
column appended to each row's scores for the softmax and dropped after it.
Everything here is O(n^2): for tests and tools only.

``multiplicity`` derives the dilated pattern from the rules in docs/design.md
alone (head groups and offsets again, not taken from the generator), and
``block_pairs`` the block-sparse one from a layout's CSR arrays.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


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


def dense_attention(
    q: Tensor, k: Tensor, v: Tensor, *, weight: Optional[Tensor] = None, is_causal: bool = False,
    key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None, return_lse: bool = False,
    softcap: Optional[float] = None, sinks: Optional[Tensor] = None, window: Optional[int] = None,
):
    """q ``(b, m, h, d)``, k ``(b, n, h_kv, d)``, v ``(b, n, h_kv, d_v)`` -> ``(b, m, h, d_v)`` float64.

    Query head j reads key head ``j // (h / h_kv)``. The m queries are the
    last m of the n positions (decode rows), so ``is_causal`` is bottom-right.
    ``weight``: bool or counts, ``(h, n, n)`` or ``(b, h, n, n)`` over all n
    positions. ``key_padding_mask``: ``(b, n)``, True = padded. With
    ``return_lse`` also the ``(b, h, m)`` log-sum-exp, ``-inf`` for empty rows
    (over the keys and the sink). ``window`` w: key t counts for the query
    at position p only when ``p - w < t`` (transformers' sliding window).
    """
    b, m, h, _ = q.shape
    n, group = k.shape[1], h // k.shape[2]
    q, k, v = q.double(), k.double().repeat_interleave(group, 2), v.double().repeat_interleave(group, 2)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    allowed = torch.ones(1, 1, m, n, dtype=torch.bool)
    log_w = torch.zeros(1, 1, m, n, dtype=torch.float64)
    if weight is not None:
        w = weight[..., n - m:, :].double()
        w = w if w.dim() == 4 else w[None]
        allowed, log_w = allowed & (w > 0), torch.where(w > 0, w, 1.0).log()
    if is_causal:
        allowed = allowed & torch.ones(m, n, dtype=torch.bool).tril(n - m)
    if window is not None:
        position = torch.arange(n)
        allowed = allowed & (position[None, :] > position[n - m:, None] - window)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    allowed = allowed.expand(b, h, m, n)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = (scores + log_w).masked_fill(~allowed, -math.inf)
    if sinks is not None:
        column = sinks.double().view(1, h, 1, 1).expand(b, h, m, 1)
        scores = torch.cat([scores, column], -1)
        allowed = torch.cat([allowed, torch.ones(b, h, m, 1, dtype=torch.bool)], -1)
    live = allowed.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~live, 0.0), dim=-1) * live
    if sinks is not None:
        scores, allowed, probs = scores[..., :n], allowed[..., :n], probs[..., :n]
    if torch.isfinite(v).all():
        out = torch.einsum("bhij,bjhd->bihd", probs, v)
    else:  # a non-finite value counts only where its key is allowed: 0 * NaN must not leak in
        picked = torch.where(allowed[..., None], v.permute(0, 2, 1, 3)[:, :, None], 0.0)
        out = (probs[..., None] * picked).sum(-2).transpose(1, 2)
    if not return_lse:
        return out
    if sinks is not None:
        scores = torch.cat([scores, column], -1)
    lse = torch.logsumexp(scores, dim=-1).masked_fill(~live.squeeze(-1), -math.inf)
    return out, lse


def layout_blocks(kv_num_blocks: Tensor, kv_indices: Tensor) -> Tensor:
    """bool ``(layout_heads, nb, nb)``: the active blocks of a CSR layout,
    read one row at a time (a loop, no vector trick)."""
    layout_heads, nb = kv_num_blocks.shape
    blocks = torch.zeros(layout_heads, nb, nb, dtype=torch.bool)
    start = 0
    for hh in range(layout_heads):
        for i in range(nb):
            count = int(kv_num_blocks[hh, i])
            blocks[hh, i, kv_indices[start: start + count].long()] = True
            start += count
    return blocks


def block_pairs(kv_num_blocks: Tensor, kv_indices: Tensor, n: int, block_size: int) -> Tensor:
    """bool ``(layout_heads, n, n)``: key t is in an active block of query i's
    block row (no causal rule)."""
    blocks = layout_blocks(kv_num_blocks, kv_indices)
    position = torch.arange(n)
    return blocks[:, position[:, None] // block_size, position[None, :] // block_size]


def dense_dilated_attention(
    q, k, v, segment_lengths, dilation_rates, *, scheme="longnet", is_causal=False, key_padding_mask=None, scale=None
) -> Tensor:
    """(b, n, h, d) in, (b, n, h, d) float64 out; differentiable (no NaN for dead rows)."""
    m = multiplicity(q.shape[1], q.shape[2], segment_lengths, dilation_rates, scheme, is_causal)
    return dense_attention(q, k, v, weight=m, key_padding_mask=key_padding_mask, scale=scale)
