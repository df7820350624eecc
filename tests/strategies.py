"""Hypothesis strategies for valid specs, shared by the test files."""

from __future__ import annotations

from hypothesis import strategies as st

from patternstore.kinds import SPARSE_KINDS
from patternstore.specs import DilatedSpec, SparseSpec


@st.composite
def dilated_specs(draw: st.DrawFn) -> DilatedSpec:
    k = draw(st.integers(1, 4))
    segments = draw(st.lists(st.integers(1, 1 << 16), min_size=k, max_size=k))
    rates = [draw(st.integers(1, min(w, 16))) for w in segments]
    heads = draw(st.integers(k, 64))
    return DilatedSpec(
        segment_lengths=segments,
        dilation_rates=rates,
        num_heads=heads,
        scheme=draw(st.sampled_from(["longnet", "grouped"])),
    )


@st.composite
def small_dilated_branches(draw: st.DrawFn, max_segment: int = 24, max_rate: int = 6, max_heads: int = 6):
    """(segments, rates, heads, scheme) at test sizes: rates not powers of two,
    more branches than heads (longnet), every scheme."""
    k = draw(st.integers(1, 4))
    segments = draw(st.lists(st.integers(1, max_segment), min_size=k, max_size=k))
    rates = [draw(st.integers(1, min(w, max_rate))) for w in segments]
    scheme = draw(st.sampled_from(["longnet", "grouped"]))
    heads = draw(st.integers(k if scheme == "grouped" else 1, max(max_heads, k)))
    return segments, rates, heads, scheme


def sparse_params(draw: st.DrawFn, kind: str, num_blocks: int) -> dict:
    params: dict = {}
    names = {f.name for f in SPARSE_KINDS[kind].params}
    if "attention" in names and draw(st.booleans()):
        params["attention"] = draw(st.sampled_from(["bidirectional", "unidirectional"]))
    if "different_layout_per_head" in names:
        params["different_layout_per_head"] = draw(st.booleans())
    if "num_random_blocks" in names:
        params["num_random_blocks"] = draw(st.integers(0, min(4, num_blocks)))  # a row draws distinct blocks
    if "num_sliding_window_blocks" in names:
        params["num_sliding_window_blocks"] = draw(st.integers(1, 9))
    if kind == "fixed":
        glob = draw(st.integers(1, 3))
        params["num_global_blocks"] = glob
        params["num_local_blocks"] = glob * draw(st.integers(1, 4))
    if kind == "bigbird":
        params["num_global_blocks"] = draw(st.integers(0, 3))
    if kind in ("bslongformer", "variable"):
        # Some ranges start or end past the block count: skipped or clipped, as DeepSpeed does.
        starts = draw(st.lists(st.integers(0, num_blocks + 2), min_size=1, max_size=3, unique=True))
        params["global_block_indices"] = starts
        if draw(st.booleans()):
            params["global_block_end_indices"] = [s + draw(st.integers(1, 3)) for s in starts]
    if kind == "variable":
        params["local_window_blocks"] = draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))
    if kind == "dilated_blocks":
        k = draw(st.integers(1, 3))
        segments = draw(st.lists(st.integers(1, 16), min_size=k, max_size=k))
        params["segment_lengths"] = segments
        params["dilation_rates"] = [draw(st.integers(1, w)) for w in segments]
    return params


@st.composite
def sparse_specs(
    draw: st.DrawFn,
    block_sizes: tuple[int, ...] = tuple(1 << i for i in range(9)),
    max_blocks: int = 1 << 20,
    max_heads: int = 16,
) -> SparseSpec:
    """Sparse specs of every kind: at most ``max_blocks`` blocks (and 1M
    positions) of one of ``block_sizes``, 1 to ``max_heads`` heads."""
    kind = draw(st.sampled_from(sorted(SPARSE_KINDS)))
    block_size = draw(st.sampled_from(block_sizes))
    seq_len = draw(st.integers(1, min(1 << 20, max_blocks * block_size)))
    return SparseSpec(
        kind,
        seq_len=seq_len,
        block_size=block_size,
        num_heads=draw(st.integers(1, max_heads)),
        seed=draw(st.integers(0, 2**63 - 1)),
        **sparse_params(draw, kind, -(-seq_len // block_size)),
    )


def tiny_sparse_specs(max_blocks: int = 12) -> st.SearchStrategy[SparseSpec]:
    """Sparse specs small enough for dense references: at most ``max_blocks``
    blocks of 1 to 8 positions, 1 to 3 heads."""
    return sparse_specs(block_sizes=(1, 2, 4, 8), max_blocks=max_blocks, max_heads=3)


any_spec = st.one_of(dilated_specs(), sparse_specs())


@st.composite
def document_lengths(draw: st.DrawFn, lengths: st.SearchStrategy[int], max_documents: int,
                     longest_filler: int) -> list[int]:
    """A packed batch's document lengths: up to ``max_documents`` drawn from
    ``lengths`` (empty documents included), with one of 1..``longest_filler``
    tokens appended when they sum to 0."""
    drawn = draw(st.lists(lengths, min_size=1, max_size=max_documents))
    if sum(drawn) == 0:
        drawn.append(draw(st.integers(1, longest_filler)))
    return drawn
