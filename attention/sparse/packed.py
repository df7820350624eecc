"""Packed documents for block-sparse attention: each document of a packed
batch (``cu_seqlens``, attention/packed.py) attended with its own block
layout, in one pass of the tiles over the whole batch (no call per
document).

Semantics (docs/design.md section 2.2, packed documents): document ``i = [cu[i], cu[i+1])``
gets exactly what ``BlockSparseAttention`` gives it as a sequence of its
own: its layout starts at its first token, no key of another document
counts, causal within it, ``key_padding_mask (1, total)`` still applies.
Empty documents hold nothing. ``softcap`` caps every tile's scores and
``sinks`` (per row and head, blind to documents) are merged once into the
final out and lse, as in ``attention::sparse_forward``. A document too
short for the layout's spec (a global block past its block count, more
random blocks than it has) is refused with the ValueError its own call
raises, naming the document, before any work. With ``block_sparse_attention(..., cu_seqlens=)`` the
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
  twice the longest document's rows (or ``max_seq_len``'s), and the store
  holds log2(max length) entries;
- the others (bigbird and variable with random blocks drawn from the whole
  row, fixed, whose partial last window moves its global blocks; all
  bidirectional): one layout per distinct document block count, fetched at
  ``nb * block_size`` (a layout depends on its block count only). Distinct
  counts ``c_1 < ... < c_m`` each belong to a document, so their rows sum
  to at most the batch's block count: the store traffic of a batch is at
  most one layout of the packed length's rows, m <= sqrt(2 * blocks).
Both kept by ``LayoutSource`` (its last ``MAX_LAYOUTS`` used: a dict
lookup after the first batch).

Execution: each document is copied to a block-aligned offset of a scratch
buffer (padded to whole blocks: less than one block of fill per document);
the block-diagonal CSR of the documents' layouts, index-shifted to their
offsets, is composed in O(active blocks) by vectorized numpy on the host
(``attention.block_mask.block_diagonal``; Python loops run over distinct
block counts only);
the tiles (attention/sparse/tiles.py) run over the buffer once for the
rows that read no fill key block, without a mask, and once for the others
with the fill masked (one call with the caller's key padding mask or'ed
in, when given), and the rows are gathered back. On CUDA, eager and without dropout, the composed CSR is
the BlockMask of compiled FlexAttention (``flex.block_mask_from_csr``,
only the documents' last key blocks partial): never ``create_block_mask``
over the packed length.

Compile and host reads: the tile path is the operator pair
``attention::sparse_packed_forward`` / ``_backward`` (opaque to dynamo;
``cu_seqlens`` is a tensor input, so a new split at the same total does not
recompile; fake outputs have the inputs' shapes, so ``dynamic=True`` and
``torch.export`` take any length). The operators read ``cu_seqlens`` on the
host inside themselves: no sync for a CPU ``cu_seqlens``, one per call (and
one more in the backward) for a GPU one, and one for a GPU
``key_padding_mask``. Compiled graphs on CUDA take this
tile path too (the flex path is eager). The backward reuses the forward's
plan (the last ``MAX_PLANS`` kept; recomposed with a key padding mask or a
given layout).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from patternstore.csr import check_layout, drop_future_blocks

from attention.block_mask import block_diagonal, block_mask_from_csr, stack_layouts
from attention.caches import BoundedCache, process_cache
from attention.kernels.flex import compiled_flex, flex_tiles
from attention.kernels.softmax_parts import EMPTY_LSE, accumulate_dtype
from attention.packed import document_bounds
from attention.sparse.layouts import LayoutSource, source
from attention.sparse.tiles import Groups, row_groups, sparse_backward, sparse_forward, tiles_sinks_grad, with_sinks

__all__ = ["PackedPlan", "packed_plan", "packed_sparse_attention", "packed_flex_attention",
           "MAX_PLANS"]


class TilePart(NamedTuple):
    """Rows of the composed layout run by one call of the tiles."""

    kv_num_blocks: Tensor        # int32 [H, nb]: the part's rows (others count 0)
    kv_indices: Tensor           # int32 [nnz]
    groups: Groups               # the tiles' row groups of those rows
    padding: Optional[Tensor]    # bool [1, length]: masked keys; None: no mask at all


class PackedPlan(NamedTuple):
    """A packed batch laid out in the aligned scratch buffer."""

    dest: Optional[Tensor]       # int64 [total]: buffer position of each token; None: identity (no fill)
    length: int                  # the buffer's length (whole blocks)
    kv_num_blocks: Tensor        # int32 [H, length / block_size]: the composed block-diagonal layout
    kv_indices: Tensor           # int32 [nnz]
    padding: Optional[Tensor]    # bool [1, length]: fill (and the caller's padding); None: nothing masked
    fill_blocks: Tensor          # bool [length / block_size]: key blocks that hold fill
    width: int                   # the longest row of the layout and of its transpose (a BlockMask's width)
    parts: list[TilePart]        # rows that read no fill key block (unmasked: a tile with a mask costs
                                 # ~1.8x, docs/bench.md), then the others; one part with a caller's mask


def _module_layouts(layouts: LayoutSource, blocks: list[int], heads: int, causal: bool,
                    lengths: list[int]) -> tuple[Tensor, Tensor, np.ndarray]:
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
        return counts, indices, np.zeros(len(blocks), dtype=np.int64)
    distinct = sorted(set(live))
    counts, indices, first = stack_layouts([layouts.layout(b * bs, heads, cpu, causal) for b in distinct])
    first_of = dict(zip(distinct, first.tolist()))
    return counts, indices, np.array([first_of.get(b, 0) for b in blocks], dtype=np.int64)


def _parts(counts: Tensor, indices: Tensor, fill_blocks: np.ndarray, padding: Optional[np.ndarray],
           caller_mask: bool) -> list[tuple[Tensor, Tensor, Optional[np.ndarray]]]:
    """The composed layout split by rows: those that read no fill key block
    run without a mask; with a caller's mask, every row with it."""
    if padding is None or caller_mask:
        return [(counts, indices, padding)]
    flat = counts.numpy().ravel().astype(np.int64)
    entry_row = np.repeat(np.arange(flat.size), flat)
    touched = np.bincount(entry_row, weights=fill_blocks[indices.numpy()], minlength=flat.size) > 0
    parts = []
    for rows, mask in ((~touched, None), (touched, padding)):
        if rows.any():
            part_counts = torch.from_numpy(np.where(rows, flat, 0).reshape(counts.shape).astype(np.int32))
            parts.append((part_counts, indices[torch.from_numpy(rows[entry_row])], mask))
    return parts


MAX_PLANS = 4  # forward and backward of a batch share one; a few batches in flight
_PLANS: BoundedCache[PackedPlan] = process_cache(MAX_PLANS)


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
        return hit
    starts = np.array(bounds[:-1], dtype=np.int64)
    lengths = np.diff(np.array(bounds, dtype=np.int64))
    doc_blocks = -(-lengths // block_size)
    if layout is None:
        counts, indices, first_row = _module_layouts(source(description), doc_blocks.tolist(), heads, causal,
                                                     lengths.tolist())
    else:
        counts, indices = (t.cpu() for t in layout)
        check_layout(counts, indices, -(-total // block_size))
        if causal:
            counts, indices = drop_future_blocks(counts, indices)
        first_row = np.zeros(len(lengths), dtype=np.int64)
    counts, indices, _ = block_diagonal(counts, indices, first_row, doc_blocks)
    nb = counts.shape[1]
    length = nb * block_size
    shift = (np.cumsum(doc_blocks) - doc_blocks) * block_size - starts
    dest = np.arange(total) + np.repeat(shift, lengths)
    fill = np.ones(length, dtype=bool)
    fill[dest] = False
    fill_blocks = fill.reshape(nb, block_size).any(1)
    padding = fill
    if key_padding_mask is not None:
        padding = fill.copy()
        padding[dest] = key_padding_mask[0].cpu().numpy()
    padding = padding if padding.any() else None
    parts = []
    for part_counts, part_indices, mask in _parts(counts, indices, fill_blocks, padding, key_padding_mask is not None):
        with torch.no_grad():
            groups = row_groups(part_counts, part_indices, False, 0)
        parts.append(TilePart(part_counts.to(device), part_indices.to(device),
                              [(r.to(device), c.to(device)) for r, c in groups], _device_mask(mask, device)))
    column_counts = np.bincount(np.repeat(np.arange(counts.shape[0]), counts.sum(1).numpy()) * nb
                                + indices.numpy(), minlength=counts.numel())
    width = max(1, int(counts.max()), int(column_counts.max()))
    plan = PackedPlan(None if length == total else torch.from_numpy(dest).to(device), length, counts.to(device),
                      indices.to(device), _device_mask(padding, device), torch.from_numpy(fill_blocks).to(device),
                      width, parts)
    return _PLANS.put(key, plan) if cacheable else plan


def _device_mask(mask: Optional[np.ndarray], device: torch.device) -> Optional[Tensor]:
    return None if mask is None else torch.from_numpy(mask)[None].to(device)


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
    softcap: Optional[float] = None, sinks: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """``(out (1, total, h, v_dim), lse (1, h, total))`` of the packed batch:
    the module's layouts (``description``) or the corners of the given one
    (``description == ""``); ``softcap`` in every tile, ``sinks`` ``(h,)``
    merged into the final out and lse (as ``attention::sparse_forward``)."""
    plan = packed_plan(cu_seqlens, q.shape[1], q.shape[2], q.device, causal, block_size, description,
                       _given(kv_num_blocks, kv_indices), key_padding_mask)
    q_, k_, v_ = _to_buffer(q, plan), _to_buffer(k, plan), _to_buffer(v, plan)
    out = lse = None
    for i, part in enumerate(plan.parts):  # disjoint rows: a row outside a part is 0 there, lse EMPTY_LSE
        o, l = sparse_forward(q_, k_, v_, part.kv_num_blocks, part.kv_indices, part.groups, part.padding,
                              _part_seed(dropout_seed, i), block_size, causal, scale, dropout_p, True, None, softcap)
        out, lse = (o, l) if out is None else (out.add_(o), torch.maximum(lse, l))
    return with_sinks(_from_buffer(out, plan).contiguous(), _from_buffer(lse, plan, 2).contiguous(), sinks)


def _part_seed(dropout_seed: Optional[Tensor], part: int) -> Optional[Tensor]:
    """Each part's dropout stream (the tiles number their tiles from 0 in every call)."""
    return None if dropout_seed is None else dropout_seed + part


@forward_op.register_fake
def _(q, k, v, cu_seqlens, kv_num_blocks, kv_indices, key_padding_mask, dropout_seed, description, block_size,
      causal, scale, dropout_p, softcap=None, sinks=None):
    b, n, h, _ = q.shape
    return q.new_empty(b, n, h, v.shape[-1]), q.new_empty(b, h, n, dtype=accumulate_dtype(q.dtype))


@torch.library.custom_op("attention::sparse_packed_backward", mutates_args=())
def backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor,
    kv_num_blocks: Optional[Tensor], kv_indices: Optional[Tensor], key_padding_mask: Optional[Tensor],
    dropout_seed: Optional[Tensor], description: str, block_size: int, causal: bool, scale: float,
    dropout_p: float, softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``attention::sparse_packed_forward``'s ``out`` with
    respect to ``q, k, v``, from the saved ``out`` and ``lse``. Fill rows get
    zero ``grad_out`` and lse ``-EMPTY_LSE`` (their probabilities are 0): they
    add nothing to any gradient."""
    plan = packed_plan(cu_seqlens, q.shape[1], q.shape[2], q.device, causal, block_size, description,
                       _given(kv_num_blocks, kv_indices), key_padding_mask)
    tensors = (_to_buffer(grad_out, plan), _to_buffer(q, plan), _to_buffer(k, plan), _to_buffer(v, plan),
               _to_buffer(out, plan), _to_buffer(lse.transpose(1, 2), plan, -EMPTY_LSE).transpose(1, 2))
    grads = None
    for i, part in enumerate(plan.parts):
        g = sparse_backward(*tensors, part.kv_num_blocks, part.kv_indices, part.groups, part.padding,
                            _part_seed(dropout_seed, i), block_size, causal, scale, dropout_p, True, None, softcap)
        grads = g if grads is None else tuple(a.add_(b) for a, b in zip(grads, g))
    return tuple(_from_buffer(g, plan).contiguous() for g in grads)


@backward_op.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, kv_num_blocks, kv_indices, key_padding_mask, dropout_seed,
      description, block_size, causal, scale, dropout_p, softcap=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, kv_num_blocks, kv_indices, key_padding_mask, dropout_seed, *options, sinks = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens, kv_num_blocks, kv_indices, key_padding_mask,
                          dropout_seed, sinks)
    ctx.options = options  # description ... dropout_p, softcap: backward_op's trailing arguments


def _backward(ctx, grad_out: Tensor, grad_lse: Optional[Tensor]):
    q, k, v, out, lse, cu_seqlens, kv_num_blocks, kv_indices, key_padding_mask, dropout_seed, sinks = \
        ctx.saved_tensors
    grad_out = grad_out.contiguous()
    dq, dk, dv = backward_op(grad_out, q, k, v, out, lse, cu_seqlens, kv_num_blocks, kv_indices,
                             key_padding_mask, dropout_seed, *ctx.options)
    d_sinks = tiles_sinks_grad(grad_out, out, lse, sinks) if sinks is not None and ctx.needs_input_grad[14] else None
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None, d_sinks


def _no_double_backward(ctx, *grads):
    raise RuntimeError("packed block-sparse attention has no double backward (a gradient of its gradients); use "
                       "the dense reference F.scaled_dot_product_attention with a boolean mask for second derivatives")


forward_op.register_autograd(_backward, setup_context=_setup)
backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def packed_sparse_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, key_padding_mask: Optional[Tensor],
                            *, description: str = "", layout: Optional[tuple[Tensor, Tensor]] = None,
                            block_size: int, causal: bool, scale: float, dropout_p: float,
                            softcap: Optional[float] = None, sinks: Optional[Tensor] = None) -> Tensor:
    """The tile path of a packed batch (inputs checked by the caller)."""
    seed = torch.randint(0, 1 << 62, (), dtype=torch.int64) if dropout_p > 0 else None
    counts, indices = layout if layout is not None else (None, None)
    out, _ = forward_op(q, k, v, cu_seqlens, counts, indices, key_padding_mask, seed, description, block_size,
                        causal, float(scale), float(dropout_p), softcap, sinks)
    return out


def packed_flex_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, key_padding_mask: Optional[Tensor],
                          *, description: str, block_size: int, causal: bool, scale: float) -> Tensor:
    """The flex path of a packed batch (eager; module docstring): the
    composed CSR as a BlockMask over the aligned buffer, whose only partial
    blocks are the causal diagonal and the documents' last (filled) key
    blocks, or every block with a caller's key padding mask. Its rows are
    as wide as the longest (``PackedPlan.width``: 4 MiB for a 1M-token
    batch of 256 documents where ``nb``-wide rows take 1 GiB), except on
    the CPU, whose flex needs ``nb``-wide rows."""
    plan = packed_plan(cu_seqlens, q.shape[1], q.shape[2], q.device, causal, block_size, description, None,
                       key_padding_mask)
    padded_blocks = None if key_padding_mask is not None else plan.fill_blocks
    mask = block_mask_from_csr(plan.kv_num_blocks, plan.kv_indices, block_size=block_size, q_len=plan.length,
                               kv_len=plan.length, causal=causal, key_padding_mask=plan.padding,
                               padded_blocks=padded_blocks if plan.padding is not None else None,
                               width=None if q.device.type == "cpu" else plan.width)
    out = compiled_flex(q.device.type)(
        _to_buffer(q, plan).transpose(1, 2), _to_buffer(k, plan).transpose(1, 2),
        _to_buffer(v, plan).transpose(1, 2), block_mask=mask, scale=scale, enable_gqa=q.shape[2] != k.shape[2],
        kernel_options=flex_tiles(block_size) or None,
    )
    return _from_buffer(out.transpose(1, 2), plan)
