"""A stored block layout as a FlexAttention ``BlockMask``, built from the CSR.

``to_block_mask(pattern)`` gives the mask of ``flex_attention`` that computes
exactly ``attention.BlockSparseAttention`` over the same layout: the layout's
blocks, and with ``causal`` the rule ``kv_idx <= q_idx``.

Shapes (``BlockMask``'s own, batch dimension 1 broadcast over every batch,
``H`` = the layout's leading dimension, 1 broadcast over every head):
``kv_num_blocks [1, H, nb]`` and ``kv_indices [1, H, nb, width]``, and the
same for the ``full_*`` and the q-side (``q_*``, needed by the backward)
arrays. ``width`` is the longest row, except for masks on the CPU: there it is
``nb``, because torch's CPU FlexAttention lowering (torch 2.13,
``_inductor/kernel/flex/flex_cpu.py``) asserts ``width * block_size >=
seq_len``. Memory is ``H * nb * width`` int32 per array; no ``n x n`` mask is
built, and off the CPU no ``nb x nb`` one either.

Causal layouts put the diagonal blocks in ``kv_*`` (``mask_mod`` applies) and
every other block in ``full_kv_*`` (no mask_mod): the causal rule only cuts
diagonal blocks once future blocks are dropped.

``layout_block_mask`` builds the mask the block-sparse modules run on CUDA
from raw CSR arrays (the first rows of a capacity layout, docs/design.md
section 7) and ALWAYS splits blocks: partial (``kv_*``, mask_mod applies)
are the causal diagonal blocks, the last key block when ``seq_len`` is not a
multiple of the block (the padded tail: ``kv_idx < seq_len``), and, with
``padded=True``, every block (a ``key_padding_mask`` read by the mask_mod,
``with_key_padding``); every other block is full. Its index arrays are
``nb`` wide on every device, so their shapes depend on the length only
(one symbolic size under ``torch.compile(dynamic=True)``).

``BlockMask.from_kv_blocks`` derives the q-side through a dense ``[nb, nb]``
matrix and so needs ``kv_indices`` ``nb`` wide; we derive it from the CSR
(``csr.transpose_layout``) and call the constructor ``from_kv_blocks`` ends
in. ``BlockMask.to_dense()``/``to_string()`` assume the ``nb``-wide form of
``create_block_mask`` and do not apply to these masks; ``flex_attention``
reads only the first ``kv_num_blocks`` entries of each row.
"""

from __future__ import annotations

import torch

from .csr import drop_future_blocks, entry_rows, padded_rows, select_entries, transpose_layout
from .pattern import Pattern
from .specs import SparseSpec, check_bool

__all__ = ["to_block_mask", "layout_block_mask", "with_key_padding", "block_mask_arrays"]


def causal_mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """FlexAttention mask_mod of the causal rule: key position <= query position."""
    return kv_idx <= q_idx


def to_block_mask(pattern: Pattern, *, causal: bool | None = None, width: int | None = None):
    """``torch.nn.attention.flex_attention.BlockMask`` of a sparse ``pattern``
    (arrays on any device; the mask lives on the same device). ``causal``
    defaults to the layout's own direction (``attention="unidirectional"``);
    True on a bidirectional layout applies the causal rule to it. ``width``
    of the padded index arrays: default ``nb`` on the CPU, else the longest
    row (module docstring)."""
    from torch.nn.attention.flex_attention import BlockMask, noop_mask

    spec = pattern.spec
    if not isinstance(spec, SparseSpec):
        raise ValueError(f"to_block_mask needs a sparse pattern (a SparseSpec), got {type(spec).__name__}")
    causal = spec.params["attention"] == "unidirectional" if causal is None else check_bool("causal", causal)
    kv_num_blocks, kv_indices = pattern["kv_num_blocks"], pattern["kv_indices"]
    nb = spec.num_blocks
    if width is None and kv_indices.device.type == "cpu":
        width = nb
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= nb):
        raise ValueError(f"width must be an int in [1, num_blocks={nb}] or None, got {width!r}")
    full = None
    if causal:
        kv_num_blocks, kv_indices = drop_future_blocks(kv_num_blocks, kv_indices)
        diagonal = kv_indices.long() == entry_rows(kv_num_blocks) % nb
        full = select_entries(kv_num_blocks, kv_indices, ~diagonal)
        kv_num_blocks, kv_indices = select_entries(kv_num_blocks, kv_indices, diagonal)

    def padded(counts: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        longest = max(1, int(counts.max()))
        if width is not None and width < longest:
            raise ValueError(f"width={width} is shorter than the longest row of the layout ({longest})")
        rows = padded_rows(counts, indices, longest if width is None else width)
        return counts[None].contiguous(), rows[None].contiguous()

    def both_sides(layout):
        if layout is None:
            return None, None, None, None
        return (*padded(*layout), *padded(*transpose_layout(*layout)))

    kv_n, kv_i, q_n, q_i = both_sides((kv_num_blocks, kv_indices))
    full_kv_n, full_kv_i, full_q_n, full_q_i = both_sides(full)
    return BlockMask(
        seq_lengths=(spec.seq_len, spec.seq_len),
        kv_num_blocks=kv_n, kv_indices=kv_i,
        full_kv_num_blocks=full_kv_n, full_kv_indices=full_kv_i,
        q_num_blocks=q_n, q_indices=q_i,
        full_q_num_blocks=full_q_n, full_q_indices=full_q_i,
        BLOCK_SIZE=(spec.block_size, spec.block_size),
        mask_mod=causal_mask_mod if causal else noop_mask,
    )


def block_mask_arrays(
    kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, seq_len: int, block_size: int, *,
    causal: bool, padded: bool = False,
) -> tuple[torch.Tensor, ...]:
    """The eight index arrays of ``layout_block_mask``, in ``BlockMask``'s
    order: ``kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
    q_num_blocks, q_indices, full_q_num_blocks, full_q_indices``, each
    ``[1, H, nb]`` or ``[1, H, nb, nb]`` int32 (module docstring)."""
    nb = kv_num_blocks.shape[1]
    if causal:
        kv_num_blocks, kv_indices = drop_future_blocks(kv_num_blocks, kv_indices)
    column = kv_indices.long()
    partial = torch.full_like(column, padded, dtype=torch.bool)
    if causal:
        partial |= column == entry_rows(kv_num_blocks) % nb
    if seq_len % block_size:
        partial |= column == nb - 1
    arrays: list[torch.Tensor] = []
    for keep in (partial, ~partial):
        counts, indices = select_entries(kv_num_blocks, kv_indices, keep)
        arrays += [counts[None].contiguous(), padded_rows(counts, indices, nb)[None].contiguous()]
    for keep in (partial, ~partial):
        counts, indices = transpose_layout(*select_entries(kv_num_blocks, kv_indices, keep))
        arrays += [counts[None].contiguous(), padded_rows(counts, indices, nb)[None].contiguous()]
    kv, kv_i, full, full_i, q, q_i, full_q, full_q_i = arrays
    return kv, kv_i, full, full_i, q, q_i, full_q, full_q_i


def structural_mask_mod(seq_len: int, causal: bool):
    """The mask_mod of ``layout_block_mask``: causal rule and the padded tail."""
    def mask_mod(b, h, q_idx, kv_idx):
        inside = kv_idx < seq_len
        return inside & (kv_idx <= q_idx) if causal else inside
    return mask_mod


def layout_block_mask(
    kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, seq_len: int, block_size: int, *,
    causal: bool, padded: bool = False,
):
    """``BlockMask`` computing block-sparse attention over a CSR layout
    (``kv_num_blocks [H, nb]``, ``kv_indices``; on any device, the mask lives
    there) for ``seq_len`` queries and keys (module docstring). With
    ``padded``, every block is partial, ready for ``with_key_padding``."""
    nb = -(-seq_len // block_size)
    if kv_num_blocks.dim() != 2 or kv_num_blocks.shape[1] != nb:
        raise ValueError(f"kv_num_blocks must be [H, ceil(seq_len / block_size) = {nb}], "
                         f"got {list(kv_num_blocks.shape)}")
    arrays = block_mask_arrays(kv_num_blocks, kv_indices, seq_len, block_size, causal=causal, padded=padded)
    return block_mask_of(arrays, seq_len, block_size, structural_mask_mod(seq_len, causal))


def block_mask_of(arrays, seq_len: int, block_size: int, mask_mod):
    """A ``BlockMask`` over the eight arrays of ``block_mask_arrays``."""
    from torch.nn.attention.flex_attention import BlockMask

    kv, kv_i, full, full_i, q, q_i, full_q, full_q_i = arrays
    return BlockMask(
        seq_lengths=(seq_len, seq_len), kv_num_blocks=kv, kv_indices=kv_i,
        full_kv_num_blocks=full, full_kv_indices=full_i, q_num_blocks=q, q_indices=q_i,
        full_q_num_blocks=full_q, full_q_indices=full_q_i, BLOCK_SIZE=(block_size, block_size),
        mask_mod=mask_mod,
    )


def padding_mask_mod(mask_mod, key_padding_mask: torch.Tensor):
    """``mask_mod`` and "key ``kv_idx`` of batch ``b`` is not padding"
    (``key_padding_mask (batch, seq_len)`` bool, True = padding)."""
    def padded_mask_mod(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx, kv_idx) & ~key_padding_mask[b, kv_idx]
    return padded_mask_mod


def with_key_padding(mask, key_padding_mask: torch.Tensor):
    """The same ``BlockMask``, which must have been built with
    ``padded=True`` (every block partial: a full block skips the mask_mod),
    whose mask_mod also drops the keys ``key_padding_mask`` marks. Shares
    the index arrays: no host work beyond building the object."""
    arrays = (mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices,
              mask.q_num_blocks, mask.q_indices, mask.full_q_num_blocks, mask.full_q_indices)
    return block_mask_of(arrays, mask.seq_lengths[1], mask.BLOCK_SIZE[1],
                         padding_mask_mod(mask.mask_mod, key_padding_mask))
