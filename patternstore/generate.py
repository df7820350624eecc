"""Generators: ``generate(spec) -> Pattern``, pure and deterministic.

Bounded: a spec whose generation would allocate more than the limit is
refused before any work (``patternstore.cost.check_generation``:
``SpecTooLarge``, a ``ValueError`` naming the estimate, the fields that make
it and the limit), so the store, the modules and the command line refuse it
alike instead of running out of memory.

Vectorized torch code: Python loops run over branches, head groups and
parameter lists, never over positions or blocks. A sparse kind's generator is
its builder in ``patternstore.layouts``, which also assembles the CSR
layout. Random blocks come from ``spec.seed``, so every process and every
rank gets bit-identical arrays (the format version in the key is bumped
whenever the output changes).
"""

from __future__ import annotations

import torch

from .cost import check_generation
from .dilated_groups import GROUP_COLUMNS
from .layouts import sparse_layout
from .pattern import Pattern
from .specs import DilatedSpec, SparseSpec, Spec

__all__ = ["generate", "dilated_head_groups"]


def generate(spec: Spec, *, max_bytes: int | None = None) -> Pattern:
    """Build the arrays of ``spec`` (shapes: see ``patternstore.pattern``).
    ``SpecTooLarge`` first when that would allocate more than ``max_bytes``
    (None: ``$PATTERNSTORE_MAX_GENERATION_BYTES``, else 4 GiB)."""
    check_generation(spec, max_bytes)
    if isinstance(spec, DilatedSpec):
        return Pattern(spec, _dilated_plan(spec))
    if isinstance(spec, SparseSpec):
        kv_num_blocks, kv_indices = sparse_layout(spec)
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
            # o * g < h with g >= 1 implies o < h: bounded by the heads, not the rate (up to 2^31 - 1)
            groups += [(branch, o, o * g, min(o * g + g, h)) for o in range(min(rate, h)) if o * g < h]
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
