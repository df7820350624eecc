"""Packed documents (``cu_seqlens``) with soft-capping and attention sinks:
for dilated attention (module "reference", "fast" and "flex", and the
functional API) and block-sparse attention (module and functional API), a
packed batch's output and q/k/v gradients equal the concatenation of the
documents run alone with the same ``softcap`` / ``sinks`` (float64, 1e-10),
and its sinks gradient equals the SUM of the documents' sinks gradients;
random document lengths (0 and 1 included), causal or not, GQA, padding
inside documents. Fixed cases against the float64 dense reference with a
block-diagonal document mask, and a check that both features change the
packed result (so the properties cannot pass with them dropped)."""

from __future__ import annotations

from typing import Callable, Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attention.sparse.tiles as sparse_tiles
from attention import BlockSparseAttention, DilatedAttention, DilatedPlan, block_sparse_attention, dilated_attention
from attention.dense_reference import block_pairs, dense_attention, layout_blocks, multiplicity
from patternstore import DilatedSpec, PatternStore, SparseSpec, generate
from strategies import document_lengths, small_dilated_branches, sparse_params

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-10
# A call on (q, k, v, key_padding_mask, cu_seqlens or None) -> out.
Call = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]],
                torch.Tensor]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return PatternStore(tmp_path_factory.mktemp("packed-caps-store"))


def boundaries(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int64)


def make_inputs(n: int, heads: int, kv_heads: int, padded: bool, with_sinks: bool, seed: int, d: int = 4):
    """float64 q, k, v (q scaled up so that a soft-cap bends the scores), padding, sinks or None."""
    g = torch.Generator().manual_seed(seed)
    q = (3 * torch.randn(1, n, heads, d, generator=g, dtype=torch.float64)).requires_grad_()
    k, v = (torch.randn(1, n, kv_heads, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    pad = (torch.rand(1, n, generator=g) < 0.25) if padded else None
    sinks = torch.randn(heads, generator=g, dtype=torch.float64, requires_grad=True) if with_sinks else None
    return q, k, v, pad, sinks


def assert_packed_equals_documents(call: Call, cu: torch.Tensor, q, k, v, pad, sinks) -> None:
    """Output and q/k/v gradients equal the documents' concatenated; the
    sinks gradient equals the sum of the documents' own sinks gradients."""
    inputs = (q, k, v) + (() if sinks is None else (sinks,))
    packed = call(q, k, v, pad, cu)
    grad_out = torch.randn(packed.shape, generator=torch.Generator().manual_seed(7), dtype=packed.dtype)
    got = torch.autograd.grad(packed, inputs, grad_out)
    outs, want = [], [torch.zeros_like(x) for x in inputs]
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b == a:
            continue
        out = call(q[:, a:b], k[:, a:b], v[:, a:b], None if pad is None else pad[:, a:b], None)
        outs.append(out)
        for total, part in zip(want, torch.autograd.grad(out, inputs, grad_out[:, a:b])):
            total += part  # the document's q/k/v rows (zero elsewhere); its share of the sinks gradient
    torch.testing.assert_close(packed, torch.cat(outs, 1), rtol=TOL, atol=TOL)
    for name, a, b in zip(("q", "k", "v", "sinks"), got, want):
        assert not a.isnan().any(), name
        torch.testing.assert_close(a, b, rtol=TOL, atol=TOL, msg=name)


FEATURES = ("softcap", "sinks", "both")


@st.composite
def dilated_cases(draw):
    segments, rates, heads, scheme = draw(small_dilated_branches(max_segment=12, max_rate=4, max_heads=4))
    lengths = draw(document_lengths(st.sampled_from([0, 1, 2, 3, 5, 7, 9, 13, 17, 26]), 7, 11))
    kv_heads = draw(st.sampled_from([x for x in range(1, heads + 1) if heads % x == 0]))
    features = draw(st.sampled_from(FEATURES))
    softcap = draw(st.sampled_from([0.5, 1.5, 4.0])) if features != "sinks" else None
    is_causal, padded, seed = draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 99))
    return segments, rates, heads, scheme, lengths, kv_heads, softcap, features != "softcap", is_causal, padded, seed


@pytest.mark.parametrize("implementation", ["reference", "fast", "flex"])
@settings(max_examples=25, deadline=None)
@given(case=dilated_cases())
def test_dilated_packed_with_softcap_and_sinks_equals_per_document_calls(implementation, case):
    segments, rates, heads, scheme, lengths, kv_heads, softcap, with_sinks, is_causal, padded, seed = case
    module = DilatedAttention(segments, rates, implementation=implementation, scheme=scheme, softcap=softcap)
    cu = boundaries(lengths)
    q, k, v, pad, sinks = make_inputs(int(cu[-1]), heads, kv_heads, padded, with_sinks, seed)

    def call(q, k, v, pad, cu):
        return module(q, k, v, is_causal=is_causal, key_padding_mask=pad, sinks=sinks, cu_seqlens=cu)

    assert_packed_equals_documents(call, cu, q, k, v, pad, sinks)


@settings(max_examples=25, deadline=None)
@given(case=dilated_cases())
def test_dilated_functional_packed_with_softcap_and_sinks_equals_per_document_calls(case):
    segments, rates, heads, scheme, lengths, kv_heads, softcap, with_sinks, is_causal, padded, seed = case
    plan = DilatedPlan.from_pattern(generate(DilatedSpec(segments, rates, heads, scheme)))
    cu = boundaries(lengths).to(torch.int32)
    q, k, v, pad, sinks = make_inputs(int(cu[-1]), heads, kv_heads, padded, with_sinks, seed)

    def call(q, k, v, pad, cu):
        return dilated_attention(q, k, v, plan, is_causal=is_causal, key_padding_mask=pad, softcap=softcap,
                                 sinks=sinks, cu_seqlens=cu)

    assert_packed_equals_documents(call, cu, q, k, v, pad, sinks)


SPARSE_KINDS = ["bigbird", "bslongformer", "fixed", "variable", "dense", "local", "dilated_blocks"]


@st.composite
def sparse_cases(draw):
    block = draw(st.sampled_from([1, 2, 4]))
    lengths = draw(document_lengths(st.integers(0, 5 * block + 1), 7, 3 * block))
    kind = draw(st.sampled_from(SPARSE_KINDS))
    params = sparse_params(draw, kind, 1)  # valid for documents of one block
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2]))
    features = draw(st.sampled_from(FEATURES))
    softcap = draw(st.sampled_from([0.5, 1.5, 4.0])) if features != "sinks" else None
    causal, padded, seed = draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 99))
    return block, lengths, kind, params, heads, kv_heads, softcap, features != "softcap", causal, padded, seed


@settings(max_examples=30, deadline=None)
@given(case=sparse_cases(), fused=st.booleans())
def test_sparse_packed_with_softcap_and_sinks_equals_per_document_calls(case, fused, store):
    """Both CPU kernels of the tiles (a soft-cap takes the explicit kernel in either)."""
    block, lengths, kind, params, heads, kv_heads, softcap, with_sinks, causal, padded, seed = case
    module = BlockSparseAttention(kind, block_size=block, store=store, seed=11, softcap=softcap, **params)
    cu = boundaries(lengths)
    q, k, v, pad, sinks = make_inputs(int(cu[-1]), heads, kv_heads, padded, with_sinks, seed)

    def call(q, k, v, pad, cu):
        return module(q, k, v, is_causal=causal, key_padding_mask=pad, sinks=sinks, cu_seqlens=cu)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sparse_tiles, "USE_CPU_FLASH_KERNEL", fused)
        assert_packed_equals_documents(call, cu, q, k, v, pad, sinks)


@settings(max_examples=20, deadline=None)
@given(case=sparse_cases())
def test_sparse_functional_packed_with_softcap_and_sinks_equals_per_document_corners(case):
    """The functional API: each document gets the given layout's corner (attention/sparse/packed.py)."""
    block, lengths, kind, params, heads, kv_heads, softcap, with_sinks, causal, padded, seed = case
    total = sum(lengths)
    pattern = generate(SparseSpec(kind, seq_len=total, block_size=block, num_heads=heads, seed=seed, **params))
    counts, indices = pattern["kv_num_blocks"], pattern["kv_indices"]
    cu = boundaries(lengths).to(torch.int32)
    q, k, v, pad, sinks = make_inputs(total, heads, kv_heads, padded, with_sinks, seed)

    def call(q, k, v, pad, cu):
        if cu is not None:
            rows, cols = counts, indices
        else:  # a document alone: its corner of the layout
            nb = -(-q.shape[1] // block)
            dense = layout_blocks(counts, indices)[:, :nb, :nb]
            rows = dense.sum(-1).to(torch.int32)
            cols = torch.cat([row.nonzero().flatten() for head in dense for row in head]).to(torch.int32)
        return block_sparse_attention(q, k, v, rows, cols, block, causal=causal, key_padding_mask=pad,
                                      softcap=softcap, sinks=sinks, cu_seqlens=cu)

    assert_packed_equals_documents(call, cu, q, k, v, pad, sinks)


# ------------------------------------------------------------ the dense reference
LENGTHS = [5, 0, 1, 19, 8, 3]


def dense_packed(q, k, v, pad, lengths, weights, is_causal, softcap, sinks):
    """The float64 dense reference with each document's weights on the block diagonal."""
    n, heads = sum(lengths), q.shape[2]
    weight = torch.zeros(heads, n, n, dtype=torch.float64)
    start = 0
    for length, block in zip(lengths, weights):
        if length:
            weight[:, start:start + length, start:start + length] = block
        start += length
    return dense_attention(q, k, v, weight=weight, is_causal=is_causal, key_padding_mask=pad, softcap=softcap,
                           sinks=sinks)


def assert_equal_with_gradients(got, want, inputs) -> None:
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(3), dtype=got.dtype)
    for name, a, b in zip("qkvs", torch.autograd.grad(got, inputs, grad), torch.autograd.grad(want, inputs, grad)):
        torch.testing.assert_close(a, b, rtol=TOL, atol=TOL, msg=name)


@pytest.mark.parametrize("implementation", ["reference", "fast"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_dilated_packed_matches_the_dense_reference(implementation, is_causal):
    segments, rates, heads = (4, 8), (1, 2), 4
    module = DilatedAttention(segments, rates, implementation=implementation, softcap=1.5)
    q, k, v, pad, sinks = make_inputs(sum(LENGTHS), heads, 2, True, True, seed=4)
    weights = [multiplicity(n, heads, segments, rates, "longnet", is_causal) if n else None for n in LENGTHS]
    got = module(q, k, v, is_causal=is_causal, key_padding_mask=pad, sinks=sinks, cu_seqlens=boundaries(LENGTHS))
    want = dense_packed(q, k, v, pad, LENGTHS, weights, is_causal, 1.5, sinks)
    assert_equal_with_gradients(got, want, (q, k, v, sinks))


@pytest.mark.parametrize("is_causal", [False, True])
def test_sparse_packed_matches_the_dense_reference(is_causal, store):
    block, heads, params = 4, 2, {"num_random_blocks": 1}
    module = BlockSparseAttention("bigbird", block_size=block, store=store, softcap=1.5, **params)
    q, k, v, pad, sinks = make_inputs(sum(LENGTHS), heads, 1, True, True, seed=5)
    weights = []
    for n in LENGTHS:
        pattern = generate(SparseSpec("bigbird", seq_len=n, block_size=block, num_heads=heads, **params)) if n else None
        pairs = None if pattern is None else block_pairs(pattern["kv_num_blocks"], pattern["kv_indices"], n, block)
        weights.append(pairs if pairs is None or not is_causal else pairs & torch.ones(n, n, dtype=torch.bool).tril())
    got = module(q, k, v, is_causal=is_causal, key_padding_mask=pad, sinks=sinks, cu_seqlens=boundaries(LENGTHS))
    want = dense_packed(q, k, v, pad, LENGTHS, weights, is_causal, 1.5, sinks)
    assert_equal_with_gradients(got, want, (q, k, v, sinks))


@pytest.mark.parametrize("make", [
    lambda softcap: DilatedAttention((4, 8), (1, 2), implementation="fast", softcap=softcap),
    lambda softcap: BlockSparseAttention("bigbird", block_size=2, num_random_blocks=1, softcap=softcap),
], ids=["dilated", "sparse"])
@torch.no_grad()
def test_both_features_change_a_packed_result(make):
    """The properties above are not met by dropping either feature."""
    q, k, v, _, sinks = make_inputs(sum(LENGTHS), 2, 2, False, True, seed=6)
    cu = boundaries(LENGTHS)
    plain = make(None)(q, k, v, cu_seqlens=cu)
    assert (make(1.0)(q, k, v, cu_seqlens=cu) - plain).abs().max() > 1e-2
    assert (make(None)(q, k, v, sinks=sinks, cu_seqlens=cu) - plain).abs().max() > 1e-2
