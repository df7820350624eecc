"""CSR layout operations (``patternstore.csr``) and the FlexAttention bridge
(``attention.block_mask``) against dense block matrices built in the test.

The generator's own layout properties (in range, sorted, no duplicates, no
empty row, unidirectional rows without future blocks, counts summing to the
number of indices, 500 examples) and its cross-process determinism are in
tests/test_generate.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention import BlockSparseAttention
from patternstore import SparseSpec, generate
from attention.block_mask import to_block_mask
from patternstore.csr import check_layout, drop_future_blocks, padded_rows, transpose_layout
from strategies import tiny_sparse_specs

pytestmark = pytest.mark.usefixtures("one_thread")


def dense_blocks(counts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """bool ``[H, nb, nb]`` from ``counts [H, nb]`` and either CSR indices
    (1-D) or padded rows ``[H, nb, width]``, entry by entry."""
    heads, nb = counts.shape
    out = torch.zeros(heads, nb, nb, dtype=torch.bool)
    flat = rows.tolist()
    at = 0
    for h in range(heads):
        for i in range(nb):
            count = int(counts[h, i])
            if rows.dim() == 1:
                out[h, i, flat[at: at + count]] = True
                at += count
            else:
                out[h, i, flat[h][i][:count]] = True
    return out


EXAMPLES = settings(max_examples=500, deadline=None)


@EXAMPLES
@given(tiny_sparse_specs(max_blocks=16))
def test_csr_operations_agree_with_dense_matrices(spec):
    pattern = generate(spec)
    counts, indices = pattern["kv_num_blocks"], pattern["kv_indices"]
    check_layout(counts, indices, spec.num_blocks)
    dense = dense_blocks(counts, indices)

    past = drop_future_blocks(counts, indices)
    check_layout(*past, spec.num_blocks)
    assert torch.equal(dense_blocks(*past), dense & torch.ones_like(dense[0]).tril())

    transposed = transpose_layout(counts, indices)
    check_layout(*transposed, spec.num_blocks)
    assert torch.equal(dense_blocks(*transposed), dense.transpose(1, 2))

    padded = padded_rows(counts, indices)
    assert padded.shape == (*counts.shape, int(counts.max()))
    assert torch.equal(dense_blocks(counts, padded), dense)


@EXAMPLES
@given(tiny_sparse_specs(max_blocks=16), st.booleans())
def test_block_masks_hold_exactly_the_layout(spec, force_causal):
    pattern = generate(spec)
    causal = force_causal or spec.params["attention"] == "unidirectional"
    mask = to_block_mask(pattern, causal=causal if force_causal else None)
    dense = dense_blocks(pattern["kv_num_blocks"], pattern["kv_indices"])
    nb = spec.num_blocks
    if causal:
        dense &= torch.ones(nb, nb, dtype=torch.bool).tril()

    def side(counts, rows):
        assert counts.shape == (1, spec.layout_heads, nb)
        assert rows.shape == (1, spec.layout_heads, nb, nb)  # CPU masks are nb wide
        return dense_blocks(counts[0], rows[0])

    partial = side(mask.kv_num_blocks, mask.kv_indices)
    assert torch.equal(side(mask.q_num_blocks, mask.q_indices), partial.transpose(1, 2))
    if causal:
        full = side(mask.full_kv_num_blocks, mask.full_kv_indices)
        assert torch.equal(side(mask.full_q_num_blocks, mask.full_q_indices), full.transpose(1, 2))
        eye = torch.eye(nb, dtype=torch.bool)
        assert not (partial & ~eye).any() and not (full & eye).any()  # only diagonal blocks are masked
        assert torch.equal(partial | full, dense)
    else:
        assert mask.full_kv_num_blocks is None
        assert torch.equal(partial, dense)
    assert mask.seq_lengths == (spec.seq_len, spec.seq_len)
    assert mask.BLOCK_SIZE == (spec.block_size, spec.block_size)


def test_block_mask_width_is_the_longest_row_when_asked():
    pattern = generate(SparseSpec("bigbird", seq_len=64 * 16, block_size=16, num_heads=2))
    longest = int(pattern["kv_num_blocks"].max())          # the global row: all 64 blocks
    mask = to_block_mask(pattern, causal=True, width=longest)
    assert mask.kv_indices.shape[-1] == longest
    with pytest.raises(ValueError, match="longest row"):
        to_block_mask(pattern, width=3)
    with pytest.raises(ValueError, match="width"):
        to_block_mask(pattern, width=65)
    with pytest.raises(ValueError, match="SparseSpec"):
        to_block_mask(generate(__import__("patternstore").DilatedSpec((16,), (2,), 2)))


@pytest.mark.slow
def test_flex_attention_with_the_block_mask_equals_the_module():
    """CPU flex_attention needs torch.compile and has no backward: forward only."""
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.reset()
    module = BlockSparseAttention("bigbird", block_size=16, seed=4, num_random_blocks=2,
                                  different_layout_per_head=True, attention="unidirectional")
    q, k, v = (torch.randn(2, 100, 4, 16) for _ in range(3))   # 7 blocks, the last one partial
    expected = module(q, k, v)
    mask = to_block_mask(generate(module.spec(100, 4)))
    flex = torch.compile(flex_attention, fullgraph=True)
    out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
