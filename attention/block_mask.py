"""The FlexAttention bridge: a CSR block layout as a ``BlockMask``.

ONE builder, ``build_block_mask``, turns CSR arrays (plain tensors, no
pattern type) into a BlockMask: the block-sparse modules and the fused
dilated path both go through it. ``block_mask_from_csr`` gives the mask of
``flex_attention`` that computes exactly ``attention.BlockSparseAttention`` over the same layout
(``kv_num_blocks [H, nb]``, ``kv_indices [nnz]``, ``patternstore.csr``):
the layout's blocks, keys ``< kv_len``, with ``causal`` the rule ``kv_idx <=
q_idx``, and with a ``key_padding_mask (batch, kv_len)`` (True = padding) the
rule "key not padded". No ``n x n`` mask is built; the arrays are
``[1, H, nb]`` counts and ``[1, H, nb, width]`` rows (``width = nb`` unless
asked), so under ``torch.compile(dynamic=True)`` their shapes depend on the
length only.

Block rule: a block the mask_mod can cut is PARTIAL (``kv_*``: the mask_mod
runs there): the causal diagonal blocks (after future blocks are dropped,
the only ones causality cuts), the last key block when ``kv_len`` is not a
multiple of the block (its keys past ``kv_len``), and with a key padding
mask every block. With ``full_blocks`` (the default) every other block is
FULL (``full_kv_*``: the mask_mod is skipped); without it they stay in
``kv_*`` and no ``full_*`` arrays exist. The q-side arrays (``q_*``, needed
by the backward) are the CSR transpose (``csr.transpose_layout``), not the
dense ``[nb, nb]`` matrix ``BlockMask.from_kv_blocks`` goes through.

CPU: torch 2.13's CPU FlexAttention lowering (``_inductor/kernel/flex/
flex_cpu.py``) asserts ``width * block_size >= seq_len``, hence ``nb``-wide
rows there. ``BlockMask.to_dense()`` assumes that ``nb``-wide form; flex
reads only the first ``kv_num_blocks`` entries of each row.

Packed documents: ONE composer, ``block_diagonal``, places per-document
layouts (corners of one stored layout, or whole per-length layouts with
their full/partial flags) on the block diagonal of one CSR; the packed
block-sparse plan (attention/sparse/packed.py) and the packed fused
dilated path (attention/dilated/packed_flex.py) both use it.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from attention.checks import check_count
from patternstore.csr import drop_future_blocks, entry_rows, padded_rows, select_entries, transpose_layout
from patternstore.pattern import Pattern
from patternstore.fields import check_bool
from patternstore.specs import SparseSpec

__all__ = ["BLOCK_MASK_FIELDS", "block_diagonal", "stack_layouts", "build_block_mask", "block_mask_from_csr",
           "block_mask_of", "with_key_padding", "to_block_mask", "layout_mask_mod"]

# The tensor fields of a BlockMask this bridge fills, in BlockMask's own order
# (``BlockMask._TENSOR_ATTRS`` without the optional dq-ordering arrays).
BLOCK_MASK_FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                     "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def layout_mask_mod(kv_len: int, causal: bool, key_padding_mask: Optional[Tensor] = None) -> MaskMod:
    """The mask_mod of every partial block: key inside ``kv_len``, causal
    (``kv_idx <= q_idx``) when asked, and not padded."""
    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        keep = kv_idx < kv_len
        if causal:
            keep = keep & (kv_idx <= q_idx)
        if key_padding_mask is not None:
            keep = keep & ~key_padding_mask[b, kv_idx]
        return keep
    return mask_mod


def block_diagonal(kv_num_blocks: Tensor, kv_indices: Tensor, first_row, doc_blocks,
                   flags: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """THE block-diagonal composition of documents placed one after the
    other, ``doc_blocks[d]`` blocks each (int [D], zeros allowed): document
    ``d``'s local row ``i`` is the source layout's row ``first_row[d] + i``
    cut to its key blocks ``< doc_blocks[d]`` (the top-left corner; a whole
    layout of ``doc_blocks[d]`` blocks is its own corner), the block indices
    shifted by the document's first block. The source ``kv_num_blocks [H,
    R]``, ``kv_indices [nnz]`` (CPU, rows head-major and ascending) is one
    layout or several stacked along the rows (``stack_layouts``); ``flags``
    (any dtype ``[nnz]``, e.g. full/partial) travel with their entries.
    -> ``(kv_num_blocks [H, NB] int32, kv_indices int32, flags or None)``,
    ``NB`` the sum of ``doc_blocks``; each output row is its source row's
    entries in their order (ascending), rows head-major: the order the
    sparse tiles and ``build_block_mask`` read. O(H * NB + nnz) vectorized
    numpy, no Python loop over documents (single-threaded: on a loaded
    machine each small parallel torch op risks a stall of milliseconds); a
    row's cut is one ``searchsorted``."""
    counts_in = kv_num_blocks.numpy().astype(np.int64)
    heads, rows = counts_in.shape
    indices_in = kv_indices.numpy().astype(np.int64)
    doc_blocks, first_row = np.asarray(doc_blocks, dtype=np.int64), np.asarray(first_row, dtype=np.int64)
    starts = np.cumsum(doc_blocks) - doc_blocks                            # each document's first block
    total = int(doc_blocks.sum())
    doc = np.repeat(np.arange(doc_blocks.size), doc_blocks)               # [NB]
    local = np.arange(total) - starts[doc]
    source_row = (np.arange(heads)[:, None] * rows + (first_row[doc] + local)[None]).ravel()
    limit = np.tile(doc_blocks[doc], heads)                                # [H * NB]
    counts = counts_in.ravel()
    offsets = np.cumsum(counts) - counts
    keys = np.repeat(np.arange(counts.size), counts) * (rows + 1) + indices_in   # ascending: rows, then columns
    begins = offsets[source_row]
    new_counts = np.searchsorted(keys, source_row * (rows + 1) + limit) - begins
    new_offsets = np.cumsum(new_counts) - new_counts
    out_row = np.repeat(np.arange(new_counts.size), new_counts)
    entry = begins[out_row] + np.arange(out_row.size) - new_offsets[out_row]
    values = indices_in[entry] + np.tile(starts[doc], heads)[out_row]
    return (torch.from_numpy(new_counts.reshape(heads, total).astype(np.int32)),
            torch.from_numpy(values.astype(np.int32)),
            None if flags is None else flags[torch.from_numpy(entry)])


def stack_layouts(layouts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, np.ndarray]:
    """Layouts ``(kv_num_blocks [H, nb_u], kv_indices)`` (CPU) stacked along
    the rows for ``block_diagonal``: ``(kv_num_blocks [H, sum nb_u],
    kv_indices, first_row [U])``, head ``h``'s rows of every layout, then
    head ``h + 1``'s; layout ``u``'s rows start at ``first_row[u]``."""
    sizes = np.array([c.shape[1] for c, _ in layouts], dtype=np.int64)
    counts = torch.cat([c for c, _ in layouts], 1)
    per_head = [torch.split(i, c.sum(1).tolist()) for c, i in layouts]
    indices = torch.cat([pieces[h] for h in range(counts.shape[0]) for pieces in per_head])
    return counts, indices, np.cumsum(sizes) - sizes


def _rows(counts: Tensor, indices: Tensor, width: Optional[int]) -> tuple[Tensor, Tensor]:
    """``[1, H, nb]`` int32 counts and ``[1, H, nb, width]`` padded rows;
    ``width`` None: the longest row (at least 1)."""
    if width is None:
        width = max(1, int(counts.max()) if counts.numel() else 0)
    return counts[None].to(torch.int32).contiguous(), padded_rows(counts, indices, width)[None].contiguous()


def build_block_mask(
    kv_num_blocks: Tensor, kv_indices: Tensor, *, seq_len: int, block_size: int, partial: Optional[Tensor],
    transposed: Optional[tuple[Tensor, Tensor, Optional[Tensor]]] = None, width: Optional[int] = None,
    mask_mod: Optional[MaskMod] = None, device: Optional[torch.device] = None,
):
    """THE CSR -> ``BlockMask`` builder, on plain arrays: the layout
    ``kv_num_blocks [H, nb]``, ``kv_indices [nnz]`` over ``seq_len`` positions
    (queries and keys alike). ``partial [nnz]`` bool: the entries where the
    mask_mod must run (``kv_*``), the others FULL (``full_kv_*``, mask_mod
    skipped); None: every block partial and no full arrays. The q-side
    arrays (flex's backward reads them) are the transpose of each side
    (``csr.transpose_layout``), or ``transposed = (q_num_blocks, q_indices,
    q_partial)`` when the caller has it already. ``width``: of every row
    array (``nb`` where CPU flex needs it), None: each side as wide as its
    longest row. The arrays move to ``device`` (default: where they are)."""
    from torch.nn.attention.flex_attention import BlockMask

    def sides(counts: Tensor, indices: Tensor, flags: Optional[Tensor]) -> list[tuple[Tensor, Tensor]]:
        if flags is None:
            return [(counts, indices)]
        return [select_entries(counts, indices, flags), select_entries(counts, indices, ~flags)]

    kv_sides = sides(kv_num_blocks, kv_indices, partial)
    q_sides = [transpose_layout(*side) for side in kv_sides] if transposed is None else sides(*transposed)
    kv = [array for side in kv_sides for array in _rows(*side, width)]
    q = [array for side in q_sides for array in _rows(*side, width)]
    if partial is None:
        kv, q = kv + [None, None], q + [None, None]
    if device is not None:
        kv, q = ([None if x is None else x.to(device) for x in arrays] for arrays in (kv, q))
    extra = {} if mask_mod is None else {"mask_mod": mask_mod}
    return BlockMask(seq_lengths=(seq_len, seq_len), BLOCK_SIZE=(block_size, block_size),
                     **dict(zip(BLOCK_MASK_FIELDS, kv + q)), **extra)


def block_mask_from_csr(
    kv_num_blocks: Tensor, kv_indices: Tensor, *, block_size: int, q_len: int, kv_len: int, causal: bool,
    key_padding_mask: Optional[Tensor] = None, padded: bool = False, full_blocks: bool = True,
    width: Optional[int] = None, padded_blocks: Optional[Tensor] = None,
):
    """``BlockMask`` of the block-sparse layout ``kv_num_blocks [H, nb]``,
    ``kv_indices`` (any device; the mask lives there) for ``q_len == kv_len``
    positions, with the rules of the module docstring (``build_block_mask``
    does the building). ``padded``: every block partial without a padding
    mask yet (``with_key_padding`` adds it later, sharing the arrays).
    ``width``: the rows' width, ``nb`` by default; a shorter one must hold
    the longest row (read on the host: one sync). ``padded_blocks``: bool
    ``[nb]``, the only key blocks the ``key_padding_mask`` can cut (the fill
    of packed documents, attention/sparse/packed.py); default every block."""
    if q_len != kv_len:
        raise ValueError(f"q_len must equal kv_len (flex's blocks are top-left aligned); got {q_len}, {kv_len}")
    nb = -(-kv_len // block_size)
    if kv_num_blocks.dim() != 2 or kv_num_blocks.shape[1] != nb:
        raise ValueError(f"kv_num_blocks must be [H, ceil(kv_len / block_size) = {nb}], "
                         f"got {list(kv_num_blocks.shape)}")
    if width is not None:
        width = check_count("width", width, 1, nb)  # or None
    padded = padded or key_padding_mask is not None
    if causal:
        kv_num_blocks, kv_indices = drop_future_blocks(kv_num_blocks, kv_indices)
    column = kv_indices.long()
    partial = torch.full_like(column, (padded and padded_blocks is None) or not full_blocks, dtype=torch.bool)
    if padded and padded_blocks is not None:
        partial |= padded_blocks[column]
    if causal:
        partial |= column == entry_rows(kv_num_blocks) % nb
    if kv_len % block_size:
        partial |= column == nb - 1
    if width is not None:
        sides = [select_entries(kv_num_blocks, kv_indices, keep) for keep in (partial, ~partial)]
        longest = max(int(counts.max()) for layout in sides for counts, _ in (layout, transpose_layout(*layout)))
        if width < longest:
            raise ValueError(f"width={width} is shorter than the longest row of the layout ({longest})")
    return build_block_mask(kv_num_blocks, kv_indices, seq_len=kv_len, block_size=block_size,
                            partial=partial if full_blocks else None, width=nb if width is None else width,
                            mask_mod=layout_mask_mod(kv_len, causal, key_padding_mask))


def with_key_padding(mask, key_padding_mask: Tensor):
    """``mask`` (built with ``padded=True``: every block partial, since a full
    block skips the mask_mod) whose mask_mod also drops the keys
    ``key_padding_mask (batch, kv_len)`` marks; the index arrays are shared."""
    from torch.nn.attention.flex_attention import BlockMask

    inner = mask.mask_mod

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return inner(b, h, q_idx, kv_idx) & ~key_padding_mask[b, kv_idx]

    return BlockMask(seq_lengths=mask.seq_lengths, BLOCK_SIZE=mask.BLOCK_SIZE, mask_mod=mask_mod,
                     **{name: getattr(mask, name) for name in BLOCK_MASK_FIELDS})


def block_mask_of(arrays: list[Tensor], seq_len: int, block_size: int, causal: bool):
    """A ``BlockMask`` over ``BLOCK_MASK_FIELDS`` arrays (as built by
    ``block_mask_from_csr``, e.g. baked into a compiled graph)."""
    from torch.nn.attention.flex_attention import BlockMask

    return BlockMask(seq_lengths=(seq_len, seq_len), BLOCK_SIZE=(block_size, block_size),
                     mask_mod=layout_mask_mod(seq_len, causal), **dict(zip(BLOCK_MASK_FIELDS, arrays)))


def to_block_mask(pattern: Pattern, *, causal: Optional[bool] = None, width: Optional[int] = None):
    """The ``BlockMask`` of a stored sparse ``pattern`` at its own length.
    ``causal`` defaults to the layout's direction (``attention=
    "unidirectional"``). Uncut blocks are full only when causal (a
    bidirectional mask keeps every block in ``kv_*``). ``width`` defaults to
    ``nb`` on the CPU, else the longest row."""
    spec = pattern.spec
    if not isinstance(spec, SparseSpec):
        raise ValueError(f"to_block_mask needs a sparse pattern (a SparseSpec), got {type(spec).__name__}")
    causal = spec.params["attention"] == "unidirectional" if causal is None else check_bool("causal", causal)
    counts, indices = pattern["kv_num_blocks"], pattern["kv_indices"]
    if width is None and counts.device.type != "cpu":
        sides = drop_future_blocks(counts, indices) if causal else (counts, indices)
        width = max(1, int(sides[0].max()), int(transpose_layout(*sides)[0].max()))
    return block_mask_from_csr(counts, indices, block_size=spec.block_size, q_len=spec.seq_len,
                               kv_len=spec.seq_len, causal=causal, full_blocks=causal, width=width)
