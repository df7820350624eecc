"""Generators against independent, loop-based references written from the
definitions (docs/design.md section 2.2, DeepSpeed's sparsity configs), plus
determinism across processes and the layout invariants."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patternstore import DilatedSpec, SparseSpec, generate
from patternstore.codec import encode
from patternstore.csr import check_layout, drop_future_blocks, padded_rows, prefix_rows
from patternstore.kinds import SPARSE_KINDS
from patternstore.dilated_groups import GROUP_COLUMNS
from strategies import dilated_specs, sparse_params, sparse_specs

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ dilated
def reference_selection(spec: DilatedSpec, n: int) -> set[tuple[int, int, int, int]]:
    """(branch, head, segment start, position) for every selected pair at
    length ``n``, by walking the definition position by position."""
    h = spec.num_heads
    k = len(spec.segment_lengths)
    out = set()
    for i, (w, r) in enumerate(zip(spec.segment_lengths, spec.dilation_rates)):
        s = min(w, n)
        if spec.scheme == "longnet":
            g = -(-h // r)
            heads = {j: j // g for j in range(h)}
        else:
            sizes = [h // k + (1 if b < h % k else 0) for b in range(k)]
            first = sum(sizes[:i])
            heads = {j: i % r for j in range(first, first + sizes[i])}
        for j, offset in heads.items():
            for p in range(n):
                start = p // s * s
                if p - start >= offset and (p - start - offset) % r == 0:
                    out.add((i, j, start, p))
    return out


def plan_selection(pattern, n: int) -> set[tuple[int, int, int, int]]:
    """The same set, read from the length-free groups table the way the
    attention code does: s = min(segment, n), every segment start t*s < n."""
    out = set()
    for row in pattern["groups"].tolist():
        g = dict(zip(GROUP_COLUMNS, row))
        s = min(g["segment"], n)
        assert 0 <= g["offset"] < g["rate"] <= g["segment"] and g["head_start"] < g["head_stop"]
        for start in range(0, n, s):
            for p in range(start + g["offset"], min(start + s, n), g["rate"]):
                for j in range(g["head_start"], g["head_stop"]):
                    out.add((g["branch"], j, start, p))
    return out


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 70), min_size=1, max_size=3),
    branches=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 9)), min_size=1, max_size=3),
    heads=st.integers(1, 9),
    grouped=st.booleans(),
)
def test_dilated_plan_selects_exactly_what_the_definition_selects(lengths, branches, heads, grouped):
    """One length-free pattern gives the definition's selection at every length."""
    segments = [w for w, _ in branches]
    rates = [min(r, w) for w, r in branches]
    if grouped and heads < len(branches):
        heads = len(branches)
    spec = DilatedSpec(segments, rates, heads, scheme="grouped" if grouped else "longnet")
    pattern = generate(spec)
    for n in lengths:
        assert plan_selection(pattern, n) == reference_selection(spec, n)


def test_dilated_plan_example():
    # heads=3, branches (4, 1) and (8, 2): offsets of branch 2 are
    # head 0,1 -> 0 (g = ceil(3/2) = 2) and head 2 -> 1.
    pattern = generate(DilatedSpec((4, 8), (1, 2), 3))
    assert list(pattern.arrays) == ["groups"]
    assert pattern["groups"].tolist() == [
        [0, 4, 1, 0, 0, 3],
        [1, 8, 2, 0, 0, 2],
        [1, 8, 2, 1, 2, 3],
    ]
    assert pattern["groups"].dtype == torch.int32


def test_dilated_groups_drop_head_groups_past_the_last_head():
    # 3 heads, rate 4: g = ceil(3/4) = 1, offsets 0, 1, 2 have a head; offset 3 has none.
    pattern = generate(DilatedSpec((16,), (4,), 3))
    assert [row[3:] for row in pattern["groups"].tolist()] == [[0, 0, 1], [1, 1, 2], [2, 2, 3]]


@settings(max_examples=50, deadline=None)
@given(spec=dilated_specs())
def test_dilated_entry_is_small_at_any_spec(spec):
    """Contract: a stored dilated entry stays under 4 KiB (issue 11)."""
    assert len(encode(generate(spec))) < 4096


# ------------------------------------------------------------------ sparse
def reference_layout(spec: SparseSpec) -> torch.Tensor:
    """Dense bool ``[H, nb, nb]`` of the deterministic part of a layout,
    built block by block from the kind's definition."""
    p, nb, heads = spec.params, spec.num_blocks, spec.layout_heads
    layout = torch.zeros(heads, nb, nb, dtype=torch.bool)

    def globals_() -> list[int]:
        ends = p["global_block_end_indices"] or [s + 1 for s in p["global_block_indices"]]
        return [b for s, e in zip(p["global_block_indices"], ends) for b in range(s, e)]

    for h in range(heads):
        for i in range(nb):
            for j in range(nb):
                if spec.kind == "dense":
                    on = True
                elif spec.kind in ("local", "bigbird", "bslongformer"):
                    on = abs(i - j) <= p["num_sliding_window_blocks"] // 2
                    if spec.kind == "bigbird":
                        on |= i < p["num_global_blocks"] or j < p["num_global_blocks"]
                    if spec.kind == "bslongformer":
                        on |= i in globals_() or j in globals_()
                elif spec.kind == "fixed":
                    L, G = p["num_local_blocks"], p["num_global_blocks"]
                    first = L - (1 + h % p["num_different_global_patterns"]) * G
                    if p["attention"] == "unidirectional":  # a partial window: its blocks when complete
                        cols = [w + first + x for w in range(0, nb, L) for x in range(G)]
                    else:  # DeepSpeed: a partial window keeps its global blocks inside the sequence
                        cols = [w + first + x for w in range(0, nb - nb % L, L) for x in range(G)]
                        if nb % L:
                            start = max(0, min(nb - nb % L + first, nb - G))
                            cols += list(range(start, start + G))
                    on = i // L == j // L or j in cols
                    on |= p["horizontal_global_attention"] and i in cols
                elif spec.kind == "variable":
                    sizes, starts, b = list(p["local_window_blocks"]), [], 0
                    while b < nb:
                        size = sizes[len(starts)] if len(starts) < len(sizes) else sizes[-1]
                        starts.append((b, b + size))
                        b += size
                    window = next(w for w in starts if w[0] <= i < w[1])
                    on = window[0] <= j < window[1] or j in globals_()
                    on |= p["horizontal_global_attention"] and i in globals_()
                elif spec.kind == "dilated_blocks":
                    on = i == j
                    for w, r in zip(p["segment_lengths"], p["dilation_rates"]):
                        s, o = min(w, nb), h // -(-heads // r)
                        same = i // s == j // s
                        on |= same and (i % s - o) % r == 0 and (j % s - o) % r == 0 and i % s >= o and j % s >= o
                layout[h, i, j] = on
    if p["attention"] == "unidirectional":
        layout &= torch.ones(nb, nb, dtype=torch.bool).tril()
    return layout


def dense_of(pattern) -> torch.Tensor:
    counts, indices = pattern["kv_num_blocks"], pattern["kv_indices"].long()
    heads, nb = counts.shape
    rows = torch.arange(heads * nb).repeat_interleave(counts.flatten().long())
    out = torch.zeros(heads * nb, nb, dtype=torch.bool)
    out[rows, indices] = True
    return out.view(heads, nb, nb)


def check_invariants(spec: SparseSpec, pattern) -> None:
    counts, indices = pattern["kv_num_blocks"], pattern["kv_indices"]
    nb = spec.num_blocks
    assert counts.dtype == indices.dtype == torch.int32
    assert counts.shape == (spec.layout_heads, nb) and indices.dim() == 1
    assert int(counts.sum()) == indices.numel()
    assert bool((counts >= 1).all()), "a query block without any key block"
    assert bool(((indices >= 0) & (indices < nb)).all())
    rows = torch.arange(counts.numel()).repeat_interleave(counts.flatten().long())
    same_row = rows[1:] == rows[:-1]
    assert bool((indices[1:][same_row] > indices[:-1][same_row]).all()), "unsorted or repeated"
    if spec.params["attention"] == "unidirectional":
        assert bool((indices.long() <= rows % nb).all())


@settings(max_examples=500, deadline=None)
@given(sparse_specs().filter(lambda s: s.num_blocks <= 48 and s.num_heads <= 4))
def test_every_layout_keeps_the_csr_invariants(spec):
    check_invariants(spec, generate(spec))


@settings(max_examples=150, deadline=None)
@given(sparse_specs().filter(lambda s: s.num_blocks <= 20 and s.num_heads <= 4))
def test_layouts_match_the_definitions(spec):
    pattern = generate(spec)
    dense, expected = dense_of(pattern), reference_layout(spec)
    random = spec.params.get("num_random_blocks", 0)
    if random == 0:
        assert torch.equal(dense, expected)
    else:  # the deterministic part, plus at most `random` extra blocks per row
        assert bool((dense | expected).eq(dense).all())
        extra = (dense & ~expected).sum(-1)
        assert bool((extra <= random).all())


def test_random_blocks_are_uniform_and_distinct():
    spec = SparseSpec("bigbird", seq_len=64 * 64, block_size=64, num_heads=4, seed=3,
                      num_random_blocks=3, num_sliding_window_blocks=1, num_global_blocks=0,
                      different_layout_per_head=True)
    dense = dense_of(generate(spec)).float()
    eye = torch.eye(64, dtype=torch.bool)
    # every row: its diagonal plus 3 distinct random blocks (one may hit the diagonal)
    counts = dense.sum(-1)
    assert bool(((counts == 3) | (counts == 4)).all())
    hits = dense.masked_fill(eye, 0).sum((0, 1))            # per key block, over 4*64 rows
    assert hits.min() > 0 and hits.max() < 40                # expected ~12 each
    assert all(not torch.equal(dense[0], dense[h]) for h in range(1, 4))


_DIGEST_SCRIPT = """
import hashlib, sys
from patternstore import DilatedSpec, SparseSpec, generate
from patternstore.codec import encode
specs = [
    DilatedSpec((512, 1024, 2048), (1, 2, 4), 8),
    SparseSpec("bigbird", 1 << 16, 64, 4, seed=11, num_random_blocks=3, different_layout_per_head=True),
    SparseSpec("variable", 9000, 32, 2, seed=5, num_random_blocks=2, local_window_blocks=(3, 5)),
]
for s in specs:
    p = generate(s)
    print(s.key, hashlib.sha256(b"".join(t.numpy().tobytes() for t in p.arrays.values())).hexdigest())
"""


def test_generate_is_bit_identical_across_processes():
    runs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        runs.append(subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT], env=env,
                                   capture_output=True, text=True, check=True).stdout)
    assert runs[0] == runs[1] and len(runs[0].splitlines()) == 3


def test_seed_changes_random_layouts_only():
    def layout(kind: str, seed: int) -> bytes:
        pattern = generate(SparseSpec(kind, 8192, 64, 2, seed=seed))
        return pattern["kv_num_blocks"].numpy().tobytes() + pattern["kv_indices"].numpy().tobytes()

    assert layout("bigbird", 1) == layout("bigbird", 1)
    assert layout("bigbird", 1) != layout("bigbird", 2)
    assert layout("local", 1) == layout("local", 2)


# ------------------------------------------------------------------ causal prefix property
def _causal_rows(spec: SparseSpec) -> tuple[torch.Tensor, torch.Tensor]:
    pattern = generate(spec)
    return drop_future_blocks(pattern["kv_num_blocks"], pattern["kv_indices"])


@settings(max_examples=150, deadline=None)
@given(data=st.data(), kind=st.sampled_from(sorted(SPARSE_KINDS)), block_size=st.sampled_from([1, 2, 4, 16]),
       heads=st.integers(1, 3), seed=st.integers(0, 2**63 - 1), causal=st.booleans())
def test_causal_layout_of_a_shorter_length_is_the_first_rows_of_a_longer_one(
    data, kind, block_size, heads, seed, causal
):
    """Issue 13 section 2: for every kind, unidirectional layouts (and every
    layout whose spec says ``is_prefix_stable``, under the causal rule) at
    length n are the first query rows of the layout at any longer length."""
    short = data.draw(st.integers(1, 40 * block_size), label="short")
    long = data.draw(st.integers(short, 90 * block_size), label="long")
    nb = -(-short // block_size)
    params = sparse_params(data.draw, kind, nb)
    if causal:
        params["attention"] = "unidirectional"
    elif "attention" not in params:
        params["attention"] = "bidirectional"
    spec_short = SparseSpec(kind, short, block_size, heads, seed, **params)
    spec_long = SparseSpec(kind, long, block_size, heads, seed, **params)
    assert spec_short.is_prefix_stable == spec_long.is_prefix_stable
    if causal:
        assert spec_short.is_prefix_stable
    if not spec_short.is_prefix_stable:
        return
    counts, indices = _causal_rows(spec_short)
    long_counts, long_indices = prefix_rows(*_causal_rows(spec_long), nb)
    assert torch.equal(counts, long_counts) and torch.equal(indices, long_indices)
    check_layout(long_counts, long_indices, nb)


def test_bidirectional_random_blocks_are_not_prefix_stable_and_say_so():
    """Random blocks of a bidirectional row come from the whole row: the
    predicate says so, and the layouts really differ."""
    spec_short = SparseSpec("bigbird", 64, 1, 1, seed=5, num_random_blocks=3, num_global_blocks=0)
    spec_long = SparseSpec("bigbird", 128, 1, 1, seed=5, num_random_blocks=3, num_global_blocks=0)
    assert not spec_short.is_prefix_stable and not spec_long.is_prefix_stable
    assert not torch.equal(padded_rows(*_causal_rows(spec_short), 64),
                           padded_rows(*prefix_rows(*_causal_rows(spec_long), 64), 64))
    assert SparseSpec("bigbird", 64, 1, num_random_blocks=0).is_prefix_stable
    assert SparseSpec("bigbird", 64, 1, num_random_blocks=3, attention="unidirectional").is_prefix_stable
    assert not SparseSpec("fixed", 64, 1).is_prefix_stable  # DeepSpeed's partial last window moves with the length
    assert DilatedSpec((8,), (2,), 2).is_prefix_stable


def test_prefix_rows_of_one_and_several_heads():
    # head 0: rows [0], [0, 1], [1, 2]; head 1: rows [0], [1], [0, 2]
    counts = torch.tensor([[1, 2, 2], [1, 1, 2]], dtype=torch.int32)
    indices = torch.tensor([0, 0, 1, 1, 2, 0, 1, 0, 2], dtype=torch.int32)
    two, entries = prefix_rows(counts, indices, 2)
    assert two.tolist() == [[1, 2], [1, 1]] and entries.tolist() == [0, 0, 1, 0, 1]
    one, first = prefix_rows(counts[:1], indices[:5], 2)
    assert one.tolist() == [[1, 2]] and first.tolist() == [0, 0, 1]
    assert first.data_ptr() == indices.data_ptr()  # one head: a view, no copy
    assert prefix_rows(counts, indices, 0)[1].numel() == 0
    assert torch.equal(prefix_rows(counts, indices, 3)[1], indices)
    for bad in (4, -1, True, 2.0):
        with pytest.raises(ValueError, match="num_blocks must be an int in"):
            prefix_rows(counts, indices, bad)


@pytest.mark.parametrize("kind", ["bslongformer", "variable"])
@pytest.mark.parametrize("attention", ["bidirectional", "unidirectional"])
def test_one_deepspeed_config_serves_every_length(kind, attention):
    """DeepSpeed's set_global_layout: a global range starting at or past the
    block count is skipped and an end past it is clipped, so a config written
    for long sequences runs at every length; the layout equals that of the
    config with those ranges removed or clipped by hand (a spec valid before
    this rule, whose layout it leaves unchanged) and the kind's definition."""
    starts, ends = (1, 6, 40), (3, 9, 50)
    for nb in range(1, 13):
        kept = [(s, min(e, nb)) for s, e in zip(starts, ends) if s < nb]
        spec = SparseSpec(kind, seq_len=nb * 4 - 1, block_size=4, num_heads=2, attention=attention,
                          global_block_indices=starts, global_block_end_indices=ends)
        dense = dense_of(generate(spec))
        assert torch.equal(dense, reference_layout(spec)), nb
        if kept:
            by_hand = SparseSpec(kind, seq_len=nb * 4 - 1, block_size=4, num_heads=2, attention=attention,
                                 global_block_indices=[s for s, _ in kept],
                                 global_block_end_indices=[e for _, e in kept])
            assert torch.equal(dense, dense_of(generate(by_hand))), nb
    with pytest.raises(ValueError, match=r"global_block_end_indices\[1\]=6 must be > global_block_indices\[1\]=6"):
        SparseSpec(kind, seq_len=64, block_size=4, global_block_indices=(1, 6), global_block_end_indices=(3, 6))
