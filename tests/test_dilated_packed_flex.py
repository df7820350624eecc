"""The fused FlexAttention path over packed documents
(attention/dilated/packed_flex.py): the composed BlockMask and the mods
against the float64 dense multiplicity of each document alone (no flex
compile), and one compiled CPU forward against the fast path and the dense
reference."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention import DilatedAttention
from attention.dense_reference import dense_attention, multiplicity
from attention.dilated.packed_flex import document_mods, packed_block_mask, packed_flex_attention, packed_layout
from attention.dilated.plan import DilatedPlan, plan_branches
from attention.residue import residue_modulus
from patternstore import DilatedSpec, generate
from strategies import document_lengths, small_dilated_branches


def plan_of(segments, rates, heads, scheme) -> DilatedPlan:
    return DilatedPlan.from_pattern(generate(DilatedSpec(segments, rates, heads, scheme)))


def buffer_multiplicity(layout, lengths, heads, segments, rates, scheme, causal) -> torch.Tensor:
    """(heads, buffer, buffer) float64: each document's own dense multiplicity
    at its tokens' buffer positions, 0 elsewhere (fill, across documents)."""
    m = torch.zeros(heads, layout.length, layout.length, dtype=torch.float64)
    start = 0
    for n in lengths:
        if n:
            at = layout.dest[start:start + n]
            m[:, at[:, None], at[None, :]] = multiplicity(n, heads, segments, rates, scheme, causal)
        start += n
    return m


@st.composite
def cases(draw):
    segments, rates, heads, scheme = draw(small_dilated_branches(max_segment=12, max_rate=4, max_heads=4))
    lengths = draw(document_lengths(st.sampled_from([0, 1, 2, 5, 8, 9, 13, 16, 26, 40]), 6, 11))
    return segments, rates, heads, scheme, lengths, draw(st.sampled_from([4, 8])), draw(st.booleans())


@settings(max_examples=60, deadline=None)
@given(cases())
def test_composed_block_mask_is_the_block_reduction_of_each_document_alone(case):
    segments, rates, heads, scheme, lengths, block, causal = case
    plan = plan_of(segments, rates, heads, scheme)
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    layout = packed_layout(plan, bounds, block, causal)
    nb = layout.length // block
    assert layout.length == sum(-(-n // block) * block for n in lengths)
    assert sorted(layout.dest.tolist()) == sorted(set(layout.dest.tolist())), "tokens take distinct slots"
    m = buffer_multiplicity(layout, lengths, heads, segments, rates, scheme, causal)
    cells = m.view(heads, nb, block, nb, block).transpose(2, 3).flatten(-2) > 0
    mask = packed_block_mask(layout, torch.device("cpu"))
    assert torch.equal(mask.to_dense()[0].bool(), cells.any(-1))
    full = torch.zeros(heads, nb, nb, dtype=torch.bool)
    rows = torch.repeat_interleave(torch.arange(heads * nb), layout.kv_num_blocks.ravel().long())
    full.view(-1, nb)[rows[layout.full], layout.kv_indices[layout.full].long()] = True
    assert not bool((full & ~cells.all(-1)).any()), "a block marked full holds a pair that does not attend"


@settings(max_examples=40, deadline=None)
@given(cases(), st.booleans())
def test_mods_recount_each_documents_multiplicity(case, padded):
    segments, rates, heads, scheme, lengths, block, causal = case
    plan = plan_of(segments, rates, heads, scheme)
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    layout = packed_layout(plan, bounds, block, causal)
    pad = torch.arange(bounds[-1]) % 3 == 1 if padded else torch.zeros(bounds[-1], dtype=torch.bool)
    query_valid = torch.zeros(layout.length, dtype=torch.bool)
    query_valid[layout.dest] = True
    key_valid = query_valid.clone()
    key_valid[layout.dest] = ~pad
    score_mod, mask_mod = document_mods(plan_branches(plan), residue_modulus(rates), causal, layout.doc_length,
                                layout.doc_index, query_valid, key_valid)
    h = torch.arange(heads)[:, None, None]
    i = torch.arange(layout.length)
    qi, ki = i[None, :, None], i[None, None, :]
    m = buffer_multiplicity(layout, lengths, heads, segments, rates, scheme, causal)
    # Flex evaluates the mods inside the block-diagonal mask only: pairs of one document's blocks.
    start = i - layout.doc_index
    same = (start[:, None] == start[None, :]).expand(heads, -1, -1)
    keep = mask_mod(0, h, qi, ki)
    assert torch.equal(keep[same], ((m > 0) & query_valid[None, :, None] & key_valid[None, None, :])[same])
    scores = score_mod(torch.zeros((), dtype=torch.float64), 0, h, qi, ki)
    keep = keep & same
    torch.testing.assert_close(scores[keep], m[keep].log(), rtol=0, atol=1e-12)


def test_compiled_cpu_forward_equals_the_fast_path_and_the_dense_reference(monkeypatch):
    import attention.dilated.packed as packed

    calls = []
    monkeypatch.setattr(packed, "packed_flex_attention",
                        lambda *a, **kw: calls.append(1) or packed_flex_attention(*a, **kw))
    segments, rates, heads, kv_heads = (16, 48), (1, 3), 4, 2
    lengths = [37, 0, 1, 64, 130, 20]   # not multiples of the block, R or a segment; empty; one token
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    n = int(cu[-1])
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, n, heads, 16, generator=g)
    k, v = (torch.randn(1, n, kv_heads, 16, generator=g) for _ in range(2))
    pad = torch.rand(1, n, generator=g) < 0.2
    k[pad], v[pad] = float("nan"), float("inf")  # padded keys reach no output
    flex = DilatedAttention(segments, rates, implementation="flex")
    fast = DilatedAttention(segments, rates, implementation="fast")
    with torch.no_grad():
        got = flex(q, k, v, is_causal=True, key_padding_mask=pad, cu_seqlens=cu)
        want = fast(q, k, v, is_causal=True, key_padding_mask=pad, cu_seqlens=cu)
    assert calls == [1], "implementation='flex' ran the fused packed path"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    parts = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if b > a:
            m = multiplicity(b - a, heads, segments, rates, "longnet", True)
            kk, vv = (x[:, a:b].masked_fill(pad[:, a:b, None, None], 0.0).double() for x in (k, v))
            parts.append(dense_attention(q[:, a:b].double(), kk, vv, weight=m, key_padding_mask=pad[:, a:b]))
    torch.testing.assert_close(got.double(), torch.cat(parts, 1), rtol=1e-5, atol=1e-5)
