"""Operations on a CSR block layout, the stored form of a sparse pattern.

A layout (docs/design.md section 2.2) is ``kv_num_blocks``
int32 ``[H, nb]`` (active key blocks of each query block) and ``kv_indices``
int32 ``[nnz]`` (the rows back to back, head-major, each row sorted ascending). Row ``r = h * nb + i``
starts at ``offsets[r] = cumsum(counts)[r] - counts[r]``.

Pure, vectorized functions: attention (``attention.sparse``) and the
FlexAttention bridge (``attention.block_mask``) both use them, so the one
definition of "causal" and of a row's entries lives here.
"""

from __future__ import annotations

import torch

__all__ = [
    "check_layout", "entry_rows", "select_entries", "drop_future_blocks", "transpose_layout", "padded_rows",
    "prefix_rows",
]


def check_layout(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, num_blocks: int) -> None:
    """Raise ``ValueError`` unless the arrays form a valid layout over
    ``num_blocks`` query and key blocks: int32, ``kv_num_blocks`` 2-D with
    ``num_blocks`` columns and entries in ``[0, num_blocks]``, ``kv_indices``
    1-D with ``sum(kv_num_blocks)`` entries in ``[0, num_blocks)``, every row
    strictly ascending. Costs a few passes over the arrays (values are read)."""
    for name, t, dim in (("kv_num_blocks", kv_num_blocks, 2), ("kv_indices", kv_indices, 1)):
        if t.dtype != torch.int32 or t.dim() != dim:
            raise ValueError(f"{name} must be a {dim}-D int32 tensor, got {t.dim()}-D {t.dtype}")
    if kv_num_blocks.shape[1] != num_blocks:
        raise ValueError(
            f"kv_num_blocks has {kv_num_blocks.shape[1]} query blocks per head, but the sequence "
            f"has ceil(seq_len / block_size) = {num_blocks}"
        )
    counts = kv_num_blocks.flatten().long()
    if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > num_blocks):
        raise ValueError(f"kv_num_blocks entries must lie in [0, {num_blocks}]")
    if int(counts.sum()) != kv_indices.numel():
        raise ValueError(
            f"kv_indices has {kv_indices.numel()} entries but kv_num_blocks sums to {int(counts.sum())}"
        )
    if kv_indices.numel() == 0:
        return
    if int(kv_indices.min()) < 0 or int(kv_indices.max()) >= num_blocks:
        raise ValueError(f"kv_indices entries must lie in [0, {num_blocks})")
    rows = entry_rows(kv_num_blocks)
    same_row = rows[1:] == rows[:-1]
    if bool((same_row & (kv_indices[1:] <= kv_indices[:-1])).any()):
        raise ValueError("every row of kv_indices must be strictly ascending (sorted, no duplicates)")


def entry_rows(kv_num_blocks: torch.Tensor) -> torch.Tensor:
    """int64 ``[nnz]``: the flat row ``h * nb + i`` of every entry of ``kv_indices``."""
    counts = kv_num_blocks.flatten().long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)


def select_entries(
    kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layout of the entries where bool ``keep [nnz]`` is True (rows stay sorted)."""
    heads, nb = kv_num_blocks.shape
    counts = torch.bincount(entry_rows(kv_num_blocks)[keep], minlength=heads * nb)
    return counts.view(heads, nb).to(torch.int32), kv_indices[keep]


def drop_future_blocks(
    kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layout without key blocks after their query block (``j > i``): what
    the causal rule (key position <= query position) leaves of a layout at
    block level. A unidirectional layout comes back equal."""
    nb = kv_num_blocks.shape[1]
    return select_entries(kv_num_blocks, kv_indices, kv_indices.long() <= entry_rows(kv_num_blocks) % nb)


def transpose_layout(
    kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layout seen from the keys: ``(q_num_blocks [H, nb], q_indices)``,
    row ``(h, j)`` listing in ascending order the query blocks ``i`` whose row
    holds ``j``. One sort of the entries; no ``nb x nb`` matrix."""
    heads, nb = kv_num_blocks.shape
    rows = entry_rows(kv_num_blocks)
    key_rows = rows // nb * nb + kv_indices.long()            # flat row (h, j) of each entry
    order = torch.argsort(key_rows * nb + rows % nb)
    counts = torch.bincount(key_rows, minlength=heads * nb)
    return counts.view(heads, nb).to(torch.int32), (rows % nb)[order].to(torch.int32)


def padded_rows(
    kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, width: int | None = None
) -> torch.Tensor:
    """int32 ``[H, nb, width]``: row ``(h, i)`` holds its ``kv_num_blocks[h, i]``
    entries first, then zeros. ``width`` defaults to the longest row. Built
    from the CSR directly: memory ``H * nb * width``, never ``nb * nb``."""
    heads, nb = kv_num_blocks.shape
    counts = kv_num_blocks.flatten().long()
    longest = int(counts.max()) if counts.numel() else 0
    width = longest if width is None else width
    if width < longest:
        raise ValueError(f"width must be >= the longest row ({longest}), got {width}")
    rows = entry_rows(kv_num_blocks)
    slot = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
    out = torch.zeros(heads * nb, width, dtype=torch.int32, device=kv_indices.device)
    out[rows, slot] = kv_indices
    return out.view(heads, nb, width)


def prefix_rows(
    kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, num_blocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``num_blocks`` query rows of every head of a (capacity)
    layout, as a layout of its own: ``kv_num_blocks[:, :num_blocks]`` and
    those rows' entries. A causal layout's rows hold only key blocks <= their
    query block, so the result lies inside ``num_blocks`` key blocks; for a
    spec with ``is_prefix_stable`` it equals the layout generated at that
    length. One head: views, no copy; several: one gather of the kept entries."""
    heads, capacity = kv_num_blocks.shape
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or not 0 <= num_blocks <= capacity:
        raise ValueError(f"num_blocks must be an int in [0, {capacity}] (the layout's query blocks), got {num_blocks!r}")
    counts = kv_num_blocks[:, :num_blocks]
    if heads == 1:
        return counts, kv_indices[: int(counts.sum())]
    keep = entry_rows(kv_num_blocks) % capacity < num_blocks
    return counts.contiguous(), kv_indices[keep]
