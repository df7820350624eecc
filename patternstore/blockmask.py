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

__all__ = ["to_block_mask"]


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
