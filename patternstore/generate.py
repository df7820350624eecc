"""Generators: ``generate(spec) -> Pattern``, pure and deterministic.

Vectorized torch code: Python loops run over branches, head groups and
parameter lists, never over positions or blocks. Random blocks come from a
CPU ``torch.Generator`` seeded with ``spec.seed``, so every process and every
rank gets bit-identical arrays (for one torch version; the format version in
the key is bumped whenever the output changes).
"""

from __future__ import annotations

import torch

from .pattern import GROUP_COLUMNS, Pattern
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
    """CSR layout: candidate key blocks per (head, query block), plus "full"
    rows that attend every key block (global rows); the unidirectional rule
    (key block <= query block) is applied to both."""
    p, nb, heads = spec.params, spec.num_blocks, spec.layout_heads
    causal = p["attention"] == "unidirectional"
    rows = torch.arange(nb, dtype=torch.int64)
    generator = torch.Generator().manual_seed(spec.seed)
    candidates: list[torch.Tensor] = []  # each broadcastable to [heads, nb, c]; -1 = none
    full_rows = torch.zeros(heads, nb, dtype=torch.bool)

    def global_blocks() -> torch.Tensor:
        starts, ends = p["global_block_indices"], p["global_block_end_indices"]
        ends = ends if ends is not None else [s + 1 for s in starts]
        return torch.cat([torch.arange(s, e) for s, e in zip(starts, ends)]).unique()

    if spec.kind == "dense":
        full_rows[:] = True
    elif spec.kind in ("local", "bigbird", "bslongformer"):
        half = p["num_sliding_window_blocks"] // 2
        candidates.append(rows[:, None] + torch.arange(-half, half + 1))
        if spec.kind == "bigbird":
            num_global = min(p["num_global_blocks"], nb)
            candidates.append(torch.arange(num_global).expand(nb, num_global))
            full_rows[:, :num_global] = True
            candidates.append(_random_blocks(generator, heads, nb, p["num_random_blocks"], causal))
        elif spec.kind == "bslongformer":
            columns = global_blocks()
            candidates.append(columns.expand(nb, -1))
            full_rows[:, columns] = True
    elif spec.kind == "fixed":
        local, num_global = p["num_local_blocks"], p["num_global_blocks"]
        candidates.append((rows // local * local)[:, None] + torch.arange(local))
        # Per head: the last num_global blocks of each local window are global
        # (shifted left by num_global for each further pattern); a partial last
        # window keeps its global blocks inside the sequence.
        head = torch.arange(heads)[:, None]
        first = local - (1 + head % p["num_different_global_patterns"]) * num_global  # [heads, 1]
        complete = nb - nb % local
        window_starts = torch.arange(0, max(complete, 1), local)[None, :]
        starts = first + window_starts                                               # [heads, w]
        starts = torch.where(window_starts < complete, starts, -num_global)
        if complete < nb:
            last = (torch.clamp(complete + first, max=nb - num_global)).clamp(min=0)
            starts = torch.cat([starts, last], dim=1)
        columns = (starts[:, :, None] + torch.arange(num_global)).flatten(1)         # [heads, c]
        columns = torch.where((columns >= 0) & (columns < nb), columns, -1)
        candidates.append(columns[:, None, :].expand(heads, nb, -1))
        if p["horizontal_global_attention"]:
            valid = columns >= 0
            full_rows[head.expand_as(columns)[valid], columns[valid]] = True
    elif spec.kind == "variable":
        sizes = torch.tensor(p["local_window_blocks"])
        explicit_end = int(sizes.sum())
        bounds = torch.cumsum(sizes, 0)
        window = torch.bucketize(rows, bounds, right=True)                          # explicit window id
        last = int(sizes[-1])
        start = torch.where(
            rows < explicit_end,
            bounds[window.clamp(max=len(sizes) - 1)] - sizes[window.clamp(max=len(sizes) - 1)],
            explicit_end + (rows - explicit_end) // last * last,
        )
        size = torch.where(rows < explicit_end, sizes[window.clamp(max=len(sizes) - 1)], last)
        width = torch.arange(int(sizes.max()))
        candidates.append(torch.where(width < size[:, None], start[:, None] + width, -1))
        columns = global_blocks()
        candidates.append(columns.expand(nb, -1))
        if p["horizontal_global_attention"]:
            full_rows[:, columns] = True
        candidates.append(_random_blocks(generator, heads, nb, p["num_random_blocks"], causal))
    elif spec.kind == "dilated_blocks":
        candidates.append(rows[:, None])  # every query block keeps its own block
        candidates += _dilated_block_columns(spec, rows)
    else:  # pragma: no cover - SparseSpec validated the kind
        raise AssertionError(spec.kind)

    full = [c.expand(heads, nb, c.shape[-1]) for c in candidates]
    all_candidates = torch.cat(full, dim=-1) if full else torch.zeros(heads, nb, 0, dtype=torch.int64)
    return _to_csr(all_candidates, full_rows, causal)


def _dilated_block_columns(spec: SparseSpec, rows: torch.Tensor) -> list[torch.Tensor]:
    """LongNet at block granularity: per branch (w, r), head j with offset
    o = j // ceil(h / r) links the blocks ``seg + o + r*m`` of each segment."""
    nb, heads = spec.num_blocks, spec.layout_heads
    head = torch.arange(heads)
    out = []
    for w, r in zip(spec.params["segment_lengths"], spec.params["dilation_rates"]):
        s = min(w, nb)
        offset = (head // -(-heads // r))[:, None]                 # [heads, 1]
        seg_start = (rows // s * s)[None, :]                       # [1, nb]
        inside = rows[None, :] - seg_start
        selected = (inside >= offset) & ((inside - offset) % r == 0)
        columns = seg_start[..., None] + offset[..., None] + r * torch.arange(-(-s // r))
        valid = selected[..., None] & (columns < torch.clamp(seg_start + s, max=nb)[..., None])
        out.append(torch.where(valid, columns, -1))
    return out


def _random_blocks(
    generator: torch.Generator, heads: int, nb: int, count: int, causal: bool
) -> torch.Tensor:
    """``count`` distinct uniform key blocks per (head, query block), from
    ``[0, nb)`` or, unidirectional, ``[0, row]`` (fewer where fewer exist).
    Floyd's sampling, vectorized over all rows: ``[heads, nb, count]``, -1 = none."""
    pool = (torch.arange(nb) + 1) if causal else torch.full((nb,), nb)
    pool = pool.expand(heads, nb)
    chosen = torch.full((heads, nb, count), -1, dtype=torch.int64)
    for step in range(count):
        top = pool - count + step                                   # Floyd: draw from [0, top]
        draw = (torch.rand(heads, nb, generator=generator, dtype=torch.float64) * (top + 1)).long()
        taken = (chosen[..., :step] == draw[..., None]).any(-1)
        chosen[..., step] = torch.where(top >= 0, torch.where(taken, top, draw), -1)
    return chosen


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
