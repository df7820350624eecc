"""A decode step over a static cache without a host sync, so that it can be
captured in a CUDA graph (``torch.compile(mode="reduce-overhead")``, which
transformers' ``generate`` uses with a static cache).

The padded path (``attention.hf.padding.attend_padded``) reads how many
cache rows hold tokens and where each batch row's first token is on the host
(one sync each), then slices the cache: right for eager calls, fatal inside
a CUDA-graph capture. Here one query row per batch row (``q_len == 1``)
reads everything on the device, with shapes fixed by the cache and
the pattern:

- ``p = filled - 1``, the query's position (the last: dilated attention
  gives it the same keys causal or not), and ``first``, the row's first
  real token, come from the traced mask's two rows (``attention.hf.padding``) as
  device tensors; the pattern is anchored at ``first`` (left padding), as in
  the padded path;
- each pattern's keys for the row are a fixed number of candidate positions
  computed from ``p - first`` by index arithmetic, masked where they fall
  after the query, outside the branch or block, or on padding: dilated,
  ``ceil(min(w, L) / r)`` per branch (L the cache length) (a branch contributes only where it selects the
  query row; a key two branches select appears twice, which is the
  multiplicity ``M`` of docs/design.md section 2.1); block-sparse, the row
  block's key blocks from the layout padded to the longest row;
- one gather of those keys and values (grouped-query heads by index, no
  repeat), one softmax (float32 for half types), one weighted sum. Cost: the keys the row
  attends (times the padding of the candidates), never the cache length;
- attention sinks (gpt-oss's ``s_aux``, one logit per head) join the
  softmax's denominator only, as in the modules (``attention.kernels.sinks``).

The block-sparse row table is built once per (layout, cache length, heads,
device), on the first call (the capture's warm-up run); a capture that
misses it raises instead of syncing. ``step`` returns None for a call it
does not serve (the caller takes the padded path).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from attention.caches import BoundedCache, process_cache
from attention.dilated.module import DilatedAttention
from attention.dilated.plan import branch_offsets, plan_branches
from attention.checks import default_scale
from attention.kernels.softmax_parts import accumulate_dtype
from attention.sparse.module import BlockSparseAttention

__all__ = ["DEVICE_TYPES", "serves", "step"]

# Where the compiled op takes this step. CUDA: a capture cannot sync. Not the
# CPU, where nothing is captured and the padded path's strided views beat
# the fixed candidate sets (1 thread, 8 heads of 64, dilated 2048/4096/8192
# with rates 1/2/4: 2.5 ms padded against 8.8 ms here at a 32K cache). Tests
# add "cpu" to run the dispatch on the CPU.
DEVICE_TYPES: tuple[str, ...] = ("cuda",)

_TABLES_KEPT = 16  # row tables of block-sparse layouts: (heads, blocks, longest row) int64 each
_tables: BoundedCache[tuple[Tensor, Tensor]] = process_cache(_TABLES_KEPT)


def serves(attention: nn.Module, q_len: int, attention_mask: Optional[Tensor], is_causal: bool) -> bool:
    """Whether ``step`` computes this call (types and shapes only: it runs at
    trace time too): one query row, the fixed-shape mask, a plain dilated
    module (the last row has the same keys causal or not: none follow it)
    or a causal prefix-stable block-sparse one; neither with a soft-cap."""
    if getattr(attention, "softcap", None) is not None:
        return False
    if q_len != 1 or attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[1] != 2:
        return False
    if isinstance(attention, DilatedAttention):
        return type(attention).forward is DilatedAttention.forward and not attention.ordered
    if isinstance(attention, BlockSparseAttention):
        return (is_causal or attention.layouts.unidirectional) and attention.layouts.prefix_stable
    return False


def step(attention: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
         is_causal: bool, sinks: Optional[Tensor] = None) -> Optional[Tensor]:
    """One decode row per batch row over a static cache: query ``(B, H, 1,
    d)``, key/value ``(B, H_kv, L, d / d_v)``, the fixed-shape mask ``(B, 2, 1,
    L)``, ``sinks`` ``(H,)`` or None -> ``(B, 1, H, d_v)``; None where ``serves`` says no."""
    if not serves(attention, query.shape[2], attention_mask, is_causal):
        return None
    if isinstance(attention, DilatedAttention):
        candidates = _dilated_candidates(attention.plan(query.shape[1]), query.shape[1], key.shape[2])
    else:
        candidates = _sparse_candidates(attention, query.shape[1], key.shape[2], query.device)
    real, held = attention_mask[:, 0, 0], attention_mask[:, 1, 0]         # (B, L) each
    position = held.sum(-1, keepdim=True) - 1                              # (B, 1): the query's position
    first = torch.where(real.any(-1, keepdim=True), real.to(torch.uint8).argmax(-1, keepdim=True), position)
    relative, ok = candidates(position - first)                            # (B, H, K) each
    scale = default_scale(query.transpose(1, 2), attention.softmax_scale)
    return _attend(query, key, value, real, relative + first[..., None], ok, scale, sinks)


def _dilated_candidates(plan, heads: int, cache_len: int):
    branches = plan_branches(plan)

    def candidates(row: Tensor) -> tuple[Tensor, Tensor]:
        """Positions relative to the row's first token ``(B, H, K)`` and which count."""
        head = torch.arange(heads, device=row.device)
        parts, oks = [], []
        for w, r, groups in branches:
            offset = branch_offsets(groups, head)                          # (H,): -1 where it skips the branch
            j = torch.arange(-(-min(w, cache_len) // r), device=row.device)  # (J,): no segment outgrows the cache
            segment = row // w * w                                         # (B, 1): the row's segment start
            inside = offset[:, None] + r * j                               # (H, J) offsets in the segment
            parts.append(segment[..., None] + inside)                      # (B, H, J)
            selects_row = (row - segment) % r == offset                    # (B, H): the branch has the row
            # (an offset past the segment's end lies after the row, which is inside it: the last term)
            oks.append((offset >= 0)[:, None] & selects_row[..., None] & (parts[-1] <= row[..., None]))
        return torch.cat(parts, -1), torch.cat(oks, -1)
    return candidates


def _sparse_candidates(attention: BlockSparseAttention, heads: int, cache_len: int, device: torch.device):
    counts, table = _row_table(attention, heads, cache_len, device)       # (H_l, nb), (H_l, nb, C)
    bs = attention.block_size

    def candidates(row: Tensor) -> tuple[Tensor, Tensor]:
        layout_head = torch.arange(heads, device=row.device) % counts.shape[0]   # (H,): one layout head or H
        block = row // bs                                                  # (B, 1)
        blocks = table[layout_head[None, :], block]                        # (B, H, C)
        count = counts[layout_head[None, :], block]                        # (B, H)
        slot = torch.arange(table.shape[-1], device=row.device)
        within = torch.arange(bs, device=row.device)
        relative = (blocks[..., None] * bs + within).flatten(-2)           # (B, H, C * bs)
        ok = (slot < count[..., None])[..., None].expand(-1, -1, -1, bs).flatten(-2) & (relative <= row[..., None])
        return relative, ok
    return candidates


def _row_table(attention: BlockSparseAttention, heads: int, cache_len: int, device: torch.device):
    """(counts ``(H_l, nb)``, key blocks ``(H_l, nb, longest row)``, padded with
    block 0) of the causal layout serving ``cache_len``; built once (one sync)."""
    key = (attention.layouts, cache_len, heads, device)
    hit = _tables.get(key)
    if hit is not None:
        return hit
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("a CUDA-graph capture reached a block-sparse decode step whose row table was not "
                           "built: run the step once outside the capture (torch.compile's warm-up does)")
    kv_num_blocks, kv_indices = attention.layouts.layout(cache_len, heads, device, True)
    counts = kv_num_blocks.long()
    longest = max(int(counts.max()), 1)
    offsets = counts.flatten().cumsum(0) - counts.flatten()
    slot = torch.arange(longest, device=device)
    entry = (offsets[:, None] + slot).clamp(max=max(kv_indices.numel() - 1, 0))
    table = torch.where(slot < counts.flatten()[:, None], kv_indices.long()[entry], 0) if kv_indices.numel() else \
        torch.zeros_like(entry)
    return _tables.put(key, (counts, table.view(*counts.shape, longest)))


def _attend(query: Tensor, key: Tensor, value: Tensor, real: Tensor, position: Tensor, ok: Tensor,
            scale: float, sinks: Optional[Tensor]) -> Tensor:
    """Softmax of one row per (batch, head) over its candidate keys at
    ``position`` ``(B, H, K)`` where ``ok``, and the head's sink: ``(B, 1, H, d_v)``."""
    batch, heads, _, d = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    position = position.clamp(0, length - 1)
    ok = ok & real.gather(1, position.flatten(1)).view_as(position)      # padding after the first token
    kv_head = torch.arange(heads, device=query.device) // (heads // kv_heads)
    rows = (torch.arange(batch, device=query.device)[:, None, None] * kv_heads + kv_head[:, None]) * length
    flat = (rows + position).flatten()
    keys = key.reshape(-1, d).index_select(0, flat).view(*position.shape, d)                  # (B, H, K, d)
    values = value.reshape(-1, value.shape[-1]).index_select(0, flat).view(*position.shape, -1)
    dtype = accumulate_dtype(query.dtype)
    scores = torch.einsum("bhd,bhkd->bhk", query[:, :, 0].to(dtype), keys.to(dtype)) * scale
    scores = scores.masked_fill(~ok, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    sink = None if sinks is None else sinks.to(dtype)[:, None]               # (H, 1): a key with a zero value
    if sink is not None:
        top = torch.maximum(top, sink)
    top = top.clamp_min(torch.finfo(dtype).min)                            # a row with no key: 0 out
    weights = (scores - top).exp()
    total = weights.sum(-1, keepdim=True)
    if sink is not None:
        total = total + (sink - top).exp()
    total = total.clamp_min(torch.finfo(dtype).tiny)
    out = torch.einsum("bhk,bhkd->bhd", weights, values.to(dtype)) / total
    return out.to(value.dtype)[:, None]
