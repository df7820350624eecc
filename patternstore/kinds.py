"""The sparse kinds, each in one entry: its parameters (defaults, checks,
help), its cross-field checks, its layout generator and whether its causal
layout is length-free.

``SparseSpec`` validates through ``SPARSE_KINDS[kind]``, ``generate`` builds
the layout through it, and the spec text grammar and the command line's help
list its fields from it: adding a kind is adding one ``SparseKind`` here.

Parameter names and defaults are DeepSpeed's sparsity configs where DeepSpeed
has the kind. A generator appends candidate key blocks to ``LayoutContext``
(any order, repeats and out-of-range entries allowed) and marks "full" rows
(rows that attend every allowed key block); ``generate`` turns that into the
sorted CSR layout and applies the unidirectional rule (key block <= query
block). Generators are vectorized torch code: Python loops run over
parameter lists, never over blocks.

Causal prefix property (docs/design.md section 7): with
``attention="unidirectional"`` every kind's layout at a length is exactly the
first rows of its layout at any longer length, so a capacity layout serves
every shorter length (``patternstore.csr.prefix_rows``). ``prefix_stable``
says whether that also holds for a bidirectional layout under the causal
rule; random blocks of a bidirectional row are drawn from the whole row, so
there it does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from .fields import (
    Field,
    check_bool,
    check_branches,
    check_int,
    check_int_tuple,
    check_nonneg_int,
    check_nonneg_int_tuple,
    check_optional_nonneg_int_tuple,
    choice,
)

__all__ = ["SparseKind", "LayoutContext", "SPARSE_KINDS", "DIRECTIONS"]

DIRECTIONS = ("bidirectional", "unidirectional")


@dataclass
class LayoutContext:
    """What a kind's generator reads (``params``, ``num_blocks``, ``heads``:
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
        (one block each when no end indices are given), each once."""
        starts, ends = self.params["global_block_indices"], self.params["global_block_end_indices"]
        ends = ends if ends is not None else [s + 1 for s in starts]
        return torch.cat([torch.arange(s, e) for s, e in zip(starts, ends)]).unique()

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


@dataclass(frozen=True)
class SparseKind:
    """One sparse kind: ``params`` (its fields beyond seq_len, block_size,
    num_heads, seed), ``check(params, num_blocks)`` (cross-field rules,
    raising ``ValueError``), ``build(context)`` (the generator),
    ``per_head(params)`` (whether heads get different layouts) and
    ``prefix_stable(params)`` (whether its layout under the causal rule is
    length-free: the layout at a shorter length is the first rows of the
    layout at any longer one)."""

    name: str
    help: str
    params: tuple[Field, ...]
    build: Callable[[LayoutContext], None]
    check: Callable[[Mapping[str, Any], int], None] = lambda params, num_blocks: None
    per_head: Callable[[Mapping[str, Any]], bool] = lambda params: bool(params.get("different_layout_per_head"))
    prefix_stable: Callable[[Mapping[str, Any]], bool] = lambda params: True


# ---------------------------------------------------------------- shared parameters and rules
def _attention(default: str = "bidirectional") -> Field:
    return Field("attention", choice(*DIRECTIONS), default,
                 "unidirectional: key block <= query block (causal)")


_PER_HEAD = Field("different_layout_per_head", check_bool, False, "each head its own layout")
_HORIZONTAL = Field("horizontal_global_attention", check_bool, False,
                    "global blocks also attend every block (bidirectional only)")
_SLIDING = Field("num_sliding_window_blocks", check_int, 3, "blocks of the window centred on the query block")
_GLOBAL_STARTS = Field("global_block_indices", check_nonneg_int_tuple, (0,), "first block of each global range",
                       is_list=True)
_GLOBAL_ENDS = Field("global_block_end_indices", check_optional_nonneg_int_tuple, None,
                     "end (exclusive) of each global range; default: one block each", is_list=True)


def _causal(params: Mapping[str, Any]) -> bool:
    return params["attention"] == "unidirectional"


def _no_random_or_causal(params: Mapping[str, Any]) -> bool:
    """Random blocks of a bidirectional row are drawn from the whole row, so
    they depend on the length; causal rows draw from ``[0, row]`` only."""
    return _causal(params) or params["num_random_blocks"] == 0


def _check_horizontal(params: Mapping[str, Any]) -> None:
    if params["horizontal_global_attention"] and params["attention"] != "bidirectional":
        raise ValueError("horizontal_global_attention=True needs attention='bidirectional'")


def _check_global_blocks(params: Mapping[str, Any], num_blocks: int) -> None:
    starts, ends = params["global_block_indices"], params["global_block_end_indices"]
    if max(starts) >= num_blocks:
        raise ValueError(
            f"global_block_indices must be < the number of blocks ({num_blocks}), got {list(starts)}"
        )
    if ends is None:
        return
    if len(ends) != len(starts):
        raise ValueError(
            f"global_block_end_indices must have one entry per global_block_indices entry "
            f"({len(starts)}), got {len(ends)}"
        )
    for i, (start, end) in enumerate(zip(starts, ends)):
        if not start < end <= num_blocks:
            raise ValueError(
                f"global_block_end_indices[{i}]={end} must be > global_block_indices[{i}]={start} "
                f"and <= the number of blocks ({num_blocks})"
            )


def _sliding_window(ctx: LayoutContext) -> None:
    half = ctx.params["num_sliding_window_blocks"] // 2
    ctx.candidates.append(ctx.rows[:, None] + torch.arange(-half, half + 1))


# ---------------------------------------------------------------- dense
def _build_dense(ctx: LayoutContext) -> None:
    ctx.full_rows[:] = True


# ---------------------------------------------------------------- fixed
def _check_fixed(params: Mapping[str, Any], num_blocks: int) -> None:
    _check_horizontal(params)
    local, glob = params["num_local_blocks"], params["num_global_blocks"]
    if local % glob:
        raise ValueError(f"num_local_blocks ({local}) must be a multiple of num_global_blocks ({glob})")
    patterns = params["num_different_global_patterns"]
    if patterns > local // glob:
        raise ValueError(
            f"num_different_global_patterns must be <= num_local_blocks // num_global_blocks "
            f"= {local // glob}, got {patterns}"
        )
    if patterns > 1 and not params["different_layout_per_head"]:
        raise ValueError("num_different_global_patterns > 1 needs different_layout_per_head=True")


def _build_fixed(ctx: LayoutContext) -> None:
    p, nb, heads, rows = ctx.params, ctx.num_blocks, ctx.heads, ctx.rows
    local, num_global = p["num_local_blocks"], p["num_global_blocks"]
    ctx.candidates.append((rows // local * local)[:, None] + torch.arange(local))
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
    columns = (starts[:, :, None] + torch.arange(num_global)).flatten(1)         # [heads, c]
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
def _check_variable(params: Mapping[str, Any], num_blocks: int) -> None:
    _check_horizontal(params)
    _check_global_blocks(params, num_blocks)


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
    width = torch.arange(int(sizes.max()))
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
def _check_dilated_blocks(params: Mapping[str, Any], num_blocks: int) -> None:
    check_branches(params["segment_lengths"], params["dilation_rates"], unit=" blocks")


def _build_dilated_blocks(ctx: LayoutContext) -> None:
    """LongNet at block granularity: per branch (w, r), head j with offset
    o = j // ceil(h / r) links the blocks ``seg + o + r*m`` of each segment."""
    nb, heads, rows = ctx.num_blocks, ctx.heads, ctx.rows
    ctx.candidates.append(rows[:, None])  # every query block keeps its own block
    head = torch.arange(heads)
    for w, r in zip(ctx.params["segment_lengths"], ctx.params["dilation_rates"]):
        s = min(w, nb)
        offset = (head // -(-heads // r))[:, None]                 # [heads, 1]
        seg_start = (rows // s * s)[None, :]                       # [1, nb]
        inside = rows[None, :] - seg_start
        selected = (inside >= offset) & ((inside - offset) % r == 0)
        columns = seg_start[..., None] + offset[..., None] + r * torch.arange(-(-s // r))
        valid = selected[..., None] & (columns < torch.clamp(seg_start + s, max=nb)[..., None])
        ctx.candidates.append(torch.where(valid, columns, -1))


# ---------------------------------------------------------------- the registry
SPARSE_KINDS: dict[str, SparseKind] = {
    kind.name: kind
    for kind in (
        SparseKind(
            "dense", "every query block attends every key block",
            (_attention(),), _build_dense,
        ),
        SparseKind(
            "fixed", "local windows plus the last blocks of each window as global columns (Sparse Transformer)",
            (
                Field("num_local_blocks", check_int, 4, "blocks of each local window"),
                Field("num_global_blocks", check_int, 1, "global blocks at the end of each window"),
                _attention(),
                _HORIZONTAL,
                Field("num_different_global_patterns", check_int, 1, "head groups with shifted global blocks"),
                _PER_HEAD,
            ),
            _build_fixed, check=_check_fixed, prefix_stable=_causal,
        ),
        SparseKind(
            "bigbird", "sliding window, global first blocks and random blocks (BigBird)",
            (
                Field("num_random_blocks", check_nonneg_int, 1, "random key blocks per query block"),
                _SLIDING,
                Field("num_global_blocks", check_nonneg_int, 1, "first blocks that attend and are attended by all"),
                _attention(),
                _PER_HEAD,
            ),
            _build_bigbird, prefix_stable=_no_random_or_causal,
        ),
        SparseKind(
            "bslongformer", "sliding window plus global block ranges (block-sparse Longformer)",
            (_SLIDING, _GLOBAL_STARTS, _GLOBAL_ENDS, _attention()),
            _build_bslongformer, check=_check_global_blocks, per_head=lambda params: False,
        ),
        SparseKind(
            "variable", "local windows of given sizes, global ranges and random blocks",
            (
                Field("num_random_blocks", check_nonneg_int, 0, "random key blocks per query block"),
                Field("local_window_blocks", check_int_tuple, (4,),
                      "sizes of the first local windows; the last repeats", is_list=True),
                _GLOBAL_STARTS,
                _GLOBAL_ENDS,
                _attention(),
                _HORIZONTAL,
                _PER_HEAD,
            ),
            _build_variable, check=_check_variable, prefix_stable=_no_random_or_causal,
        ),
        SparseKind(
            "local", "causal sliding window",
            (_SLIDING, _attention("unidirectional")),
            _build_local,
        ),
        SparseKind(
            "dilated_blocks", "LongNet dilated attention at block granularity, heads at different offsets",
            (
                Field("segment_lengths", check_int_tuple, (4,), "segment length of each branch, in blocks", is_list=True),
                Field("dilation_rates", check_int_tuple, (1,), "dilation rate of each branch", is_list=True),
                _attention(),
            ),
            _build_dilated_blocks, check=_check_dilated_blocks, per_head=lambda params: True,
        ),
    )
}
