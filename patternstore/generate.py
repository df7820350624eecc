"""Generators: ``generate(spec) -> Pattern``, pure and deterministic.

Vectorized torch code: Python loops run over branches, head groups and
parameter lists, never over positions or blocks. A sparse kind's generator is
its entry in ``patternstore.kinds.SPARSE_KINDS``; this module turns its
candidates into the CSR layout. Random blocks come from ``spec.seed``, so every
process and every rank gets bit-identical arrays (the format version in the
key is bumped whenever the output changes).
"""

from __future__ import annotations

import torch

from .kinds import SPARSE_KINDS, LayoutContext
from .dilated_groups import GROUP_COLUMNS
from .pattern import Pattern
from .specs import DilatedSpec, SparseSpec, Spec

__all__ = ["generate", "dilated_head_groups"]


def generate(spec: Spec) -> Pattern:
    """Build the arrays of ``spec`` (shapes: see ``patternstore.pattern``)."""
    if isinstance(spec, DilatedSpec):
        return Pattern(spec, _dilated_plan(spec))
    if isinstance(spec, SparseSpec):
        kv_num_blocks, kv_indices = _sparse_layout(spec)
        return Pattern(spec, {"kv_num_blocks": kv_num_blocks, "kv_indices": kv_indices})
    raise TypeError(f"spec must be a DilatedSpec or SparseSpec, got {type(spec).__name__}")


# ------------------------------------------------------------------ dilated
def dilated_head_groups(spec: DilatedSpec) -> list[tuple[int, int, int, int]]:
    """``(branch, offset, head_start, head_stop)`` for every head group.

    longnet: branch i splits the heads into r_i groups of g = ceil(h / r_i);
      head j gets offset j // g (groups past the last head are dropped).
    grouped: branch i runs only on head group i (sizes h // k, the first
      h % k one larger), all with offset i % r_i.
    """
    h, k = spec.num_heads, len(spec.segment_lengths)
    groups = []
    if spec.scheme == "longnet":
        for branch, rate in enumerate(spec.dilation_rates):
            g = -(-h // rate)
            groups += [(branch, o, o * g, min(o * g + g, h)) for o in range(rate) if o * g < h]
    else:
        sizes = [h // k + (1 if i < h % k else 0) for i in range(k)]
        start = 0
        for branch, (rate, size) in enumerate(zip(spec.dilation_rates, sizes)):
            groups.append((branch, branch % rate, start, start + size))
            start += size
    return groups


def _dilated_plan(spec: DilatedSpec) -> dict[str, torch.Tensor]:
    """The length-free groups table: one row per (branch, head group).
    Every offset is < its rate <= its segment, so no group is empty at any
    length; ``dilated_head_groups`` already dropped head ranges past the last head."""
    rows = [
        (branch, spec.segment_lengths[branch], spec.dilation_rates[branch], offset, head_start, head_stop)
        for branch, offset, head_start, head_stop in dilated_head_groups(spec)
    ]
    return {"groups": torch.tensor(rows, dtype=torch.int32).reshape(-1, len(GROUP_COLUMNS))}


# ------------------------------------------------------------------ sparse
def _sparse_layout(spec: SparseSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR layout: the candidate key blocks and "full" rows that the kind's
    entry in ``SPARSE_KINDS`` builds; the unidirectional rule (key block <=
    query block) is applied to both."""
    causal = spec.params["attention"] == "unidirectional"
    context = LayoutContext(spec.params, spec.num_blocks, spec.layout_heads, causal, spec.seed)
    SPARSE_KINDS[spec.kind].build(context)
    heads, nb = context.heads, context.num_blocks
    full = [c.expand(heads, nb, c.shape[-1]) for c in context.candidates]
    all_candidates = torch.cat(full, dim=-1) if full else torch.zeros(heads, nb, 0, dtype=torch.int64)
    return _to_csr(all_candidates, context.full_rows, causal)


def _to_csr(candidates: torch.Tensor, full_rows: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``candidates [H, nb, C]`` (any order, repeats, out-of-range = none) and
    ``full_rows [H, nb]`` (row attends every allowed block) -> sorted,
    duplicate-free CSR ``(kv_num_blocks [H, nb], kv_indices [nnz])``."""
    heads, nb, width = candidates.shape
    rows = torch.arange(nb)
    bad = (candidates < 0) | (candidates >= nb)
    if causal:
        bad |= candidates > rows[:, None]
    columns = candidates.masked_fill(bad, nb).sort(-1).values
    repeated = torch.zeros_like(bad)
    repeated[..., 1:] = columns[..., 1:] == columns[..., :-1]
    columns = columns.masked_fill(repeated, nb).sort(-1).values
    valid = (columns < nb) & ~full_rows[..., None]

    full_length = torch.where(full_rows, (rows + 1) if causal else torch.full_like(rows, nb), 0)
    counts = torch.where(full_rows, full_length, valid.sum(-1)).flatten()
    offsets = torch.cumsum(counts, 0) - counts
    kv_indices = torch.empty(int(counts.sum()), dtype=torch.int32)

    slots = offsets.view(heads, nb, 1) + torch.arange(width)
    kv_indices[slots[valid]] = columns[valid].to(torch.int32)

    lengths = full_length.flatten()
    dense = lengths.nonzero().squeeze(1)
    lengths = lengths[dense]
    row_of = torch.repeat_interleave(torch.arange(dense.numel()), lengths)
    within = torch.arange(row_of.numel()) - (torch.cumsum(lengths, 0) - lengths)[row_of]
    kv_indices[offsets[dense][row_of] + within] = within.to(torch.int32)
    return counts.view(heads, nb).to(torch.int32), kv_indices
