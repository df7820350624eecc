"""Packed documents (``cu_seqlens``) in dilated attention: every module and
implementation equals the concatenation of per-document calls (outputs and
q/k/v gradients, float64, 1e-10), for random document lengths (0 and 1
included, lengths no multiple of a segment or of R = lcm(rates), more
documents than segments, causal or not, GQA, padding inside documents); a
few fixed cases against the independent float64 dense reference with a
block-diagonal document multiplicity; the bucketing's bounds; every bad
``cu_seqlens`` gives its error; ordered mode and the sequence-parallel
module refuse ``cu_seqlens`` before any work."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention import (
    DilatedAttention,
    DilatedPlan,
    ImprovedDilatedAttention,
    ImprovedMultiheadDilatedAttention,
    MultiheadDilatedAttention,
    dilated_attention,
)
from attention.dense_reference import dense_attention, multiplicity
from attention.dilated import packed as packed_module
from attention.dilated.packed import BUCKET_WASTE, layers, segment_buckets
from attention.dilated.plan import groups_from_flat
from patternstore.dilated_groups import Group
from attention.dilated.distributed import DistributedDilatedAttention
from patternstore import DilatedSpec, generate
from strategies import document_lengths, small_dilated_branches

pytestmark = pytest.mark.usefixtures("one_thread")

IMPLEMENTATIONS = ("reference", "fast", "flex", "auto")


def boundaries(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int64)


def per_document(call, cu, q, k, v, pad):
    """The documents run one by one as sequences of their own, concatenated."""
    bounds = cu.tolist()
    outs = [call(q[:, a:b], k[:, a:b], v[:, a:b], None if pad is None else pad[:, a:b])
            for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return torch.cat(outs, 1)


def assert_same(packed, separate, inputs, tol=1e-10):
    g = torch.Generator().manual_seed(7)
    grad_out = torch.randn(packed.shape, generator=g, dtype=packed.dtype)
    torch.testing.assert_close(packed, separate, rtol=tol, atol=tol)
    got = torch.autograd.grad(packed, inputs, grad_out)
    want = torch.autograd.grad(separate, inputs, grad_out)
    for a, b in zip(got, want):
        assert not a.isnan().any()
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@st.composite
def packed_cases(draw):
    segments, rates, heads, scheme = draw(small_dilated_branches(max_segment=12, max_rate=4, max_heads=4))
    lengths = draw(document_lengths(st.sampled_from([0, 1, 2, 3, 5, 7, 9, 13, 17, 26]), 7, 11))
    kv_heads = draw(st.sampled_from([x for x in range(1, heads + 1) if heads % x == 0]))
    is_causal, padded, seed = draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 99))
    return segments, rates, heads, scheme, lengths, kv_heads, is_causal, padded, seed


def make_inputs(n, heads, kv_heads, padded, seed, d=4):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, n, heads, d, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, n, kv_heads, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    pad = (torch.rand(1, n, generator=g) < 0.25) if padded else None
    return q, k, v, pad


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@settings(max_examples=25, deadline=None)
@given(case=packed_cases())
def test_packed_equals_per_document_calls(implementation, case):
    segments, rates, heads, scheme, lengths, kv_heads, is_causal, padded, seed = case
    module = DilatedAttention(segments, rates, implementation=implementation, scheme=scheme)
    cu = boundaries(lengths)
    q, k, v, pad = make_inputs(int(cu[-1]), heads, kv_heads, padded, seed)
    packed = module(q, k, v, is_causal=is_causal, key_padding_mask=pad, cu_seqlens=cu)
    # On the CPU "flex" gives a packed batch that needs gradients (or float64) to the fast path, and
    # its own CPU forward takes no float64: the documents alone run "fast" for it (the fused packed
    # path: tests/test_dilated_packed_flex.py).
    alone = module
    if implementation == "flex":
        alone = DilatedAttention(segments, rates, implementation="fast", scheme=scheme)
    separate = per_document(lambda *x: alone(*x[:3], is_causal=is_causal, key_padding_mask=x[3]), cu, q, k, v, pad)
    assert_same(packed, separate, (q, k, v))


@settings(max_examples=25, deadline=None)
@given(case=packed_cases())
def test_functional_packed_equals_per_document_calls(case):
    segments, rates, heads, scheme, lengths, kv_heads, is_causal, padded, seed = case
    plan = DilatedPlan.from_pattern(generate(DilatedSpec(segments, rates, heads, scheme)))
    cu = boundaries(lengths).to(torch.int32)
    q, k, v, pad = make_inputs(int(cu[-1]), heads, kv_heads, padded, seed)
    packed = dilated_attention(q, k, v, plan, is_causal=is_causal, key_padding_mask=pad, cu_seqlens=cu)
    separate = per_document(lambda *x: dilated_attention(*x[:3], plan, is_causal=is_causal, key_padding_mask=x[3]),
                            cu, q, k, v, pad)
    assert_same(packed, separate, (q, k, v))


def document_multiplicity(lengths, heads, segments, rates, scheme, is_causal) -> torch.Tensor:
    """(heads, n, n): each document's own multiplicity on the diagonal, 0 across documents."""
    n = sum(lengths)
    m = torch.zeros(heads, n, n, dtype=torch.float64)
    start = 0
    for length in lengths:
        if length:
            block = multiplicity(length, heads, segments, rates, scheme, is_causal)
            m[:, start : start + length, start : start + length] = block
        start += length
    return m


FIXED = [  # (segments, rates, heads, kv_heads, lengths)
    ((4, 8), (1, 2), 4, 2, [5, 0, 1, 19, 8, 3]),     # a long document past both segments, empty and 1-token ones
    ((6, 9), (2, 3), 5, 5, [30, 2, 11]),             # rates that do not divide the segments, R = 6
    ((3,), (2,), 2, 1, [1] * 9 + [7]),               # more documents than segments of the longest
]


@pytest.mark.parametrize("module_class", [DilatedAttention, ImprovedDilatedAttention])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("case", FIXED, ids=lambda c: f"w{c[0]}-r{c[1]}-docs{len(c[4])}")
def test_packed_matches_dense_reference_with_a_document_mask(module_class, is_causal, case):
    segments, rates, heads, kv_heads, lengths = case
    module = module_class(segments, rates)
    cu = boundaries(lengths)
    q, k, v, pad = make_inputs(int(cu[-1]), heads, kv_heads, True, seed=3)
    weight = document_multiplicity(lengths, heads, segments, rates, "longnet", is_causal)
    expected = dense_attention(q, k, v, weight=weight, is_causal=is_causal, key_padding_mask=pad)
    assert_same(module(q, k, v, is_causal=is_causal, key_padding_mask=pad, cu_seqlens=cu), expected, (q, k, v))


@pytest.mark.parametrize("layer_class", [MultiheadDilatedAttention, ImprovedMultiheadDilatedAttention])
def test_multihead_layers_take_cu_seqlens(layer_class):
    torch.manual_seed(0)
    layer = layer_class(8, 2, (4, 8), (1, 2), dtype=torch.float64)
    lengths = [6, 0, 13, 1]
    cu = boundaries(lengths)
    x = torch.randn(1, sum(lengths), 8, dtype=torch.float64, requires_grad=True)
    packed = layer(x, is_causal=True, cu_seqlens=cu)[0]
    bounds = cu.tolist()
    separate = torch.cat([layer(x[:, a:b], is_causal=True)[0] for a, b in zip(bounds[:-1], bounds[1:]) if b > a], 1)
    assert_same(packed, separate, (x,))


def test_dropout_in_training_draws_as_the_per_document_calls_do():
    """With dropout the reference runs document by document, in order: the
    same seed gives the per-document calls' dropped output exactly."""
    module = ImprovedDilatedAttention((4, 8), (1, 2), dropout=0.5).train()
    cu = boundaries([6, 0, 13, 1])
    q, k, v, pad = make_inputs(int(cu[-1]), 2, 2, False, seed=5)
    torch.manual_seed(11)
    packed = module(q, k, v, cu_seqlens=cu)
    torch.manual_seed(11)
    separate = per_document(lambda *x: module(*x[:3]), cu, q, k, v, pad)
    assert_same(packed, separate, (q, k, v))
    assert not torch.allclose(packed, module.eval()(q, k, v, cu_seqlens=cu))


@pytest.mark.parametrize("lengths", [[37, 5, 1, 64, 16, 3, 29], [200], [1] * 40])
@pytest.mark.parametrize("segment, rate", [(16, 1), (16, 3), (64, 4)])
def test_buckets_cover_each_selected_pair_once_with_bounded_padding(lengths, segment, rate):
    """One layer of ``rate`` groups (head j, offset j): the buckets' valid
    (position, head) pairs are exactly the rule's, each once, padding goes
    to the dump row, a bucket pads a segment at most BUCKET_WASTE-fold, and there
    are at most 2 (1 + log(longest) / log(BUCKET_WASTE)) buckets (each step
    may split its full segments from the rest)."""
    groups = [Group(0, segment, rate, o, o, o + 1) for o in range(rate)]
    (layer,) = layers(groups, 1)
    cu = boundaries(lengths).tolist()
    expected = []
    for a, b in zip(cu[:-1], cu[1:]):
        s = min(segment, b - a) if b > a else 1
        expected += [(p, o) for p in range(a, b) for o in range(rate)
                     if (p - a) % s >= o and ((p - a) % s - o) % rate == 0]
    buckets = segment_buckets(cu, layer, torch.device("cpu"))
    got = []
    for bucket in buckets:
        valid = bucket.valid.flatten(0, 1)
        heads = layer.heads.expand_as(valid)
        got += list(zip(bucket.write[valid].tolist(), heads[valid].tolist()))
        assert torch.equal(bucket.read, bucket.write.where(valid, 0))
        assert set(bucket.write[~valid].tolist()) <= {cu[-1]}  # padding goes to the dump row
        real = bucket.valid[:, :, 0].sum(1)  # head 0 has offset 0: its segment's most rows
        assert bool((real * BUCKET_WASTE >= bucket.valid.shape[1]).all())
    assert sorted(got) == sorted(expected) and len(got) == len(set(got))
    top = max((bucket.valid.shape[1] for bucket in buckets), default=1)
    assert len(buckets) <= 2 * (1 + math.log(top) / math.log(BUCKET_WASTE))  # each step < the last / BUCKET_WASTE


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("is_causal", [False, True])
def test_full_segment_and_tail_buckets_run_in_chunks_as_per_document_calls(monkeypatch, is_causal, padded):
    """Documents of whole segments (lengths exact multiples of both segments)
    beside documents with tails: the first layer's full segments form an
    unpadded bucket of their own next to a padded bucket of near-full tails,
    and with the chunk bound lowered every bucket runs in runs of a few units;
    outputs and gradients still equal the per-document calls."""
    segments, rates, heads, kv_heads = (32, 64), (1, 2), 4, 2
    lengths = [64 + 31, 32 + 30, 128, 32, 64, 13, 0, 1]
    monkeypatch.setattr(packed_module, "_MIN_CHUNK_ROWS", 1)
    monkeypatch.setattr(packed_module, "_CHUNK_FRACTION", 4)
    cu = boundaries(lengths)
    n = int(cu[-1])
    plan = DilatedPlan.from_pattern(generate(DilatedSpec(segments, rates, heads)))
    first = layers(groups_from_flat(plan.flat), heads // kv_heads)[0]
    buckets = segment_buckets(cu.tolist(), first, torch.device("cpu"))
    full = [b for b in buckets if not b.padded and b.valid.shape[0] > 1]
    assert len(full) == 1 and full[0].valid.shape[:2] == (10, 32)  # the 10 full segments of 32, unpadded
    assert any(b.padded and b.valid.shape[0] == 2 for b in buckets)  # the tails of 31 and 30 rows
    assert len(packed_module._chunks(full[0], n * heads // 4)) == 4  # runs of 3 units of 32 rows x 4 heads
    module = ImprovedDilatedAttention(segments, rates)
    q, k, v, pad = make_inputs(n, heads, kv_heads, padded, seed=4)
    packed = module(q, k, v, is_causal=is_causal, key_padding_mask=pad, cu_seqlens=cu)
    separate = per_document(lambda *x: module(*x[:3], is_causal=is_causal, key_padding_mask=x[3]), cu, q, k, v, pad)
    assert_same(packed, separate, (q, k, v))


def test_groups_of_a_branch_with_overlapping_heads_run_in_separate_layers():
    groups = [Group(0, 8, 2, 0, 0, 2), Group(0, 8, 2, 1, 1, 3), Group(0, 8, 2, 1, 3, 4), Group(1, 4, 1, 0, 0, 4)]
    found = layers(groups, 2)
    assert [(x.segment, x.heads.tolist(), x.offsets.tolist()) for x in found] == [
        (8, [0, 1, 3], [0, 0, 1]), (8, [1, 2], [1, 1]), (4, [0, 1, 2, 3], [0, 0, 0, 0])]
    assert found[0].kv_heads.tolist() == [0, 0, 1]


# ------------------------------------------------------------ bad input
def _qkv(n=10, b=1, q_len=None):
    q = torch.randn(b, n if q_len is None else q_len, 2, 4)
    return q, torch.randn(b, n, 2, 4), torch.randn(b, n, 2, 4)


BAD = [
    ("a list", lambda: [0, 10], _qkv, "1-D integer torch.Tensor"),
    ("2-D", lambda: torch.tensor([[0, 10]]), _qkv, "1-D with at least 2"),
    ("float", lambda: torch.tensor([0.0, 10.0]), _qkv, "integer dtype"),
    ("not from 0", lambda: torch.tensor([1, 10]), _qkv, "must start at 0"),
    ("decreasing", lambda: torch.tensor([0, 6, 4, 10]), _qkv, "must not decrease"),
    ("short", lambda: torch.tensor([0, 4, 9]), _qkv, "must end at the sequence length 10"),
    ("meta device", lambda: torch.tensor([0, 10], device="meta"), _qkv, "on q's device"),
    ("batch 2", lambda: torch.tensor([0, 10]), lambda: _qkv(b=2), "batch must be 1"),
    ("decode", lambda: torch.tensor([0, 10]), lambda: _qkv(q_len=1), "q_len must equal kv_len"),
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name, make_cu, make_qkv, message", BAD, ids=[b[0] for b in BAD])
def test_bad_cu_seqlens_raise_value_error(implementation, name, make_cu, make_qkv, message):
    module = DilatedAttention((4,), (1,), implementation=implementation)
    with pytest.raises(ValueError, match=message):
        module(*make_qkv(), cu_seqlens=make_cu())


def test_functional_checks_cu_seqlens():
    plan = DilatedPlan.from_pattern(generate(DilatedSpec((4,), (1,), 2)))
    with pytest.raises(ValueError, match="must not decrease"):
        dilated_attention(*_qkv(), plan, cu_seqlens=torch.tensor([0, 6, 4, 10]))


def test_ordered_mode_refuses_cu_seqlens():
    module = DilatedAttention((4, 8), (1, 2), ordered=True)
    with pytest.raises(ValueError, match="cu_seqlens is not supported with ordered=True"):
        module(*_qkv(), cu_seqlens=torch.tensor([0, 3, 10]))


def test_sequence_parallel_refuses_cu_seqlens_before_any_collective():
    """No process group exists here: the refusal comes before the module
    looks for one, so no collective (not even the shape agreement) runs."""
    module = DistributedDilatedAttention((4, 8), (1, 2))
    with pytest.raises(ValueError, match="cu_seqlens is not supported by DistributedDilatedAttention"):
        module(*_qkv(), cu_seqlens=torch.tensor([0, 3, 10]))
