"""Packed documents in block-sparse attention (attention/sparse/packed.py):
each document of a ``cu_seqlens`` batch equals that document run alone
(outputs and q/k/v gradients, float64, 1e-10), the same against the dense
float64 reference with a document mask, the corner property the one-layout
path relies on (checked on the generator, for every kind), the functional
corner rule, the compile contract, and every bad ``cu_seqlens``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attention.sparse.module as sparse
from attention import BlockSparseAttention, MultiheadBlockSparseAttention, block_sparse_attention
from attention.dense_reference import block_pairs, dense_attention, layout_blocks
from attention.block_mask import block_diagonal
from patternstore import PatternStore, SparseSpec, generate
from patternstore.csr import drop_future_blocks
from patternstore.kinds import SPARSE_KINDS
from strategies import document_lengths, sparse_params

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return PatternStore(tmp_path_factory.mktemp("packed-store"))


def boundaries(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int64)


def per_document(call, lengths: list[int], *tensors: torch.Tensor, padding=None) -> torch.Tensor:
    """``call`` on each non-empty document alone, concatenated."""
    cu, outs = boundaries(lengths).tolist(), []
    for a, b in zip(cu[:-1], cu[1:]):
        if a < b:
            mask = None if padding is None else padding[:, a:b]
            outs.append(call(*(t[:, a:b] for t in tensors), mask))
    return torch.cat(outs, 1)


def inputs(n: int, heads: int, kv_heads: int, dim: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(1, n, heads, dim, dtype=torch.float64, generator=generator)
    k, v = (torch.randn(1, n, kv_heads, dim, dtype=torch.float64, generator=generator) for _ in range(2))
    return tuple(t.requires_grad_() for t in (q, k, v))


def assert_same_with_gradients(packed, alone, tensors) -> None:
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(packed)
    got = torch.autograd.grad(packed, tensors, grad)
    expected = torch.autograd.grad(alone, tensors, grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def padding_inside(lengths: list[int], draw_bits: list[bool]) -> torch.Tensor:
    """(1, total) bool: some keys inside documents marked padding."""
    total = sum(lengths)
    bits = (draw_bits * (total // max(len(draw_bits), 1) + 1))[:total]
    return torch.tensor(bits, dtype=torch.bool)[None]


KINDS = ["bigbird", "bslongformer", "fixed", "variable", "dense", "local", "dilated_blocks"]


# ------------------------------------------------------------ the corner property
def corner(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, nb: int) -> torch.Tensor:
    """bool [H, nb, nb]: the top-left corner of a layout, from its CSR rows."""
    return layout_blocks(kv_num_blocks, kv_indices)[:, :nb, :nb]


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_a_prefix_stable_layout_is_the_corner_of_every_longer_one(data):
    """The one-layout path's premise, on the generator: for every kind whose
    spec says ``is_prefix_stable``, the layout of ``nb`` blocks (bidirectional,
    or causal after the causal rule) is the top-left corner of the layout of
    any longer length."""
    kind = data.draw(st.sampled_from(sorted(SPARSE_KINDS)))
    short = data.draw(st.integers(1, 10))
    long = data.draw(st.integers(short, 24))
    params = sparse_params(data.draw, kind, short)
    heads = data.draw(st.integers(1, 3))
    causal = data.draw(st.booleans())
    spec_short, spec_long = (SparseSpec(kind, seq_len=nb * 2, block_size=2, num_heads=heads, seed=5, **params)
                             for nb in (short, long))
    if not spec_short.is_prefix_stable:
        return
    layouts = [generate(s) for s in (spec_short, spec_long)]
    arrays = [(p["kv_num_blocks"], p["kv_indices"]) for p in layouts]
    if causal:
        arrays = [drop_future_blocks(*a) for a in arrays]
    assert torch.equal(corner(*arrays[1], short), corner(*arrays[0], short))


@pytest.mark.parametrize("kind, params, lengths", [
    ("bigbird", {"num_random_blocks": 2}, (5, 9)),
    ("variable", {"num_random_blocks": 1}, (5, 9)),
    ("fixed", {"num_local_blocks": 4, "num_global_blocks": 1}, (6, 8)),
])
def test_the_kinds_that_are_not_prefix_stable_are_not_corners(kind, params, lengths):
    """The classification is tight: these (bidirectional) layouts at a short
    length are not the corner of a longer one, so each block count is fetched."""
    short, long = (generate(SparseSpec(kind, seq_len=nb, block_size=1, num_heads=1, seed=3, **params))
                   for nb in lengths)
    assert not SparseSpec(kind, seq_len=8, block_size=1, **params).is_prefix_stable
    assert not torch.equal(corner(long["kv_num_blocks"], long["kv_indices"], lengths[0]),
                           corner(short["kv_num_blocks"], short["kv_indices"], lengths[0]))


def test_block_diagonal_places_each_corner_on_the_block_diagonal():
    counts = torch.tensor([[1, 2, 3], [3, 1, 2]], dtype=torch.int32)
    indices = torch.tensor([0, 0, 1, 0, 1, 2, 0, 1, 2, 1, 0, 2], dtype=torch.int32)
    got_counts, got_indices, _ = block_diagonal(counts, indices, torch.zeros(3, dtype=torch.int64),
                                                torch.tensor([2, 0, 3]))
    assert got_counts.tolist() == [[1, 2, 1, 2, 3], [2, 1, 3, 1, 2]]
    assert got_indices.tolist() == [0, 0, 1, 2, 2, 3, 2, 3, 4, 0, 1, 1, 2, 3, 4, 3, 2, 4]


# ------------------------------------------------------------ equal to per-document calls
@st.composite
def packed_cases(draw):
    block = draw(st.sampled_from([1, 2, 4]))
    lengths = draw(document_lengths(st.integers(0, 5 * block + 1), 7, 3 * block))
    if draw(st.booleans()):  # more documents than blocks
        lengths += [1] * draw(st.integers(1, 6))
    kind = draw(st.sampled_from(KINDS))
    params = sparse_params(draw, kind, 1)  # valid for documents of one block
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2]))
    causal = draw(st.booleans())
    padding = draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=1, max_size=7)))
    return block, lengths, kind, params, heads, kv_heads, causal, padding


@settings(max_examples=40, deadline=None)
@given(case=packed_cases(), fused=st.booleans())
def test_a_packed_batch_equals_its_documents_run_alone(case, fused, store):
    """Output and q/k/v gradients, float64, every kind, lengths 0 and 1 and
    not multiples of the block, causal and not, GQA, padding inside
    documents, both CPU kernels of the tiles."""
    import attention.sparse.tiles as sparse_tiles

    block, lengths, kind, params, heads, kv_heads, causal, bits = case
    module = BlockSparseAttention(kind, block_size=block, store=store, seed=11, **params)
    tensors = inputs(sum(lengths), heads, kv_heads)
    padding = None if bits is None else padding_inside(lengths, bits)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sparse_tiles, "USE_CPU_FLASH_KERNEL", fused)
        packed = module(*tensors, is_causal=causal, key_padding_mask=padding, cu_seqlens=boundaries(lengths))
        alone = per_document(lambda q, k, v, m: module(q, k, v, is_causal=causal, key_padding_mask=m), lengths,
                             *tensors, padding=padding)
        assert_same_with_gradients(packed, alone, tensors)


@settings(max_examples=25, deadline=None)
@given(case=packed_cases(), seed=st.integers(0, 100))
def test_the_functional_api_gives_each_document_the_corner_of_the_given_layout(case, seed):
    block, lengths, kind, params, heads, kv_heads, causal, bits = case
    total = sum(lengths)
    pattern = generate(SparseSpec(kind, seq_len=total, block_size=block, num_heads=heads, seed=seed, **params))
    counts, indices = pattern["kv_num_blocks"], pattern["kv_indices"]
    tensors = inputs(total, heads, kv_heads, seed=seed)
    padding = None if bits is None else padding_inside(lengths, bits)
    packed = block_sparse_attention(*tensors, counts, indices, block, causal=causal, key_padding_mask=padding,
                                    cu_seqlens=boundaries(lengths).to(torch.int32))

    def alone(q, k, v, mask):
        nb = -(-q.shape[1] // block)
        dense = corner(counts, indices, nb)                                  # the document's corner layout
        rows = dense.sum(-1).to(torch.int32)
        cols = torch.cat([row.nonzero().flatten() for head in dense for row in head]).to(torch.int32)
        return block_sparse_attention(q, k, v, rows, cols, block, causal=causal, key_padding_mask=mask)

    assert_same_with_gradients(packed, per_document(alone, lengths, *tensors, padding=padding), tensors)


# ------------------------------------------------------------ the dense reference
def document_pairs(lengths: list[int], layouts, block: int, causal: bool) -> torch.Tensor:
    """bool [H, n, n]: block-diagonal, each document's own layout at its own length."""
    n = sum(lengths)
    heads = max(counts.shape[0] for counts, _ in layouts if counts is not None)
    allowed = torch.zeros(heads, n, n, dtype=torch.bool)
    start = 0
    for length, (counts, indices) in zip(lengths, layouts):
        if length:
            pairs = block_pairs(counts, indices, length, block)
            if causal:
                pairs = pairs & torch.ones(length, length, dtype=torch.bool).tril()
            allowed[:, start:start + length, start:start + length] = pairs
        start += length
    return allowed


@pytest.mark.parametrize("kind, params, causal", [
    ("bigbird", {"num_random_blocks": 1}, False),
    ("bslongformer", {"global_block_indices": [0]}, True),
    ("fixed", {"num_local_blocks": 2, "num_global_blocks": 1, "different_layout_per_head": True,
               "num_different_global_patterns": 2}, False),
    ("variable", {"local_window_blocks": [1, 2]}, False),
    ("dense", {}, True),
])
def test_a_packed_batch_equals_the_dense_reference_with_a_document_mask(kind, params, causal, store):
    lengths, block, heads = [5, 0, 1, 11, 8, 3], 4, 2
    module = BlockSparseAttention(kind, block_size=block, store=store, **params)
    q, k, v = inputs(sum(lengths), heads, 1, seed=3)
    padding = torch.zeros(1, sum(lengths), dtype=torch.bool)
    padding[0, [2, 9, 10]] = True
    out = module(q, k, v, is_causal=causal, key_padding_mask=padding, cu_seqlens=boundaries(lengths))
    layouts = []
    for length in lengths:
        if not length:
            layouts.append((None, None))
            continue
        spec = SparseSpec(kind, seq_len=length, block_size=block, num_heads=heads, **params)
        pattern = generate(spec)
        layouts.append((pattern["kv_num_blocks"], pattern["kv_indices"]))
    allowed = document_pairs(lengths, layouts, block, causal or params.get("attention") == "unidirectional")
    expected = dense_attention(q, k, v, weight=allowed.expand(heads, -1, -1), key_padding_mask=padding)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    for g, e in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad)):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_the_multihead_layer_takes_packed_documents(store):
    torch.manual_seed(0)
    layer = MultiheadBlockSparseAttention(16, 4, "bigbird", block_size=4, num_random_blocks=1, store=store,
                                          dtype=torch.float64)
    lengths = [7, 1, 0, 12]
    x = torch.randn(1, sum(lengths), 16, dtype=torch.float64, requires_grad=True)
    packed, _ = layer(x, is_causal=True, cu_seqlens=boundaries(lengths))
    alone = per_document(lambda xi, mask: layer(xi, is_causal=True)[0], lengths, x)
    assert_same_with_gradients(packed, alone, (x,))


def test_a_document_too_short_for_the_layout_is_refused_naming_it(store):
    module = BlockSparseAttention("bigbird", block_size=2, num_random_blocks=4, store=store)
    q = torch.randn(1, 22, 2, 4)
    with pytest.raises(ValueError, match=r"cu_seqlens: document 1 \(length 5\).*num_random_blocks"):
        module(q, q, q, cu_seqlens=torch.tensor([0, 8, 13, 22]))


def test_a_global_block_past_a_short_document_is_skipped_as_alone(store):
    """DeepSpeed's rule at every length: a global index past a document's
    blocks is skipped there, so the document gets what it gets alone."""
    module = BlockSparseAttention("bslongformer", block_size=2, global_block_indices=[3], store=store)
    q = torch.randn(1, 22, 2, 4)
    cu = torch.tensor([0, 8, 13, 22])
    out = module(q, q, q, cu_seqlens=cu)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        torch.testing.assert_close(out[:, a:b], module(q[:, a:b], q[:, a:b], q[:, a:b]))


@pytest.mark.slow
def test_the_flex_path_builds_its_block_mask_from_the_composed_layout(store, monkeypatch):
    """CPU flex (forward only, one small case: it compiles)."""
    module = BlockSparseAttention("bigbird", block_size=16, num_random_blocks=1, store=store).eval()
    lengths = [20, 0, 33, 16, 5]
    q, k, v = (t.detach().float() for t in inputs(sum(lengths), 2, 1, dim=16, seed=1))
    with torch.no_grad():
        alone = per_document(lambda a, b, c, m: module(a, b, c, is_causal=True), lengths, q, k, v)
        monkeypatch.setattr(sparse, "FLEX_DEVICE_TYPES", ("cpu",))
        packed = module(q, k, v, is_causal=True, cu_seqlens=boundaries(lengths))
    torch.testing.assert_close(packed, alone, rtol=2e-5, atol=2e-5)


# ------------------------------------------------------------ compile
@pytest.mark.slow
def test_compiled_packed_attention_equals_eager_and_never_recompiles_across_splits(store):
    """cu_seqlens is a tensor input: new splits reuse the graph. Its size (the
    document count) is a shape, static by default: marked dynamic once, any
    count shares the graph (dynamic=True marks it already)."""
    torch._dynamo.reset()
    module = BlockSparseAttention("bigbird", block_size=4, num_random_blocks=1, store=store)
    compiled = torch.compile(module, fullgraph=True)
    q, k, v = (torch.randn(1, 30, 2, 8) for _ in range(3))
    first = boundaries([7, 23])
    torch._dynamo.mark_dynamic(first, 0)
    compiled(q, k, v, cu_seqlens=first)
    with torch.compiler.set_stance("fail_on_recompile"):
        for lengths in ([13, 17], [0, 30], [1] * 10 + [20], [13, 0, 17]):
            cu = boundaries(lengths)
            torch.testing.assert_close(compiled(q, k, v, cu_seqlens=cu), module(q, k, v, cu_seqlens=cu),
                                       rtol=0, atol=0)

    dynamic = torch.compile(module, fullgraph=True, dynamic=True)
    dynamic(*(t.requires_grad_() for t in (q, k, v)), is_causal=True, cu_seqlens=boundaries([30, 0]))
    with torch.compiler.set_stance("fail_on_recompile"):
        for lengths in ([4, 15], [40, 1, 0, 2], [0, 30]):
            x = tuple(torch.randn(1, sum(lengths), 2, 8, requires_grad=True) for _ in range(3))
            cu = boundaries(lengths)
            out = dynamic(*x, is_causal=True, cu_seqlens=cu)
            grads = torch.autograd.grad(out.sum(), x)  # the registered backward, in the compiled graph
            expected = module(*x, is_causal=True, cu_seqlens=cu)
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
            for g, e in zip(grads, torch.autograd.grad(expected.sum(), x)):
                torch.testing.assert_close(g, e, rtol=0, atol=0)

    sequence, documents = torch.export.Dim("sequence", min=5, max=4096), torch.export.Dim("documents", max=4096)
    program = torch.export.export(module, (q, k, v), {"cu_seqlens": boundaries([12, 18])},
                                  dynamic_shapes={"q": {1: sequence}, "k": {1: sequence}, "v": {1: sequence},
                                                  "cu_seqlens": {0: documents}})
    for lengths in ([3, 22], [40, 0, 7]):
        x = tuple(torch.randn(1, sum(lengths), 2, 8) for _ in range(3))
        cu = boundaries(lengths)
        torch.testing.assert_close(program.module()(*x, cu_seqlens=cu), module(*x, cu_seqlens=cu), rtol=0, atol=0)


# ------------------------------------------------------------ bad cu_seqlens
@pytest.mark.parametrize("cu_seqlens, q_shape, kv_len, message", [
    (torch.tensor([[0, 8]]), (1, 8), 8, "must be 1-D"),
    (torch.tensor([0.0, 8.0]), (1, 8), 8, "integer dtype"),
    ([0, 8], (1, 8), 8, "torch.Tensor"),
    (torch.tensor([1, 8]), (1, 8), 8, "must start at 0"),
    (torch.tensor([0, 5, 3, 8]), (1, 8), 8, "must not decrease"),
    (torch.tensor([0, 5, 7]), (1, 8), 8, "must end at the sequence length 8"),
    (torch.tensor([0, 8], device="meta"), (1, 8), 8, "on q's device"),
    (torch.tensor([0, 8]), (2, 8), 8, "batch must be 1"),
    (torch.tensor([0, 4]), (1, 4), 8, "q_len must equal kv_len"),
])
@pytest.mark.parametrize("entry", ["module", "functional", "multihead"])
def test_every_bad_cu_seqlens_gets_its_error(cu_seqlens, q_shape, kv_len, message, entry, store):
    q = torch.randn(*q_shape, 2, 4)
    k = torch.randn(q_shape[0], kv_len, 2, 4)
    if entry == "module":
        call = lambda: BlockSparseAttention("dense", block_size=2, store=store)(q, k, k, cu_seqlens=cu_seqlens)
    elif entry == "functional":
        nb = -(-kv_len // 2)
        call = lambda: block_sparse_attention(q, k, k, torch.full((1, nb), nb, dtype=torch.int32),
                                              torch.arange(nb, dtype=torch.int32).repeat(nb), 2,
                                              cu_seqlens=cu_seqlens)
    else:
        layer = MultiheadBlockSparseAttention(8, 2, "dense", block_size=2, store=store)
        call = lambda: layer(q.flatten(-2), k.flatten(-2), k.flatten(-2), cu_seqlens=cu_seqlens)
    with pytest.raises(ValueError, match=message):
        call()
