"""The sparse kinds, each in one entry: its parameters (defaults, checks,
ranges, help), its cross-field checks, whether heads differ, whether its
causal layout is length-free, and where it departs from DeepSpeed.

``SparseSpec`` validates through ``SPARSE_KINDS[kind]``, the spec text
grammar and the command line's help list its fields from it, and
``patternstore.layouts`` holds its generator under the same name (a test
holds the two tables to the same kinds). This module imports no torch, so
the command line parses and prints its help without it.

Parameter names and defaults are DeepSpeed's sparsity configs
(``deepspeed.ops.sparse_attention.sparsity_config``) where DeepSpeed has the
kind, and every parameter a DeepSpeed config takes is accepted here by the
kind of the same name. Departures from DeepSpeed, one line each (each
entry's ``departures`` lists its own):

- every kind: a ``seq_len`` that is not a multiple of ``block_size`` gets a
  partial last block (DeepSpeed raises);
- every kind: random blocks come from a counter-based hash of
  ``(seed, head, row, draw)``, not from Python's ``random``: same
  distribution, other draws (every deterministic layout is DeepSpeed's but
  for the departures listed here);
- every kind with ``attention="unidirectional"``: the causal rule (key block
  <= query block) is applied to the whole layout, also where DeepSpeed's own
  layout holds a future block;
- every kind: a window or global count wider than the row is clipped to the
  row (DeepSpeed raises for sliding windows and for bigbird's global blocks).

Global ranges (``bslongformer``, ``variable``) are DeepSpeed's at every
length: an entry of ``global_block_indices`` at or past the block count is
skipped and an end index past it is clipped (``set_global_layout``), so one
config serves every length. Only the length-free rules raise: one end per
start, each end > its start.

As in DeepSpeed, ``num_random_blocks`` above the blocks of a row raises (a
row draws distinct blocks), so a layout's generation is bounded by its size.

Causal prefix property (docs/design.md section 7): with
``attention="unidirectional"`` every kind's layout at a length is exactly the
first rows of its layout at any longer length, so a capacity layout serves
every shorter length (``patternstore.csr.prefix_rows``). ``prefix_stable``
says whether that also holds for a bidirectional layout under the causal
rule; random blocks of a bidirectional row are drawn from the whole row, so
there it does not.
Where ``prefix_stable`` holds, the bidirectional layout at a shorter length
is also the top-left corner of the layout at any longer one (what packed
documents read from one stored layout; tests/test_sparse_packed.py checks
both ways for every kind): the kinds where it fails depend on the length
through the random blocks' range or fixed's partial last window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .fields import (
    Field,
    check_bool,
    check_branches,
    choice,
    int_range,
    int_tuple_range,
    optional_int_tuple_range,
)

__all__ = ["SparseKind", "SPARSE_KINDS", "DIRECTIONS", "dilated_block_branches"]

DIRECTIONS = ("bidirectional", "unidirectional")


@dataclass(frozen=True)
class SparseKind:
    """One sparse kind: ``params`` (its fields beyond seq_len, block_size,
    num_heads, seed), ``check(params, num_blocks)`` (cross-field rules,
    raising ``ValueError``), ``per_head(params)`` (whether heads get
    different layouts), ``prefix_stable(params)`` (whether its layout under
    the causal rule is length-free: the layout at a shorter length is the
    first rows of the layout at any longer one), ``deepspeed`` (the DeepSpeed
    config of the same layout, "" for none) and ``departures`` (where this
    kind departs from that config beyond the module docstring's list, one
    line each)."""

    name: str
    help: str
    params: tuple[Field, ...]
    check: Callable[[Mapping[str, Any], int], None] = lambda params, num_blocks: None
    per_head: Callable[[Mapping[str, Any]], bool] = lambda params: bool(params.get("different_layout_per_head"))
    prefix_stable: Callable[[Mapping[str, Any]], bool] = lambda params: True
    deepspeed: str = ""
    departures: tuple[str, ...] = ()


# ---------------------------------------------------------------- shared parameters and rules
def _attention(default: str = "bidirectional") -> Field:
    return Field("attention", choice(*DIRECTIONS), default,
                 "unidirectional: key block <= query block (causal)")


_PER_HEAD = Field("different_layout_per_head", check_bool, False, "each head its own layout")
# DeepSpeed accepts the flag on kinds whose heads never differ; so does this.
_SAME_EVERY_HEAD = Field("different_layout_per_head", check_bool, False,
                         "accepted as DeepSpeed does; no effect (every head has the same layout)")
_HORIZONTAL = Field("horizontal_global_attention", check_bool, False,
                    "global blocks also attend every block (bidirectional only)")
_SLIDING = Field("num_sliding_window_blocks", int_range(1), 3, "blocks of the window centred on the query block")
_GLOBAL_STARTS = Field("global_block_indices", int_tuple_range(0), (0,),
                       "first block of each global range; one at or past the block count is skipped, as DeepSpeed does",
                       is_list=True)
_GLOBAL_ENDS = Field("global_block_end_indices", optional_int_tuple_range(0), None,
                     "end (exclusive) of each global range, clipped to the block count; default: one block each",
                     is_list=True)


def _same_every_head(params: Mapping[str, Any]) -> bool:
    return False


def _causal(params: Mapping[str, Any]) -> bool:
    return params["attention"] == "unidirectional"


def _no_random_or_causal(params: Mapping[str, Any]) -> bool:
    """Random blocks of a bidirectional row are drawn from the whole row, so
    they depend on the length; causal rows draw from ``[0, row]`` only."""
    return _causal(params) or params["num_random_blocks"] == 0


def _check_horizontal(params: Mapping[str, Any]) -> None:
    if params["horizontal_global_attention"] and params["attention"] != "bidirectional":
        raise ValueError("horizontal_global_attention=True needs attention='bidirectional'")


def _check_random(params: Mapping[str, Any], num_blocks: int) -> None:
    """A row draws distinct blocks: more than it has cannot be drawn (DeepSpeed's rule)."""
    count = params["num_random_blocks"]
    if count > num_blocks:
        raise ValueError(
            f"num_random_blocks must be <= the number of blocks ({num_blocks}): a row draws distinct "
            f"blocks, got {count}"
        )


def _check_global_blocks(params: Mapping[str, Any], num_blocks: int) -> None:
    """The length-free rules of global ranges (DeepSpeed's): an index past
    the block count is skipped at that length, not refused."""
    starts, ends = params["global_block_indices"], params["global_block_end_indices"]
    if ends is None:
        return
    if len(ends) != len(starts):
        raise ValueError(
            f"global_block_end_indices must have one entry per global_block_indices entry "
            f"({len(starts)}), got {len(ends)}"
        )
    for i, (start, end) in enumerate(zip(starts, ends)):
        if not start < end:
            raise ValueError(f"global_block_end_indices[{i}]={end} must be > global_block_indices[{i}]={start}")


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


def _check_variable(params: Mapping[str, Any], num_blocks: int) -> None:
    _check_horizontal(params)
    _check_random(params, num_blocks)
    _check_global_blocks(params, num_blocks)


def _check_dilated_blocks(params: Mapping[str, Any], num_blocks: int) -> None:
    check_branches(params["segment_lengths"], params["dilation_rates"], unit=" blocks")


# Distinct segments of one rate searched for branches another covers: the
# search is quadratic in them, so a longer list is only freed of repeats.
DOMINANCE_SEARCH = 64


def dilated_block_branches(params: Mapping[str, Any], num_blocks: int) -> list[tuple[int, int]]:
    """The branches ``(s, r)`` of a ``dilated_blocks`` layout over ``num_blocks``
    blocks that add to it, segments clipped to the row (``s = min(w, nb)``
    links exactly what w does): each once, first seen first, and, among up to
    ``DOMINANCE_SEARCH`` segments of a rate, none that another covers. Branch
    (s, r) lies inside (s', r) when s divides s' and r divides s: its segments
    then tile those of s', each starting at a multiple of r, so its rows and key
    blocks (offset o plus multiples of r, the same o for the same r) are among
    those of (s', r). Building only these gives the same layout at the cost of
    the layout, however often the spec repeats a branch."""
    clipped = list(dict.fromkeys((min(w, num_blocks), r)
                                 for w, r in zip(params["segment_lengths"], params["dilation_rates"])))
    by_rate: dict[int, list[int]] = {}
    for s, r in clipped:
        by_rate.setdefault(r, []).append(s)
    searched = {r: segments for r, segments in by_rate.items() if len(segments) <= DOMINANCE_SEARCH}
    return [(s, r) for s, r in clipped
            if not (s % r == 0 and any(s2 != s and s2 % s == 0 for s2 in searched.get(r, ())))]


# ---------------------------------------------------------------- the registry
SPARSE_KINDS: dict[str, SparseKind] = {
    kind.name: kind
    for kind in (
        SparseKind(
            "dense", "every query block attends every key block",
            (_attention(), _SAME_EVERY_HEAD), per_head=_same_every_head,
            deepspeed="DenseSparsityConfig",
            departures=("attention is this library's own parameter (DeepSpeed's dense has none)",),
        ),
        SparseKind(
            "fixed", "local windows plus the last blocks of each window as global columns (Sparse Transformer)",
            (
                Field("num_local_blocks", int_range(1), 4, "blocks of each local window"),
                Field("num_global_blocks", int_range(1), 1, "global blocks at the end of each window"),
                _attention(),
                _HORIZONTAL,
                Field("num_different_global_patterns", int_range(1), 1, "head groups with shifted global blocks"),
                _PER_HEAD,
            ),
            check=_check_fixed, prefix_stable=_causal, deepspeed="FixedSparsityConfig",
            departures=("unidirectional with num_global_blocks >= 2: DeepSpeed's global rows also hold the "
                        "later global blocks of their group (future blocks); the causal rule drops them",
                        "unidirectional: a partial last window has the global blocks it will have when "
                        "complete (those that exist), so a row never depends on the length"),
        ),
        SparseKind(
            "bigbird", "sliding window, global first blocks and random blocks (BigBird)",
            (
                Field("num_random_blocks", int_range(0), 1, "random key blocks per query block (<= blocks)"),
                _SLIDING,
                Field("num_global_blocks", int_range(0), 1, "first blocks that attend and are attended by all"),
                _attention(),
                _PER_HEAD,
            ),
            check=_check_random, prefix_stable=_no_random_or_causal, deepspeed="BigBirdSparsityConfig",
            departures=("unidirectional: an early row with fewer blocks than num_random_blocks draws all it "
                        "has (DeepSpeed's random.sample raises)",),
        ),
        SparseKind(
            "bslongformer", "sliding window plus global block ranges (block-sparse Longformer)",
            (_SLIDING, _GLOBAL_STARTS, _GLOBAL_ENDS, _attention(), _SAME_EVERY_HEAD),
            check=_check_global_blocks, per_head=_same_every_head, deepspeed="BSLongformerSparsityConfig",
        ),
        SparseKind(
            "variable", "local windows of given sizes, global ranges and random blocks",
            (
                Field("num_random_blocks", int_range(0), 0, "random key blocks per query block (<= blocks)"),
                Field("local_window_blocks", int_tuple_range(1), (4,),
                      "sizes of the first local windows; the last repeats", is_list=True),
                _GLOBAL_STARTS,
                _GLOBAL_ENDS,
                _attention(),
                _HORIZONTAL,
                _PER_HEAD,
            ),
            check=_check_variable, prefix_stable=_no_random_or_causal, deepspeed="VariableSparsityConfig",
            departures=("unidirectional: random blocks are drawn from [0, row] (DeepSpeed draws them from "
                        "the whole row, future blocks included)",
                        "unidirectional with global ranges: DeepSpeed's global rows also hold the later "
                        "blocks of their range (future blocks); the causal rule drops them"),
        ),
        SparseKind(
            "local", "causal sliding window",
            (_SLIDING, _attention("unidirectional")),
            deepspeed="LocalSlidingWindowSparsityConfig",
        ),
        SparseKind(
            "dilated_blocks", "LongNet dilated attention at block granularity, heads at different offsets",
            (
                Field("segment_lengths", int_tuple_range(1), (4,), "segment length of each branch, in blocks",
                      is_list=True),
                Field("dilation_rates", int_tuple_range(1), (1,), "dilation rate of each branch", is_list=True),
                _attention(),
            ),
            check=_check_dilated_blocks, per_head=lambda params: True,
        ),
    )
}
