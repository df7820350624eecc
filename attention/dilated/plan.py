"""The dilated plan and its public geometry (docs/design.md sections 2.1 and 5).

A plan (``DilatedPlan``) is the length-free ``groups`` table of a store
pattern as Python ints: one ``Group`` row per (branch, head group); the row
type and its stored columns are ``patternstore.dilated_groups``' (one schema,
written by the generator, read here). Everything that depends on the length
(s = min(w, n), the number of full segments, rows per segment, the tail, where
the queries start) is derived from concrete lengths by ``pieces``, so a plan
serves every length and a compiled graph never specializes on it.

Geometry, for the last ``q_len`` of ``kv_len`` positions (decode rows and
chunked prefill are the bottom-right rows of the full forward):
- ``pieces(group, q_len, kv_len)``: the group's kernel problems (``Piece``),
  each a strided view of the sequence (``view``): no gather, no index tensor,
  and a query row costs the keys it attends;
- ``DilatedPlan.pieces(q_len, kv_len)``: (group, piece) for the whole plan;
- ``computed_pairs(plan, q_len, kv_len)``: the (query, key, head) pairs the
  per-branch kernels compute without a causal rule (the "useful" work of
  docs/design.md section 8).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from patternstore.dilated_groups import GROUP_COLUMNS, Group
from patternstore.pattern import Pattern
from patternstore.specs import DilatedSpec

__all__ = [
    "DilatedPlan",
    "Piece",
    "pieces",
    "view",
    "head_runs",
    "computed_pairs",
    "check_plan",
    "groups_from_flat",
    "Branches",
    "plan_branches",
    "branch_offsets",
]


class Piece(NamedTuple):
    """One kernel problem of a group at given lengths: ``count`` segments
    (regions ``region`` rows long, one after another) of queries from q row
    ``q_start`` and of keys from k row ``k_start``; in each region the rows
    ``offset, offset + rate, ...`` are selected: ``q_rows`` queries, the last
    ones of the ``k_rows`` keys (so a causal piece is bottom-right aligned)."""

    count: int
    rate: int
    q_start: int
    q_region: int
    q_offset: int
    q_rows: int
    k_start: int
    k_region: int
    k_offset: int
    k_rows: int


class DilatedPlan(NamedTuple):
    """What a kernel needs of a dilated pattern, as plain ints: valid for
    every sequence length."""

    num_heads: int
    groups: tuple[Group, ...]

    @classmethod
    def from_pattern(cls, pattern: Pattern) -> "DilatedPlan":
        spec = pattern.spec
        if not isinstance(spec, DilatedSpec):
            raise ValueError(f"a dilated plan needs a DilatedSpec pattern, got {spec.kind!r}")
        return cls(spec.num_heads, tuple(Group(*row) for row in pattern["groups"].tolist()))

    @classmethod
    def from_flat(cls, num_heads: int, flat_plan: Sequence[int]) -> "DilatedPlan":
        """The plan whose group rows, back to back, are ``flat_plan`` (``flat``'s inverse)."""
        return cls(num_heads, tuple(groups_from_flat(flat_plan)))

    @property
    def flat(self) -> tuple[int, ...]:
        """The group rows back to back: the form the custom ops take."""
        return tuple(value for g in self.groups for value in g)

    def pieces(self, q_len: int, kv_len: int) -> list[tuple[Group, Piece]]:
        """Every group's kernel problems for the last ``q_len`` of ``kv_len`` positions."""
        return [(g, p) for g in self.groups for p in pieces(g, q_len, kv_len)]


def groups_from_flat(flat_plan: Sequence[int]) -> list[Group]:
    """The ``Group`` rows of a flat plan (``DilatedPlan.flat``)."""
    width = len(GROUP_COLUMNS)
    if len(flat_plan) % width:
        raise ValueError(f"a flat plan holds {width} ints per group; got {len(flat_plan)} ints")
    return [Group(*flat_plan[i : i + width]) for i in range(0, len(flat_plan), width)]


def selected(length: int, offset: int, rate: int) -> int:
    """How many of the rows ``offset + rate * m`` lie in ``[0, length)``."""
    return max(0, -(-(length - offset) // rate))


def pieces(g: Group, q_len: int, kv_len: int) -> list[Piece]:
    """The kernel problems of group ``g`` for the last ``q_len`` of ``kv_len``
    positions: in every segment the queries are a suffix of the segment (they
    run to the end of the sequence), so each piece's selected queries are
    the last of its selected keys. Pieces: the segment the queries start
    inside (if they start mid-segment), the whole segments after it (one
    batched piece), and the shorter last segment."""
    s, r, o = min(g.segment, kv_len), g.rate, g.offset
    first_query = kv_len - q_len
    full = kv_len // s
    found = []
    t = first_query // s  # the first segment that holds a query
    if first_query % s:
        start, stop = t * s, min(t * s + s, kv_len)
        first = start + o + r * max(0, -(-(first_query - start - o) // r))  # first selected query position
        q_rows = selected(stop - first, 0, r)
        if q_rows:
            found.append(Piece(1, r, first - first_query, stop - first, 0, q_rows,
                               start, stop - start, o, selected(stop - start, o, r)))
        t += 1
    rows = selected(s, o, r)
    if t < full and rows:
        found.append(Piece(full - t, r, t * s - first_query, s, o, rows, t * s, s, o, rows))
    tail = kv_len - full * s
    if tail and t <= full and selected(tail, o, r):
        rows = selected(tail, o, r)
        found.append(Piece(1, r, full * s - first_query, tail, o, rows, full * s, tail, o, rows))
    return found


def view(x: Tensor, piece: Piece, queries: bool) -> Tensor:
    """The rows of ``x`` (b, L, ...) a piece selects, as a view (b, count, rows, ...)."""
    if queries:
        start, region, offset, rows = piece.q_start, piece.q_region, piece.q_offset, piece.q_rows
    else:
        start, region, offset, rows = piece.k_start, piece.k_region, piece.k_offset, piece.k_rows
    regions = x[:, start : start + piece.count * region].unflatten(1, (piece.count, region))
    return regions[:, :, offset : offset + (rows - 1) * piece.rate + 1 : piece.rate]


def head_runs(g: Group, group_size: int) -> list[tuple[slice, slice]]:
    """(query heads, key/value heads) of a group under GQA (``group_size``
    query heads per key/value head): the group's heads cut where a
    key/value head's whole set of query heads begins or ends, so every run is
    either whole key/value heads or part of one, a valid grouped call."""
    start, stop = g.head_start, g.head_stop
    whole_from, whole_to = -(-start // group_size) * group_size, stop // group_size * group_size
    cuts = sorted({start, stop} | {x for x in (whole_from, whole_to) if start < x < stop})
    return [(slice(a, b), slice(a // group_size, -(-b // group_size))) for a, b in zip(cuts, cuts[1:])]


def computed_pairs(plan: DilatedPlan, q_len: int, kv_len: int) -> int:
    """(query, key, head) pairs the per-branch kernels compute for the last
    ``q_len`` of ``kv_len`` positions, no causal rule applied."""
    return sum((g.head_stop - g.head_start) * p.count * p.q_rows * p.k_rows for g, p in plan.pieces(q_len, kv_len))


def check_plan(plan: object, num_heads: Optional[int] = None) -> DilatedPlan:
    """The one check of a plan: ValueError naming the field unless ``plan`` is
    a ``DilatedPlan`` (for ``num_heads`` heads, when given) whose groups have
    ``segment >= 1``, ``rate >= 1``, ``0 <= offset < rate`` and a head range
    inside ``[0, num_heads)``. Returns the plan."""
    if not isinstance(plan, DilatedPlan):
        raise ValueError(f"plan must be a DilatedPlan, got {type(plan).__name__}")
    if num_heads is not None and plan.num_heads != num_heads:
        raise ValueError(f"plan is for num_heads={plan.num_heads}; q has num_heads={num_heads}")
    if not plan.groups:
        raise ValueError("plan.groups must not be empty")
    for g in plan.groups:
        if g.segment < 1 or g.rate < 1:
            raise ValueError(f"plan group {g}: segment and rate must be >= 1")
        if not 0 <= g.offset < g.rate:
            raise ValueError(f"plan group {g}: offset must be in [0, rate)")
        if not 0 <= g.head_start < g.head_stop <= plan.num_heads:
            raise ValueError(f"plan group {g}: heads must lie in [0, num_heads={plan.num_heads})")
    return plan


# One branch as the flex mods and the decode step use it: (segment w, rate r,
# ((head_start, head_stop, offset), ...)).
Branches = tuple[tuple[int, int, tuple[tuple[int, int, int], ...]], ...]


def plan_branches(plan: DilatedPlan) -> Branches:
    """The plan's groups regrouped by branch."""
    out: dict[int, list] = {}
    for g in plan.groups:
        out.setdefault(g.branch, [g.segment, g.rate, []])[2].append((g.head_start, g.head_stop, g.offset))
    return tuple((w, r, tuple(heads)) for w, r, heads in out.values())


def branch_offsets(heads: tuple[tuple[int, int, int], ...], head: Tensor) -> Tensor:
    """Each ``head``'s offset in one branch (``heads`` as in ``Branches``),
    -1 where the branch skips that head; the shape of ``head``."""
    offset = head * 0 - 1
    for start, stop, o in heads:
        offset = torch.where((head >= start) & (head < stop), o, offset)
    return offset
