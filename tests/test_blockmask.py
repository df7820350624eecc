"""The flex path of the block-sparse modules on the CPU:
``attention.block_mask.block_mask_from_csr`` against dense block matrices,
the dispatch rule, and FlexAttention on those masks (CPU flex runs compiled,
inference only) against the float64 dense reference of tests/test_sparse.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attention.block_mask as flex
import attention.kernels.flex as flex_kernel
import attention.sparse.module as sparse
from attention import BlockSparseAttention
from patternstore import PatternStore, generate
from patternstore.csr import drop_future_blocks
from attention.dense_reference import block_pairs
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
    mask = flex.block_mask_from_csr(counts, indices, block_size=spec.block_size, q_len=spec.seq_len,
                                    kv_len=spec.seq_len, causal=causal, padded=padded)
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


@settings(max_examples=100, deadline=None)
@given(tiny_sparse_specs(max_blocks=8), st.booleans(), st.booleans(), st.integers(0, 2**16))
def test_a_mask_from_csr_selects_exactly_the_module_s_pairs(spec, causal, full_blocks, seed):
    """Every (batch, head, query, key) the BlockMask lets through (its
    blocks, the mask_mod on partial ones) equals the dense rule: the
    layout's block pairs, causal, key < kv_len, key not padded."""
    pattern = generate(spec)
    counts, indices = pattern["kv_num_blocks"], pattern["kv_indices"]
    n, bs, heads = spec.seq_len, spec.block_size, spec.layout_heads
    pad = torch.rand(2, n, generator=torch.Generator().manual_seed(seed)) < 0.3
    mask = flex.block_mask_from_csr(counts, indices, block_size=bs, q_len=n, kv_len=n, causal=causal,
                                    key_padding_mask=pad, full_blocks=full_blocks)
    nb = spec.num_blocks
    position = torch.arange(nb * bs)
    b, h, q, kv = torch.meshgrid(torch.arange(2), torch.arange(heads), position, position, indexing="ij")
    cut = mask.mask_mod(b, h, q, kv.clamp(max=n - 1)) & (kv < n)          # the mask_mod, on real keys only
    got = torch.zeros(2, heads, nb * bs, nb * bs, dtype=torch.bool)
    for counts_name, rows_name, is_full in (("kv_num_blocks", "kv_indices", False),
                                            ("full_kv_num_blocks", "full_kv_indices", True)):
        if getattr(mask, counts_name) is None:
            continue
        blocks = dense_blocks(getattr(mask, counts_name)[0], getattr(mask, rows_name)[0])  # [H, nb, nb]
        selected = blocks[:, position[:, None] // bs, position[None, :] // bs][None]
        got |= selected & (True if is_full else cut)
    want = block_pairs(counts, indices, n, bs)[None].expand(2, heads, n, n) & ~pad[:, None, None, :]
    if causal:
        want = want & torch.ones(n, n, dtype=torch.bool).tril()
    assert torch.equal(got[:, :, :n, :n], want)


def test_flex_tiles_divide_the_blocks():
    assert flex_kernel.flex_tiles(128) == {} and flex_kernel.flex_tiles(256) == {}
    for block in (16, 32, 48, 64, 96, 192):
        tiles = flex_kernel.flex_tiles(block)
        assert set(tiles) == {"BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2"}
        assert all(block % tile == 0 and tile >= flex_kernel.FLEX_MIN_BLOCK for tile in tiles.values())
    assert flex_kernel.flex_tiles(64)["BLOCK_M"] == 64 and flex_kernel.flex_tiles(96)["BLOCK_N"] == 32


def test_attention_path_is_flex_for_square_dropout_free_cuda_calls_only():
    assert sparse.attention_path("cuda", 100, 100, 0.0, 16) == "flex"
    assert sparse.attention_path("cuda", 1, 100, 0.0, 16) == "gather"       # decode: rows not block aligned
    assert sparse.attention_path("cuda", 100, 100, 0.1, 16) == "gather"     # flex has no dropout
    assert sparse.attention_path("cuda", 100, 100, 0.0, 8) == "gather"      # blocks below FLEX_MIN_BLOCK
    assert sparse.attention_path("cuda", 100, 100, 0.0, 24) == "gather"     # no 16-multiple tile divides 24
    assert sparse.attention_path("cuda", 100, 100, 0.0, 48) == "flex"
    assert sparse.attention_path("cpu", 100, 100, 0.0, 16) == "gather"      # no CPU backward, no CPU lse
    assert sparse.attention_path("meta", 100, 100, 0.0, 16) == "gather"


@pytest.fixture
def flex_on_cpu(monkeypatch):
    monkeypatch.setattr(sparse, "FLEX_DEVICE_TYPES", ("cuda", "cpu"))


@pytest.mark.slow
def test_the_flex_path_equals_the_reference(tmp_path, flex_on_cpu):
    """Eager (the kept BlockMask) and compiled (its arrays through the
    trace-time constant arrays): causal diagonal blocks, the
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
    assert flex.with_key_padding(mask, key_padding_mask).kv_indices is mask.kv_indices


# ------------------------------------------------------------ on a GPU
# Output and (relative) gradient tolerances against float64: bf16 keeps 8
# bits of mantissa (2^-8 = 4e-3 per rounding; scores, softmax and the value
# sum each round once), float32 in flex may use TF32 matmuls (2^-11).
CUDA_TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 2e-3}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind,params,kv_heads,causal,padded,q_len", [
    ("bigbird", dict(num_random_blocks=2, different_layout_per_head=True), 8, True, False, None),
    ("bigbird", dict(num_random_blocks=2), 2, False, True, None),
    ("local", dict(num_sliding_window_blocks=3), 2, True, True, None),
    ("bslongformer", dict(global_block_indices=(0, 3), attention="unidirectional"), 4, False, False, None),
    ("local", dict(num_sliding_window_blocks=3), 2, True, True, 1),             # decode: the gather path
    ("bigbird", dict(num_random_blocks=2, attention="unidirectional"), 4, True, False, 70),
], ids=["bigbird-per-head-causal", "bigbird-gqa-padded", "local-causal-padded", "bslongformer-uni",
        "local-decode", "bigbird-chunk"])
def test_cuda_outputs_and_gradients_match_the_reference(kind, params, kv_heads, causal, padded, q_len, dtype,
                                                        tmp_path):
    device, n, heads, block = torch.device("cuda"), 1000, 8, 64     # 16 blocks, the last one partial
    module = BlockSparseAttention(kind, block_size=block, seed=1, store=PatternStore(tmp_path / "s"), **params)
    q_len = n if q_len is None else q_len
    torch.manual_seed(0)
    q = torch.randn(2, q_len, heads, 64, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, n, kv_heads, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    key_padding_mask = (torch.arange(n, device=device).expand(2, n) % 11 == 3) if padded else None
    out = module(q, k, v, is_causal=causal, key_padding_mask=key_padding_mask)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    pattern = generate(module.spec(n, heads))
    pairs = allowed_pairs(pattern["kv_num_blocks"], pattern["kv_indices"], n, block,
                          causal or module.layouts.unidirectional, heads).to(device)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = reference_attention(*exact, pairs, key_padding_mask)
    want = torch.autograd.grad(expected, exact, grad.double())
    tolerance = CUDA_TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)
    for name, a, b in zip("qkv", got, want):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double() / scale, b / scale, rtol=4 * tolerance, atol=4 * tolerance,
                                   msg=lambda m: f"grad {name}: {m}")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_compiled_module_does_not_recompile_at_a_repeated_shape(tmp_path):
    torch._dynamo.reset()
    module = BlockSparseAttention("bigbird", block_size=128, num_random_blocks=2, store=PatternStore(tmp_path / "s"))
    compiled = torch.compile(module, fullgraph=True)
    x = [torch.randn(1, 4096, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    compiled(*x).sum().backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            compiled(*x).sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(compiled(*x), module(*x), rtol=2e-2, atol=2e-2)
