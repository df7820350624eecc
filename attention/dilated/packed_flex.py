"""Dilated attention over packed documents as ONE ``flex_attention`` call.

The fused path (``attention.dilated.flex``) for a packed batch
(``cu_seqlens``): each document attended exactly as if alone (docs/design.md
sections 2.1 and 2.3).

Layout of the call. Each non-empty document of length ``L`` takes
``ceil(L / block)`` whole blocks of a scratch buffer, one document after the
other; its tokens sit there in ITS OWN residue order (``attention.residue``
at ``n = L``), the rest of its last block is fill. The BlockMask is the
block-diagonal composition (``attention.block_mask.block_diagonal``) of each
document's residue layout (that of ``residue_layout(plan, L, block,
causal)``): built in O(active blocks) from the per-length layouts, never
by evaluating a mask over the packed length (no ``create_block_mask``).
Blocks never cross documents, so no key of another document is ever
computed. A document's last block row and column (where it has fill) are
partial, so the mask_mod drops the fill.

The mods recount the multiplicity per document: they capture three
``(buffer,)`` tensors, each position's document length, its residue-order
index inside the document, and whether it is a key that attends (not fill,
not padded); the in-document position is ``residue_position(index, L, R)``
and the segment is ``min(w, L)``, all tensor arithmetic. Fill and padded
keys' k and v rows are zero, so a NaN or Inf in them reaches no output.

Cost per batch: the layouts of the DISTINCT document lengths, built
together in one vectorized numpy pass (``residue_layouts``, not cached: a
batch of 256 distinct lengths costs one pass over their 256 small layouts;
figures in docs/bench.md, "Packed documents"), one vectorized composition,
one BlockMask, one scatter of q, k, v into the buffer, one flex call, one
gather back. The host reads ``cu_seqlens`` once (one sync for a GPU tensor).

Limits: eager only (``run_packed`` gives compiled and exported calls the
fast path, whose ops take ``cu_seqlens`` as a tensor input); on the CPU
forward only, float32 or half types (``serves_packed``), and the compiled
flex call is static there: one compile per distinct buffer length.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from attention.block_mask import block_diagonal, build_block_mask
from attention.dilated.flex import FUSED_BLOCK
from attention.dilated.plan import Branches, DilatedPlan, branch_offsets, plan_branches
from attention.dilated.residue_layout import residue_layouts
from attention.kernels.flex import compiled_flex, flex_tiles
from attention.residue import residue_index, residue_modulus, residue_position

__all__ = ["PackedLayout", "packed_layout", "packed_block_mask", "document_multiplicity", "document_mods",
           "packed_flex_attention", "serves_packed"]


class PackedLayout(NamedTuple):
    """The documents of a packed batch in the block-aligned buffer."""

    length: int             # the buffer's length (whole blocks)
    block_size: int
    kv_num_blocks: Tensor   # int32 [H, length / block_size]: the block-diagonal layout
    kv_indices: Tensor      # int32 [nnz]
    full: Tensor            # bool [nnz]: blocks whose mask_mod flex may skip
    dest: Tensor            # int64 [total]: the buffer position of each token
    doc_length: Tensor      # int64 [length]: the length of the document each buffer position belongs to
    doc_index: Tensor       # int64 [length]: the position's residue-order index inside its document


def packed_layout(plan: DilatedPlan, bounds: Sequence[int], block_size: int, is_causal: bool) -> PackedLayout:
    """The buffer layout of the documents ``bounds`` (``[0, end_1, ...,
    total]``, checked) for ``plan`` (module docstring), on the CPU."""
    cu = torch.tensor(list(bounds), dtype=torch.int64)
    lengths = cu[1:] - cu[:-1]
    live = lengths[lengths > 0]
    modulus = residue_modulus(g.rate for g in plan.groups)
    documents = live.numpy()
    distinct = np.unique(documents)
    counts, indices, full, first_row = residue_layouts(plan, distinct.tolist(), block_size, is_causal)
    doc_blocks = -(-documents // block_size)
    counts, indices, full = block_diagonal(counts, indices, first_row[np.searchsorted(distinct, documents)],
                                           doc_blocks, full)
    filled = np.zeros(int(doc_blocks.sum()), dtype=bool)  # a document's last block when it holds fill
    filled[np.cumsum(doc_blocks) - 1] = documents % block_size != 0
    rows = np.repeat(np.arange(counts.numel()), counts.numpy().ravel()) % filled.size
    full &= torch.from_numpy(~(filled[rows] | filled[indices.numpy()]))  # the mask_mod must run there
    span = -(-live // block_size) * block_size                    # each document's place in the buffer
    start = torch.cumsum(span, 0) - span
    doc = torch.repeat_interleave(torch.arange(live.numel()), live)
    position = torch.arange(int(cu[-1])) - torch.repeat_interleave(cu[:-1][lengths > 0], live)
    dest = start[doc] + residue_index(position, live[doc], modulus)
    owner = torch.repeat_interleave(torch.arange(live.numel()), span)
    return PackedLayout(int(span.sum()), block_size, counts, indices, full, dest, live[owner],
                        torch.arange(int(span.sum())) - start[owner])


def packed_block_mask(layout: PackedLayout, device: torch.device, mask_mod=None) -> BlockMask:
    """The flex BlockMask of ``layout`` with ``mask_mod`` (None: flex's
    default, every pair of an active block), the partial blocks apart from the full ones; on the CPU each row
    array one slot per block (torch 2.13's CPU lowering needs it,
    ``attention.block_mask``)."""
    nb = layout.length // layout.block_size
    return build_block_mask(layout.kv_num_blocks, layout.kv_indices, seq_len=layout.length,
                            block_size=layout.block_size, partial=~layout.full,
                            width=nb if torch.device(device).type == "cpu" else None, mask_mod=mask_mod,
                            device=device)


def document_multiplicity(branches: Branches, length: Tensor, h: Tensor, pq: Tensor, pk: Tensor) -> Tensor:
    """M of (query position ``pq``, key position ``pk``) on head ``h`` in a
    document of ``length`` (``attention.dilated.flex``'s count, with the
    segment ``min(w, length)`` a tensor)."""
    count = None
    for w, r, heads in branches:
        s = length.clamp(max=w)
        offset = branch_offsets(heads, h)
        rq, rk = pq % s % r, pk % s % r
        hit = (rq == offset) & (rk == rq) & (pq // s == pk // s)
        count = hit.to(torch.int32) if count is None else count + hit.to(torch.int32)
    return count


def document_mods(branches: Branches, modulus: int, is_causal: bool, doc_length: Tensor, doc_index: Tensor,
          query_valid: Tensor, key_valid: Tensor):
    """(score_mod, mask_mod) over the buffer (module docstring)."""

    def positions(idx: Tensor) -> tuple[Tensor, Tensor]:
        length = doc_length[idx]
        return residue_position(doc_index[idx], length, modulus), length

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        (pq, length), (pk, _) = positions(q_idx), positions(kv_idx)
        return score + document_multiplicity(branches, length, h, pq, pk).to(score.dtype).log()

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        (pq, length), (pk, _) = positions(q_idx), positions(kv_idx)
        keep = (document_multiplicity(branches, length, h, pq, pk) > 0) & query_valid[q_idx] & key_valid[kv_idx]
        if is_causal:
            keep = keep & (pk <= pq)
        return keep

    return score_mod, mask_mod


def serves_packed(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether the packed fused path takes this call: eager, and on the CPU
    without gradients in float32 or a half type (CPU flex compiles no
    backward and no float64); else the caller runs the fast path."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    if q.device.type != "cpu":
        return True
    grads = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    return not grads and q.dtype in (torch.float32, torch.float16, torch.bfloat16)


def packed_flex_attention(q: Tensor, k: Tensor, v: Tensor, plan: DilatedPlan, bounds: Sequence[int],
                          is_causal: bool, scale: float, key_padding_mask: Optional[Tensor],
                          block_size: int = FUSED_BLOCK) -> Tensor:
    """q ``(1, total, H, d)``, k ``(1, total, H_kv, d)``, v ``(1, total,
    H_kv, d_v)``, ``key_padding_mask`` ``(1, total)`` bool or None, checked
    (``serves_packed``), documents ``bounds`` -> ``(1, total, H, d_v)``."""
    layout = packed_layout(plan, bounds, block_size, is_causal)
    device = q.device
    dest = layout.dest.to(device)
    if q.device.type == "cpu":  # no gradients here (serves_packed): CPU flex refuses inputs that require grad
        q, k, v = q.detach(), k.detach(), v.detach()
    query_valid = torch.zeros(layout.length, dtype=torch.bool, device=device)
    query_valid[dest] = True
    key_valid = query_valid.clone()
    if key_padding_mask is not None:
        key_valid[dest] = ~key_padding_mask[0].to(device)
        rows = key_padding_mask[0, :, None, None].to(device)
        k, v = k.masked_fill(rows, 0.0), v.masked_fill(rows, 0.0)

    def scatter(x: Tensor) -> Tensor:
        buffer = x.new_zeros((1, layout.length, *x.shape[2:]))
        buffer[0, dest] = x[0]
        return buffer.transpose(1, 2)

    score_mod, mask_mod = document_mods(plan_branches(plan), residue_modulus(g.rate for g in plan.groups), is_causal,
                                layout.doc_length.to(device), layout.doc_index.to(device), query_valid, key_valid)
    mask = packed_block_mask(layout, device, mask_mod)
    out = compiled_flex(device.type)(scatter(q), scatter(k), scatter(v), score_mod=score_mod, block_mask=mask,
                                     scale=scale, enable_gqa=q.shape[2] != k.shape[2],
                                     kernel_options=flex_tiles(block_size) or None)
    return out.transpose(1, 2)[:, dest]

