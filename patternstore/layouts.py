"""The sparse layout generators: one builder per kind of
``patternstore.kinds.SPARSE_KINDS`` (``LAYOUT_BUILDERS``, same names), and
the assembly of what they build into the CSR layout (``sparse_layout``).

A builder appends candidate key blocks to ``LayoutContext`` (any order,
repeats and out-of-range entries allowed) and marks "full" rows (rows that
attend every allowed key block); ``sparse_layout`` turns that into the
sorted, duplicate-free CSR layout and applies the unidirectional rule (key
block <= query block). Builders are vectorized torch code: Python loops run
over parameter lists, never over blocks.

Work is bounded by the layout's size: every candidate tensor is at most
``[heads, nb, min(count, nb)]`` for a parameter ``count`` (a window or
global count wider than the row is clipped to the row, which changes no
layout), and random draws are refused above ``nb`` by the spec, so a
typo like ``num_sliding_window_blocks=10**9`` costs what the row costs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from .kinds import dilated_block_branches
from .specs import SparseSpec

__all__ = ["LayoutContext", "LAYOUT_BUILDERS", "sparse_layout"]


@dataclass
class LayoutContext:
    """What a kind's builder reads (``params``, ``num_blocks``, ``heads``:
    the layout's leading dimension, ``causal``, ``seed``) and fills
    (``candidates``: tensors broadcastable to ``[heads, nb, c]``, -1 = none;
    ``full_rows`` bool ``[heads, nb]``)."""

    params: Mapping[str, Any]
    num_blocks: int
    heads: int
    causal: bool
    seed: int
    candidates: list[torch.Tensor] = field(default_factory=list)
    full_rows: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.full_rows = torch.zeros(self.heads, self.num_blocks, dtype=torch.bool)

    @property
    def rows(self) -> torch.Tensor:
        return torch.arange(self.num_blocks, dtype=torch.int64)

    def global_blocks(self) -> torch.Tensor:
        """The blocks ``global_block_indices[i] <= b < global_block_end_indices[i]``
        (one block each when no end indices are given), each once; as in
        DeepSpeed, a range starting at or past the block count is skipped and
        an end past it clipped (an empty tensor when no range is left)."""
        starts, ends = self.params["global_block_indices"], self.params["global_block_end_indices"]
        ends = ends if ends is not None else [s + 1 for s in starts]
        nb = self.num_blocks
        return torch.cat([torch.arange(s, max(s, min(e, nb))) for s, e in zip(starts, ends)]).unique()

    def random_blocks(self, count: int) -> torch.Tensor:
        """``count`` distinct uniform key blocks per (head, query block), from
        ``[0, nb)`` or, causal, ``[0, row]`` (fewer where fewer exist).
        Floyd's sampling, vectorized over all rows: ``[heads, nb, count]``, -1 = none.

        Every draw is a counter-based hash of ``(seed, head, row, step)``, so
        a row's draws do not depend on the number of rows: a causal row gets
        the same blocks at every length (``SparseSpec.is_prefix_stable``)."""
        heads, nb = self.heads, self.num_blocks
        pool = (self.rows + 1) if self.causal else torch.full((nb,), nb)
        pool = pool.expand(heads, nb)
        head = torch.arange(heads, dtype=torch.int64)[:, None]
        stream = _mix(_mix(torch.tensor(self.seed, dtype=torch.int64) + _GOLDEN * (head + 1)) + _GOLDEN * self.rows)
        chosen = torch.full((heads, nb, count), -1, dtype=torch.int64)
        for step in range(count):
            top = pool - count + step                                   # Floyd: draw from [0, top]
            bits = _shift_right(_mix(stream + _int64(_GOLDEN * (step + 1) % (1 << 64))), 11)  # 53 uniform bits
            draw = (bits.to(torch.float64) * 2.0**-53 * (top + 1)).long()
            taken = (chosen[..., :step] == draw[..., None]).any(-1)
            chosen[..., step] = torch.where(top >= 0, torch.where(taken, top, draw), -1)
        return chosen


def _int64(value: int) -> int:
    """A 64-bit constant as the signed int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


# SplitMix64 (Steele, Lea, Flood 2014): its increment and finalizer constants.
# int64 tensor arithmetic wraps modulo 2**64, so the bits equal the unsigned algorithm's.
_GOLDEN = _int64(0x9E3779B97F4A7C15)
_MIX1 = _int64(0xBF58476D1CE4E5B9)
_MIX2 = _int64(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 ``x``."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """The SplitMix64 finalizer: a bijection of 64-bit words that spreads every input bit."""
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def _sliding_window(ctx: LayoutContext) -> None:
    # Offsets past the row's width select nothing: clipping them keeps the layout, bounds the work.
    half = min(ctx.params["num_sliding_window_blocks"] // 2, ctx.num_blocks)
    ctx.candidates.append(ctx.rows[:, None] + torch.arange(-half, half + 1))


# ---------------------------------------------------------------- dense
def _build_dense(ctx: LayoutContext) -> None:
    ctx.full_rows[:] = True


# ---------------------------------------------------------------- fixed
def _build_fixed(ctx: LayoutContext) -> None:
    p, nb, heads, rows = ctx.params, ctx.num_blocks, ctx.heads, ctx.rows
    local, num_global = p["num_local_blocks"], p["num_global_blocks"]
    # Every window starts at a block >= 0, so offsets >= nb select nothing: clipped.
    ctx.candidates.append((rows // local * local)[:, None] + torch.arange(min(local, nb)))
    # Per head: the last num_global blocks of each local window are global
    # (shifted left by num_global for each further pattern).
    head = torch.arange(heads)[:, None]
    first = local - (1 + head % p["num_different_global_patterns"]) * num_global  # [heads, 1]
    complete = nb - nb % local
    if ctx.causal:
        # A partial last window has the global blocks it will have when
        # complete (those that exist yet): a row never depends on the length.
        starts = first + torch.arange(0, nb, local)[None, :]                     # [heads, w]
    else:
        # DeepSpeed's rule: a partial last window keeps its global blocks
        # inside the sequence.
        window_starts = torch.arange(0, max(complete, 1), local)[None, :]
        starts = torch.where(window_starts < complete, first + window_starts, -num_global)
        if complete < nb:
            last = (torch.clamp(complete + first, max=nb - num_global)).clamp(min=0)
            starts = torch.cat([starts, last], dim=1)
    # A start is >= 0 or is -num_global (none): offsets >= nb select nothing either way.
    columns = (starts[:, :, None] + torch.arange(min(num_global, nb))).flatten(1)  # [heads, c]
    columns = torch.where((columns >= 0) & (columns < nb), columns, -1)
    ctx.candidates.append(columns[:, None, :].expand(heads, nb, -1))
    if p["horizontal_global_attention"]:
        valid = columns >= 0
        ctx.full_rows[head.expand_as(columns)[valid], columns[valid]] = True


# ---------------------------------------------------------------- bigbird
def _build_bigbird(ctx: LayoutContext) -> None:
    _sliding_window(ctx)
    num_global = min(ctx.params["num_global_blocks"], ctx.num_blocks)
    ctx.candidates.append(torch.arange(num_global).expand(ctx.num_blocks, num_global))
    ctx.full_rows[:, :num_global] = True
    ctx.candidates.append(ctx.random_blocks(ctx.params["num_random_blocks"]))


# ---------------------------------------------------------------- bslongformer
def _build_bslongformer(ctx: LayoutContext) -> None:
    _sliding_window(ctx)
    columns = ctx.global_blocks()
    ctx.candidates.append(columns.expand(ctx.num_blocks, -1))
    ctx.full_rows[:, columns] = True


# ---------------------------------------------------------------- variable
def _build_variable(ctx: LayoutContext) -> None:
    p, rows = ctx.params, ctx.rows
    sizes = torch.tensor(p["local_window_blocks"])
    explicit_end = int(sizes.sum())
    bounds = torch.cumsum(sizes, 0)
    window = torch.bucketize(rows, bounds, right=True).clamp(max=len(sizes) - 1)  # explicit window id
    last = int(sizes[-1])
    start = torch.where(
        rows < explicit_end,
        bounds[window] - sizes[window],
        explicit_end + (rows - explicit_end) // last * last,
    )
    size = torch.where(rows < explicit_end, sizes[window], last)
    width = torch.arange(min(int(sizes.max()), ctx.num_blocks))  # starts >= 0: wider selects nothing
    ctx.candidates.append(torch.where(width < size[:, None], start[:, None] + width, -1))
    columns = ctx.global_blocks()
    ctx.candidates.append(columns.expand(ctx.num_blocks, -1))
    if p["horizontal_global_attention"]:
        ctx.full_rows[:, columns] = True
    ctx.candidates.append(ctx.random_blocks(p["num_random_blocks"]))


# ---------------------------------------------------------------- local
def _build_local(ctx: LayoutContext) -> None:
    _sliding_window(ctx)


# ---------------------------------------------------------------- dilated_blocks
def _build_dilated_blocks(ctx: LayoutContext) -> None:
    """LongNet at block granularity: per branch (w, r), head j with offset
    o = j // ceil(h / r) links the blocks ``seg + o + r*m`` of each segment.
    Only the branches that add to the layout are built (``dilated_block_branches``)."""
    nb, heads, rows = ctx.num_blocks, ctx.heads, ctx.rows
    ctx.candidates.append(rows[:, None])  # every query block keeps its own block
    head = torch.arange(heads)
    for s, r in dilated_block_branches(ctx.params, nb):
        offset = (head // -(-heads // r))[:, None]                 # [heads, 1]
        seg_start = (rows // s * s)[None, :]                       # [1, nb]
        inside = rows[None, :] - seg_start
        selected = (inside >= offset) & ((inside - offset) % r == 0)
        columns = seg_start[..., None] + offset[..., None] + r * torch.arange(-(-s // r))
        valid = selected[..., None] & (columns < torch.clamp(seg_start + s, max=nb)[..., None])
        ctx.candidates.append(torch.where(valid, columns, -1))


LAYOUT_BUILDERS: dict[str, Callable[[LayoutContext], None]] = {
    "dense": _build_dense,
    "fixed": _build_fixed,
    "bigbird": _build_bigbird,
    "bslongformer": _build_bslongformer,
    "variable": _build_variable,
    "local": _build_local,
    "dilated_blocks": _build_dilated_blocks,
}


# ---------------------------------------------------------------- CSR assembly
def sparse_layout(spec: SparseSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR layout ``(kv_num_blocks [H, nb], kv_indices [nnz])`` of ``spec``:
    the candidate key blocks and "full" rows its kind's builder makes; the
    unidirectional rule (key block <= query block) is applied to both."""
    causal = spec.params["attention"] == "unidirectional"
    context = LayoutContext(spec.params, spec.num_blocks, spec.layout_heads, causal, spec.seed)
    LAYOUT_BUILDERS[spec.kind](context)
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
