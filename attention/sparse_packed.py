"""Packed documents for block-sparse attention: each document of a packed
batch (``cu_seqlens``, attention/packed.py) attended with its own block
layout, in ONE kernel call over the whole batch.

Semantics (docs/design.md section 2.4): document ``i = [cu[i], cu[i+1])``
gets exactly what ``BlockSparseAttention`` gives it as a sequence of its
own: its layout starts at its first token, no key of another document
counts, causal within it, ``key_padding_mask (1, total)`` still applies.
Empty documents hold nothing. A document too short for the layout's spec
(a global block past its block count, more random blocks than it has) is
refused with the ValueError its own call raises, naming the document,
before any work. With ``block_sparse_attention(..., cu_seqlens=)`` the
given layout (over ``ceil(total / block_size)`` blocks) is every
document's CORNER layout: a document of ``nb_i`` blocks gets the given
layout's rows ``< nb_i`` restricted to key blocks ``< nb_i``.

Where the layouts come from (store traffic per batch, bounded):
- corner kinds (``SparseSpec.is_prefix_stable``: the layout of ``nb``
  blocks is the top-left ``nb x nb`` corner of the layout of any longer
  length, bidirectional as well as causal; tests/test_sparse_packed.py
  checks it for every kind): dense, bslongformer, local, dilated_blocks,
  bigbird and variable without random blocks, and every unidirectional
  layout. ONE layout per batch, that of the longest document's length
  class (``LayoutSource.capacity``: ``max_seq_len`` or the next power of
  two of the block count), so a batch reads one store entry of at most
  twice the longest document's rows, and the store holds log2(max length)
  entries;
- the others (bigbird and variable with random blocks drawn from the whole
  row, fixed, whose partial last window moves its global blocks; all
  bidirectional): one layout per distinct document block count, fetched at
  ``nb * block_size`` (a layout depends on its block count only). Distinct
  counts ``c_1 < ... < c_m`` each belong to a document, so their rows sum
  to at most the batch's block count: the store traffic of a batch is at
  most one layout of the packed length's rows, m <= sqrt(2 * blocks).
Both kept by ``LayoutSource`` (a dict lookup after the first batch).

Execution: each document is copied to a block-aligned offset of a scratch
buffer (padded to whole blocks: less than one block of fill per document);
the block-diagonal CSR of the documents' layouts, index-shifted to their
offsets, is composed in O(active blocks) by vectorized torch ops on the
host (``compose_layout``; Python loops run over distinct block counts
only); the tiles (attention/sparse_tiles.py) run once over the buffer with
a key padding mask for the fill (or'ed with the caller's), and the rows
are gathered back. On CUDA, eager and without dropout, the composed CSR is
the BlockMask of compiled FlexAttention (``flex.block_mask_from_csr``,
only the documents' last key blocks partial): never ``create_block_mask``
over the packed length.

Compile and host reads: the tile path is the operator pair
``attention::sparse_packed_forward`` / ``_backward`` (opaque to dynamo;
``cu_seqlens`` is a tensor input, so a new split at the same total does not
recompile; fake outputs have the inputs' shapes, so ``dynamic=True`` and
``torch.export`` take any length). The operators read ``cu_seqlens`` on the
host inside themselves: no sync for a CPU ``cu_seqlens``, one per call (and
one more in the backward) for a GPU one. Compiled graphs on CUDA take this
tile path too (the flex path is eager). The backward recomposes the plan
(kept: the last ``MAX_PLANS`` batches).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from patternstore.csr import check_layout, drop_future_blocks

from .flex import block_mask_from_csr, compiled_flex_attention, flex_tiles
from .kernels import accumulate_dtype
from .packed import document_bounds
from .softmax_parts import EMPTY_LSE
from .sparse_layouts import LayoutSource, source
from .sparse_tiles import Groups, row_groups, sparse_backward, sparse_forward

__all__ = ["PackedPlan", "compose_layout", "packed_plan", "packed_sparse_attention", "packed_flex_attention",
           "MAX_PLANS"]


class PackedPlan(NamedTuple):
    """A packed batch laid out in the aligned scratch buffer."""

    dest: Optional[Tensor]       # int64 [total]: buffer position of each token; None: identity (no fill)
    length: int                  # the buffer's length (whole blocks)
    kv_num_blocks: Tensor        # int32 [H, length / block_size]: the composed block-diagonal layout
    kv_indices: Tensor           # int32 [nnz]
    groups: Groups               # the tiles' row groups of that layout
    padding: Optional[Tensor]    # bool [1, length]: fill (and the caller's padding); None: nothing masked
    fill_blocks: Tensor          # bool [length / block_size]: key blocks that hold fill


def compose_layout(kv_num_blocks: Tensor, kv_indices: Tensor, first_row: Tensor,
                   doc_blocks: Tensor) -> tuple[Tensor, Tensor]:
    """The block-diagonal layout of documents with ``doc_blocks[d]`` blocks
    each (int64 [D], zeros allowed), placed one after the other: document
    ``d``'s local row ``i`` is the source layout's row ``first_row[d] + i``
    (``kv_num_blocks [H, R]``, ``kv_indices``: one or more layouts stacked
    along the rows) cut to its key blocks ``< doc_blocks[d]`` (the corner),
    shifted by the document's first block. O(H * blocks + nnz) vectorized
    ops: a row's cut is one ``searchsorted`` (rows are sorted ascending)."""
    heads, rows = kv_num_blocks.shape
    device = kv_indices.device
    starts = torch.cumsum(doc_blocks, 0) - doc_blocks                      # each document's first block
    total = int(doc_blocks.sum())
    doc = torch.repeat_interleave(torch.arange(doc_blocks.numel(), device=device), doc_blocks)   # [NB]
    local = torch.arange(total, device=device) - starts[doc]
    source_row = (torch.arange(heads, device=device)[:, None] * rows + (first_row[doc] + local)).flatten()
    limit = doc_blocks[doc].repeat(heads)                                  # [H * NB]
    counts = kv_num_blocks.flatten().long()
    offsets = torch.cumsum(counts, 0) - counts
    entry_row = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts)
    keys = entry_row * (rows + 1) + kv_indices.long()                      # ascending: rows, then columns
    ends = torch.searchsorted(keys, source_row * (rows + 1) + limit)
    begins = offsets[source_row]
    new_counts = ends - begins
    new_offsets = torch.cumsum(new_counts, 0) - new_counts
    nnz = int(new_counts.sum())
    out_row = torch.repeat_interleave(torch.arange(new_counts.numel(), device=device), new_counts)
    within = torch.arange(nnz, device=device) - new_offsets[out_row]
    shift = starts[doc].repeat(heads)
    values = kv_indices[begins[out_row] + within].long() + shift[out_row]
    return new_counts.view(heads, total).to(torch.int32), values.to(torch.int32)


def _module_layouts(layouts: LayoutSource, blocks: list[int], heads: int, causal: bool,
                    lengths: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """``(kv_num_blocks, kv_indices, first_row [D])`` of the module's layouts
    for documents of ``blocks`` (module docstring: one corner layout, or one
    per distinct block count), on the CPU."""
    cpu, bs = torch.device("cpu"), layouts.block_size
    live = [b for b in blocks if b]  # never empty: a packed batch holds at least one token
    if not (causal and layouts.prefix_stable):
        # The document's own call would fetch (and validate) the spec at its length: validity only grows
        # with the block count, so the shortest document answers for all.
        shortest = min(range(len(blocks)), key=lambda d: blocks[d] if blocks[d] else 1 << 62)
        try:
            layouts.spec(blocks[shortest] * bs, heads)
        except ValueError as error:
            raise ValueError(f"cu_seqlens: document {shortest} (length {lengths[shortest]}) is too short for "
                             f"the layout of {layouts.kind!r}: {error}") from None
    if layouts.prefix_stable:
        counts, indices = layouts.layout(layouts.capacity(max(live) * bs), heads, cpu, causal)
        return counts, indices, torch.zeros(len(blocks), dtype=torch.int64)
    parts, first = [], {}
    row = 0
    for b in sorted(set(live)):
        counts, indices = layouts.layout(b * bs, heads, cpu, causal)
        parts.append((counts, indices))
        first[b] = row
        row += b
    counts = torch.cat([c for c, _ in parts], 1)
    # Head-major over the stack: head h's rows of every layout, then head h + 1's.
    per_head = [torch.split(i, c.sum(1).tolist()) for c, i in parts]
    indices = torch.cat([pieces[h] for h in range(counts.shape[0]) for pieces in per_head])
    return counts, indices, torch.tensor([first.get(b, 0) for b in blocks], dtype=torch.int64)


_PLANS: OrderedDict[tuple, PackedPlan] = OrderedDict()
MAX_PLANS = 4  # forward and backward of a batch share one; a few batches in flight


def packed_plan(cu_seqlens: Tensor, total: int, heads: int, device: torch.device, causal: bool, block_size: int,
                description: str, layout: Optional[tuple[Tensor, Tensor]],
                key_padding_mask: Optional[Tensor]) -> PackedPlan:
    """The plan of a packed batch: the module's layouts (``description``) or
    the corners of ``layout`` (the functional API). Reads ``cu_seqlens`` on
    the host. Kept per (description, split, heads, device, causal) unless a
    key padding mask or a given layout makes it the caller's."""
    bounds = document_bounds(cu_seqlens, total)
    key = (description, tuple(bounds), heads, device, causal)
    cacheable = layout is None and key_padding_mask is None
    hit = _PLANS.get(key) if cacheable else None
    if hit is not None:
        _PLANS.move_to_end(key)
        return hit
    lengths = [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]
    blocks = [-(-n // block_size) for n in lengths]
    if layout is None:
        counts, indices, first_row = _module_layouts(source(description), blocks, heads, causal, lengths)
    else:
        counts, indices = (t.cpu() for t in layout)
        check_layout(counts, indices, -(-total // block_size))
        if causal:
            counts, indices = drop_future_blocks(counts, indices)
        first_row = torch.zeros(len(blocks), dtype=torch.int64)
    doc_blocks = torch.tensor(blocks, dtype=torch.int64)
    counts, indices = compose_layout(counts, indices, first_row, doc_blocks)
    nb = counts.shape[1]
    length = nb * block_size
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    shift = (torch.cumsum(doc_blocks, 0) - doc_blocks) * block_size - torch.tensor(bounds[:-1], dtype=torch.int64)
    dest = torch.arange(total) + torch.repeat_interleave(shift, lengths_t)
    fill = torch.ones(length, dtype=torch.bool)
    fill[dest] = False
    fill_blocks = fill.view(nb, block_size).any(1)
    padding = fill if key_padding_mask is None else fill.index_put((dest,), key_padding_mask[0].cpu())
    with torch.no_grad():
        groups = row_groups(counts, indices, False, 0)
    identity = length == total
    plan = PackedPlan(
        None if identity else dest.to(device), length, counts.to(device), indices.to(device),
        [(r.to(device), c.to(device)) for r, c in groups],
        padding[None].to(device) if bool(padding.any()) else None, fill_blocks.to(device),
    )
    if cacheable:
        _PLANS[key] = plan
        while len(_PLANS) > MAX_PLANS:
            _PLANS.popitem(last=False)
    return plan


def _to_buffer(x: Tensor, plan: PackedPlan, fill: float = 0.0) -> Tensor:
    """``x (1, total, ...)`` placed at the plan's buffer positions, ``fill`` elsewhere."""
    if plan.dest is None:
        return x
    buffer = x.new_full((x.shape[0], plan.length, *x.shape[2:]), fill)
    return buffer.index_copy_(1, plan.dest, x)


def _from_buffer(x: Tensor, plan: PackedPlan, dim: int = 1) -> Tensor:
    return x if plan.dest is None else x.index_select(dim, plan.dest)


# ------------------------------------------------------------ operators
def _given(kv_num_blocks: Optional[Tensor], kv_indices: Optional[Tensor]) -> Optional[tuple[Tensor, Tensor]]:
    return None if kv_num_blocks is None else (kv_num_blocks, kv_indices)


@torch.library.custom_op("attention::sparse_packed_forward", mutates_args=())
def forward_op(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, kv_num_blocks: Optional[Tensor],
    kv_indices: Optional[Tensor], key_padding_mask: Optional[Tensor], dropout_seed: Optional[Tensor],
    description: str, block_size: int, causal: bool, scale: float, dropout_p: float,
) -> tuple[Tensor, Tensor]:
    """``(out (1, total, h, v_dim), lse (1, h, total))`` of the packed batch:
    the module's layouts (``description``) or the corners of the given one
    (``description == ""``)."""
    plan = packed_plan(cu_seqlens, q.shape[1], q.shape[2], q.device, causal, block_size, description,
                       _given(kv_num_blocks, kv_indices), key_padding_mask)
    out, lse = sparse_forward(_to_buffer(q, plan), _to_buffer(k, plan), _to_buffer(v, plan), plan.kv_num_blocks,
                              plan.kv_indices, plan.groups, plan.padding, dropout_seed, block_size, causal, scale,
                              dropout_p, True)
    return _from_buffer(out, plan).contiguous(), _from_buffer(lse, plan, 2).contiguous()


@forward_op.register_fake
def _(q, k, v, cu_seqlens, kv_num_blocks, kv_indices, key_padding_mask, dropout_seed, description, block_size,
      causal, scale, dropout_p):
    b, n, h, _ = q.shape
    return q.new_empty(b, n, h, v.shape[-1]), q.new_empty(b, h, n, dtype=accumulate_dtype(q.dtype))


@torch.library.custom_op("attention::sparse_packed_backward", mutates_args=())
def backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor,
    kv_num_blocks: Optional[Tensor], kv_indices: Optional[Tensor], key_padding_mask: Optional[Tensor],
    dropout_seed: Optional[Tensor], description: str, block_size: int, causal: bool, scale: float,
    dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``attention::sparse_packed_forward``'s ``out`` with
    respect to ``q, k, v``, from the saved ``out`` and ``lse``. Fill rows get
    zero ``grad_out`` and lse ``-EMPTY_LSE`` (their probabilities are 0): they
    add nothing to any gradient."""
    plan = packed_plan(cu_seqlens, q.shape[1], q.shape[2], q.device, causal, block_size, description,
                       _given(kv_num_blocks, kv_indices), key_padding_mask)
    dq, dk, dv = sparse_backward(
        _to_buffer(grad_out, plan), _to_buffer(q, plan), _to_buffer(k, plan), _to_buffer(v, plan),
        _to_buffer(out, plan), _to_buffer(lse.transpose(1, 2), plan, -EMPTY_LSE).transpose(1, 2),
        plan.kv_num_blocks, plan.kv_indices, plan.groups, plan.padding, dropout_seed, block_size, causal, scale,
        dropout_p, True)
    return tuple(_from_buffer(g, plan).contiguous() for g in (dq, dk, dv))


@backward_op.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, kv_num_blocks, kv_indices, key_padding_mask, dropout_seed,
      description, block_size, causal, scale, dropout_p):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, kv_num_blocks, kv_indices, key_padding_mask, dropout_seed, *options = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens, kv_num_blocks, kv_indices, key_padding_mask,
                          dropout_seed)
    ctx.options = options


def _backward(ctx, grad_out: Tensor, grad_lse: Optional[Tensor]):
    q, k, v, out, lse, cu_seqlens, kv_num_blocks, kv_indices, key_padding_mask, dropout_seed = ctx.saved_tensors
    dq, dk, dv = backward_op(grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, kv_num_blocks, kv_indices,
                             key_padding_mask, dropout_seed, *ctx.options)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


def _no_double_backward(ctx, *grads):
    raise RuntimeError("packed block-sparse attention has no double backward (a gradient of its gradients); use "
                       "the dense reference F.scaled_dot_product_attention with a boolean mask for second derivatives")


forward_op.register_autograd(_backward, setup_context=_setup)
backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def packed_sparse_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, key_padding_mask: Optional[Tensor],
                            *, description: str = "", layout: Optional[tuple[Tensor, Tensor]] = None,
                            block_size: int, causal: bool, scale: float, dropout_p: float) -> Tensor:
    """The tile path of a packed batch (inputs checked by the caller)."""
    seed = torch.randint(0, 1 << 62, (), dtype=torch.int64) if dropout_p > 0 else None
    counts, indices = layout if layout is not None else (None, None)
    out, _ = forward_op(q, k, v, cu_seqlens, counts, indices, key_padding_mask, seed, description, block_size,
                        causal, float(scale), float(dropout_p))
    return out


def packed_flex_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, key_padding_mask: Optional[Tensor],
                          *, description: str, block_size: int, causal: bool, scale: float) -> Tensor:
    """The flex path of a packed batch (eager; module docstring): the
    composed CSR as a BlockMask over the aligned buffer, whose only partial
    blocks are the causal diagonal and the documents' last (filled) key
    blocks, or every block with a caller's key padding mask."""
    plan = packed_plan(cu_seqlens, q.shape[1], q.shape[2], q.device, causal, block_size, description, None,
                       key_padding_mask)
    padded_blocks = None if key_padding_mask is not None else plan.fill_blocks
    mask = block_mask_from_csr(plan.kv_num_blocks, plan.kv_indices, block_size=block_size, q_len=plan.length,
                               kv_len=plan.length, causal=causal, key_padding_mask=plan.padding,
                               padded_blocks=padded_blocks if plan.padding is not None else None)
    out = compiled_flex_attention()(
        _to_buffer(q, plan).transpose(1, 2), _to_buffer(k, plan).transpose(1, 2),
        _to_buffer(v, plan).transpose(1, 2), block_mask=mask, scale=scale, enable_gqa=q.shape[2] != k.shape[2],
        kernel_options=flex_tiles(block_size) or None,
    )
    return _from_buffer(out.transpose(1, 2), plan)
