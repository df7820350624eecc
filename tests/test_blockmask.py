"""The flex path of the block-sparse modules (issue 12 section 3) on the CPU:
``patternstore.blockmask.layout_block_mask`` against dense block matrices,
the dispatch rule, and FlexAttention on those masks (CPU flex runs compiled,
inference only) against the float64 dense reference of tests/test_sparse.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attention.sparse as sparse
from attention import BlockSparseAttention
from patternstore import PatternStore, generate
from patternstore.blockmask import layout_block_mask, with_key_padding
from patternstore.csr import drop_future_blocks
from strategies import tiny_sparse_specs
from test_layouts import dense_blocks
from test_sparse import allowed_pairs, reference_attention

pytestmark = pytest.mark.usefixtures("one_thread")


@settings(max_examples=200, deadline=None)
@given(tiny_sparse_specs(max_blocks=12), st.booleans(), st.booleans())
def test_layout_block_masks_split_the_layout_into_partial_and_full_blocks(spec, causal, padded):
    pattern = generate(spec)
    counts, indices = pattern["kv_num_blocks"], pattern["kv_indices"]
    causal = causal or spec.params["attention"] == "unidirectional"
    mask = layout_block_mask(counts, indices, spec.seq_len, spec.block_size, causal=causal, padded=padded)
    nb = spec.num_blocks
    want = dense_blocks(*(drop_future_blocks(counts, indices) if causal else (counts, indices)))

    def side(num, rows):
        assert num.shape == (1, spec.layout_heads, nb) and rows.shape == (1, spec.layout_heads, nb, nb)
        return dense_blocks(num[0], rows[0])

    partial, full = side(mask.kv_num_blocks, mask.kv_indices), side(mask.full_kv_num_blocks, mask.full_kv_indices)
    assert torch.equal(side(mask.q_num_blocks, mask.q_indices), partial.transpose(1, 2))
    assert torch.equal(side(mask.full_q_num_blocks, mask.full_q_indices), full.transpose(1, 2))
    assert torch.equal(partial | full, want) and not (partial & full).any()
    masked = torch.zeros(nb, nb, dtype=torch.bool)
    if padded:
        masked[:] = True
    if causal:
        masked |= torch.eye(nb, dtype=torch.bool)
    if spec.seq_len % spec.block_size:
        masked[:, -1] = True
    assert torch.equal(partial, want & masked)
    assert mask.seq_lengths == (spec.seq_len, spec.seq_len)


def test_attention_path_is_flex_for_square_dropout_free_cuda_calls_only():
    assert sparse.attention_path("cuda", 100, 100, 0.0, 16) == "flex"
    assert sparse.attention_path("cuda", 1, 100, 0.0, 16) == "gather"       # decode: rows not block aligned
    assert sparse.attention_path("cuda", 100, 100, 0.1, 16) == "gather"     # flex has no dropout
    assert sparse.attention_path("cuda", 100, 100, 0.0, 8) == "gather"      # blocks below FLEX_MIN_BLOCK
    assert sparse.attention_path("cpu", 100, 100, 0.0, 16) == "gather"      # no CPU backward, no CPU lse
    assert sparse.attention_path("meta", 100, 100, 0.0, 16) == "gather"


@pytest.fixture
def flex_on_cpu(monkeypatch):
    monkeypatch.setattr(sparse, "FLEX_DEVICE_TYPES", ("cuda", "cpu"))


@pytest.mark.slow
def test_the_flex_path_equals_the_reference(tmp_path, flex_on_cpu):
    """Eager (the kept BlockMask) and compiled (its arrays through the
    patternstore::sparse_block_mask operator): causal diagonal blocks, the
    padded tail (n = 90, block 16), a key_padding_mask, grouped heads."""
    torch._dynamo.reset()
    store = PatternStore(tmp_path / "store")
    module = BlockSparseAttention("bigbird", block_size=16, seed=3, num_random_blocks=2,
                                  different_layout_per_head=True, store=store)
    n = 90
    q = torch.randn(2, n, 4, 16)
    k, v = (torch.randn(2, n, 2, 16) for _ in range(2))
    key_padding_mask = torch.arange(n).expand(2, n) % 7 == 2
    pattern = generate(module.spec(n, 4))
    compiled = torch.compile(module, fullgraph=True)
    for causal, run in ((False, module), (True, compiled)):
        pairs = allowed_pairs(pattern["kv_num_blocks"], pattern["kv_indices"], n, 16, causal, 4)
        expected = reference_attention(q, k, v, pairs, key_padding_mask)
        with torch.no_grad():
            out = run(q, k, v, is_causal=causal, key_padding_mask=key_padding_mask)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    source = module.layouts
    assert len(source._block_masks) == 2                  # one per (causal, padded) asked for: kept, not rebuilt
    mask = source.block_mask(n, 4, q.device, True, True)
    assert mask is source.block_mask(n, 4, q.device, True, True)
    assert with_key_padding(mask, key_padding_mask).kv_indices is mask.kv_indices
