"""What generating a spec costs, known from the spec alone before any work,
and the limit that refuses a spec above it (``check_generation``, which
``generate`` calls first, so the store, the modules and the command line all
inherit it). Torch-free: the command line checks specs before importing torch.

``GenerationCost.written`` is an upper bound of the bytes of the arrays that
generation allocates, all of them together (intermediates included), plus a
per-step allowance for the loops that run over branches, draws and head
groups. It bounds the peak memory (what is alive at once is at most what was
allocated; measured: 2.3-5.8 times the peak) and the time (0.6-0.8 ns of
one core per estimated byte for every kind, so 4 GiB is about 3 s here):
``tools/bench_generation_cost.py``, docs/bench.md. ``layout`` is an upper
bound of the bytes of the arrays returned.

The per-element factors below follow the generators' code
(``patternstore.layouts``, ``patternstore.generate``): each counts the
arrays one candidate, random draw or full-row element passes through, with
room to spare; ``tests/test_generation_cost.py`` holds every kind to them by
counting what a generation really allocates.

The limit: ``max_bytes`` where given, else ``$PATTERNSTORE_MAX_GENERATION_BYTES``
(bytes, or a size such as ``16GiB``), else ``DEFAULT_MAX_GENERATION_BYTES``
(4 GiB). Limits: the bound is of arrays, not of Python's own objects beside
them (a few hundred bytes per loop step, counted in the allowance); an
estimate that is an upper bound refuses some specs whose real cost is below
the limit (up to a few times below it; a refusal names the estimate, so the
limit can be raised for them).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from .kinds import dilated_block_branches
from .sizes import format_size, parse_size
from .specs import DilatedSpec, SparseSpec, Spec

__all__ = [
    "GenerationCost", "SpecTooLarge", "generation_cost", "check_generation", "max_generation_bytes", "generation_limit",
    "DEFAULT_MAX_GENERATION_BYTES", "MAX_GENERATION_BYTES_ENV",
]

DEFAULT_MAX_GENERATION_BYTES = 4 << 30
MAX_GENERATION_BYTES_ENV = "PATTERNSTORE_MAX_GENERATION_BYTES"

# Bytes allocated per element, by what the element is (see the module docstring):
_PER_CANDIDATE = 160   # a [heads, nb, width] candidate: built, concatenated, masked, sorted twice, placed
_PER_DRAW = 200        # a random draw: ~190 bytes of hashing per (head, row) and step, plus the draw
_PER_FULL = 80         # an element of a full row: the row, position and offset arrays that place it (~64)
_PER_RANGE = 48        # a global-range block before its duplicates are dropped (cat, unique)
_PER_ROW = 256         # per (head, row): counts, offsets, the random stream, the row masks
_PER_STEP = 64 << 10   # a loop step over branches, draws or head groups: the torch calls it makes
_BASE = 1 << 20        # a generation's fixed arrays
_PER_GROUP = 24        # one row of a dilated groups table (6 int32)


class SpecTooLarge(ValueError):
    """A spec whose generation would cost more than the limit (one-line message)."""


@dataclass(frozen=True)
class GenerationCost:
    """``written``: bytes of arrays generation allocates (an upper bound);
    ``layout``: bytes of the arrays it returns (an upper bound); ``driver``:
    the spec fields that make it this large, for messages."""

    written: int
    layout: int
    driver: str


def max_generation_bytes() -> int:
    """The limit when none is given: ``$PATTERNSTORE_MAX_GENERATION_BYTES``, else 4 GiB."""
    text = os.environ.get(MAX_GENERATION_BYTES_ENV)
    return DEFAULT_MAX_GENERATION_BYTES if text is None else parse_size(MAX_GENERATION_BYTES_ENV, text)


@contextmanager
def generation_limit(limit: int) -> Iterator[None]:
    """``limit`` as ``$PATTERNSTORE_MAX_GENERATION_BYTES`` while active (worker
    processes started meanwhile inherit it), the previous setting after."""
    previous = os.environ.get(MAX_GENERATION_BYTES_ENV)
    os.environ[MAX_GENERATION_BYTES_ENV] = str(limit)
    try:
        yield
    finally:
        if previous is None:
            del os.environ[MAX_GENERATION_BYTES_ENV]
        else:
            os.environ[MAX_GENERATION_BYTES_ENV] = previous


def check_generation(spec: Spec, max_bytes: int | None = None) -> GenerationCost:
    """The cost of generating ``spec``; ``SpecTooLarge`` (a ``ValueError``)
    when it is above ``max_bytes`` (None: ``max_generation_bytes()``)."""
    limit = max_generation_bytes() if max_bytes is None else max_bytes
    cost = generation_cost(spec)
    if cost.written > limit:
        raise SpecTooLarge(
            f"{spec.kind} spec too large to generate: an estimated {format_size(cost.written)} of arrays "
            f"(the layout alone up to {format_size(cost.layout)}) for {cost.driver}; the limit is "
            f"{format_size(limit)} (raise it with {MAX_GENERATION_BYTES_ENV}=SIZE, the command line's "
            "--max-generation-bytes SIZE, or generate(spec, max_bytes=...))"
        )
    return cost


def generation_cost(spec: Spec) -> GenerationCost:
    """What generating ``spec`` costs (see the module docstring)."""
    if isinstance(spec, DilatedSpec):
        return _dilated_cost(spec)
    if isinstance(spec, SparseSpec):
        return _sparse_cost(spec)
    raise TypeError(f"spec must be a DilatedSpec or SparseSpec, got {type(spec).__name__}")


def _dilated_cost(spec: DilatedSpec) -> GenerationCost:
    """One loop step per offset tried (``dilated_head_groups``), one table row per head group."""
    h, rates = spec.num_heads, spec.dilation_rates
    if spec.scheme == "longnet":
        steps = sum(min(r, h) for r in rates)
        rows = sum(-(-h // -(-h // r)) for r in rates)  # groups of g = ceil(h / r) heads
    else:
        steps = rows = len(rates)
    layout = rows * _PER_GROUP
    return GenerationCost(_BASE + steps * _PER_STEP + 2 * layout, layout,
                          f"{rows} head groups (num_heads={h}, dilation_rates up to {max(rates)}, "
                          f"{len(rates)} branches)")


def _sparse_cost(spec: SparseSpec) -> GenerationCost:
    nb, heads, p = spec.num_blocks, spec.layout_heads, spec.params
    causal = p["attention"] == "unidirectional"
    widths, full_rows, draws, ranges, steps = _SHAPES[spec.kind](p, nb)
    width = sum(widths.values())
    full = full_rows * nb - (full_rows * (full_rows - 1) // 2 if causal else 0)  # the longest rows, causal or not
    nnz = min(heads * nb * nb, heads * (nb * min(width, nb) + full))
    layout = 4 * (heads * nb + nnz)
    written = (_BASE + layout + steps * _PER_STEP + heads * nb * (
        _PER_ROW + _PER_CANDIDATE * width + draws * (_PER_DRAW + draws // 2))
        + _PER_FULL * heads * full + _PER_RANGE * ranges)
    parts = [f"{nb} blocks (seq_len={spec.seq_len}, block_size={spec.block_size})",
             f"{heads} layout head{'s' if heads > 1 else ''}"]
    if widths:
        field, widest = max(widths.items(), key=lambda item: item[1])
        parts.append(f"{width} candidate blocks per row ({widest} from {field})")
    if full_rows:
        parts.append(f"{full_rows} full rows")
    if draws:
        parts.append(f"num_random_blocks={draws}")
    return GenerationCost(written, layout, ", ".join(parts))


# ---------------------------------------------------------------- each kind's shape
# A kind's shape over nb blocks: (candidate columns per row by the field that
# makes them, rows that may be full, random draws per row, global-range blocks
# before deduplication, loop steps), following its builder in
# ``patternstore.layouts`` (a test holds the two tables to the same kinds).
_Shape = tuple[dict[str, int], int, int, int, int]


def _window(p: Mapping[str, Any], nb: int) -> int:
    return 2 * min(p["num_sliding_window_blocks"] // 2, nb) + 1


def _ranges(p: Mapping[str, Any]) -> int:
    starts, ends = p["global_block_indices"], p["global_block_end_indices"]
    return len(starts) if ends is None else sum(e - s for s, e in zip(starts, ends))


def _dense(p: Mapping[str, Any], nb: int) -> _Shape:
    return {}, nb, 0, 0, 0


def _fixed(p: Mapping[str, Any], nb: int) -> _Shape:
    local, glob = p["num_local_blocks"], min(p["num_global_blocks"], nb)
    columns = (-(-nb // local) + 1) * glob  # global blocks of every window, a partial last one included
    full = min(nb, columns) if p["horizontal_global_attention"] else 0
    return {"num_local_blocks": min(local, nb), "num_global_blocks": columns}, full, 0, 0, 0


def _bigbird(p: Mapping[str, Any], nb: int) -> _Shape:
    glob, draws = min(p["num_global_blocks"], nb), p["num_random_blocks"]
    return ({"num_sliding_window_blocks": _window(p, nb), "num_global_blocks": glob, "num_random_blocks": draws},
            glob, draws, 0, draws)


def _bslongformer(p: Mapping[str, Any], nb: int) -> _Shape:
    ranges = _ranges(p)
    glob = min(ranges, nb)
    return ({"num_sliding_window_blocks": _window(p, nb), "global_block_indices": glob}, glob, 0, ranges,
            len(p["global_block_indices"]))


def _variable(p: Mapping[str, Any], nb: int) -> _Shape:
    ranges, draws = _ranges(p), p["num_random_blocks"]
    glob = min(ranges, nb)
    widths = {"local_window_blocks": min(max(p["local_window_blocks"]), nb), "global_block_indices": glob,
              "num_random_blocks": draws}
    full = glob if p["horizontal_global_attention"] else 0
    return widths, full, draws, ranges + len(p["local_window_blocks"]), len(p["global_block_indices"]) + draws


def _local(p: Mapping[str, Any], nb: int) -> _Shape:
    return {"num_sliding_window_blocks": _window(p, nb)}, 0, 0, 0, 0


def _dilated_blocks(p: Mapping[str, Any], nb: int) -> _Shape:
    branches = dilated_block_branches(p, nb)
    columns = 1 + sum(-(-s // r) for s, r in branches)  # the own block, then each branch's blocks
    return {"segment_lengths": columns}, 0, 0, 0, len(branches)


_SHAPES = {
    "dense": _dense, "fixed": _fixed, "bigbird": _bigbird, "bslongformer": _bslongformer,
    "variable": _variable, "local": _local, "dilated_blocks": _dilated_blocks,
}
