"""What the README promises of every module, through the public API as a user
writes it, against the float64 dense reference (tests/dense_reference.py):

- a padded key never changes an output, NaN and Inf in its VALUE included,
  outputs and gradients, in every module and path (block-sparse: the fused
  and explicit tiles, full, causal, decode and chunked rows, the functional
  API, the multi-head layer; dilated: each implementation);
- an empty batch returns an empty output, as SDPA does, with gradients;
- numpy integers (anything with ``__index__``) are taken wherever an int is,
  and no error names a field the caller did not pass.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import attention.sparse.tiles as sparse_tiles
from attention import (
    BlockSparseAttention,
    DilatedAttention,
    ImprovedMultiheadDilatedAttention,
    MultiheadBlockSparseAttention,
    MultiheadDilatedAttention,
    block_sparse_attention,
)
from attention.dense_reference import block_pairs, dense_attention, dense_dilated_attention
from patternstore import DilatedSpec, PatternStore, SparseSpec, generate

pytestmark = pytest.mark.usefixtures("one_thread")

BAD = (float("nan"), float("inf"), float("-inf"))


@pytest.fixture(params=["fused", "explicit"])
def cpu_path(request, monkeypatch):
    """The tiles through the fused CPU flash kernel and through matmul."""
    monkeypatch.setattr(sparse_tiles, "USE_CPU_FLASH_KERNEL", request.param == "fused")
    return request.param


def poisoned(n: int, heads: int, kv_heads: int, pad: torch.Tensor, d: int = 8, d_v: int = 8):
    """float64 q, k, v leaves whose padded k and v rows hold NaN, Inf and
    -Inf, and the clean k, v (padded rows 0) the reference takes."""
    gen = torch.Generator().manual_seed(0)
    b = pad.shape[0]
    q = torch.randn(b, n, heads, d, dtype=torch.float64, generator=gen)
    k = torch.randn(b, n, kv_heads, d, dtype=torch.float64, generator=gen)
    v = torch.randn(b, n, kv_heads, d_v, dtype=torch.float64, generator=gen)
    clean = [x.masked_fill(pad[..., None, None], 0.0).requires_grad_() for x in (k, v)]
    where = pad.nonzero()
    for i, (row, position) in enumerate(where.tolist()):
        k[row, position] = BAD[i % 3]
        v[row, position] = BAD[(i + 1) % 3]
    return [x.requires_grad_() for x in (q, k, v)], clean


def padding(n: int) -> torch.Tensor:
    pad = torch.zeros(2, n, dtype=torch.bool)
    pad[0, :3] = True            # left padding
    pad[1, n - 4:] = True        # right padding
    return pad


def assert_equal_with_gradients(out, leaves, expected, reference_leaves, rows=slice(None)):
    """out (over its last rows ``rows`` of the reference) and its q, k, v
    gradients equal the reference's, every value finite."""
    expected = expected[:, rows]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(expected, reference_leaves, grad)
    for name, a, b in zip("qkv", got, want):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8, msg=lambda m: f"grad {name}: {m}")


# ------------------------------------------------- a padded value, block-sparse
SPARSE = [
    ("bigbird", dict(num_random_blocks=1)),
    ("bigbird", dict(num_random_blocks=1, attention="unidirectional")),
    ("dense", {}),
    ("dense", dict(attention="unidirectional")),
]


@pytest.mark.parametrize("kind,params", SPARSE, ids=[f"{k}-{p.get('attention', 'bi')}" for k, p in SPARSE])
@pytest.mark.parametrize("q_len", [22, 9, 1])   # full, a chunk of rows, a decode step
def test_a_padded_value_never_reaches_a_block_sparse_output(kind, params, q_len, cpu_path, tmp_path):
    n, heads, kv_heads = 22, 4, 2
    pad = padding(n)
    (q, k, v), (ck, cv) = poisoned(n, heads, kv_heads, pad)
    module = BlockSparseAttention(kind, block_size=4, seed=1, store=PatternStore(tmp_path / "s"), **params)
    causal = params.get("attention") == "unidirectional"
    qs = q[:, n - q_len:]
    out = module(qs, k, v, key_padding_mask=pad)
    layout = generate(module.spec(n, heads))
    pairs = block_pairs(layout["kv_num_blocks"], layout["kv_indices"], n, 4)
    expected = dense_attention(q, ck, cv, weight=pairs.expand(heads, n, n), is_causal=causal, key_padding_mask=pad)
    assert_equal_with_gradients(out, (q, k, v), expected, (q, ck, cv), rows=slice(n - q_len, None))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_len", [22, 5, 1])
def test_a_padded_value_never_reaches_the_functional_api(causal, q_len, cpu_path):
    n, heads = 22, 2
    pad = padding(n)
    (q, k, v), (ck, cv) = poisoned(n, heads, heads, pad)
    spec = SparseSpec("bigbird", seq_len=n, block_size=4, num_heads=heads, num_random_blocks=2,
                      different_layout_per_head=True)
    layout = generate(spec)
    out = block_sparse_attention(q[:, n - q_len:], k, v, layout["kv_num_blocks"], layout["kv_indices"], 4,
                                 causal=causal, key_padding_mask=pad)
    pairs = block_pairs(layout["kv_num_blocks"], layout["kv_indices"], n, 4)
    expected = dense_attention(q, ck, cv, weight=pairs, is_causal=causal, key_padding_mask=pad)
    assert_equal_with_gradients(out, (q, k, v), expected, (q, ck, cv), rows=slice(n - q_len, None))


def test_a_padded_value_never_reaches_a_multihead_block_sparse_output(tmp_path):
    """A NaN token embedding at a padded position: its value (and key) rows
    are NaN; every unpadded query's output equals the clean input's."""
    n = 24
    pad = padding(n)
    layer = MultiheadBlockSparseAttention(16, 2, "bigbird", block_size=4, num_random_blocks=1,
                                          store=PatternStore(tmp_path / "s")).double()
    x = torch.randn(2, n, 16, dtype=torch.float64)
    clean, _ = layer(x, key_padding_mask=pad)
    x[pad] = float("nan")
    out, _ = layer(x, key_padding_mask=pad)
    torch.testing.assert_close(out[~pad], clean[~pad], rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_a_padded_value_never_reaches_the_block_sparse_flex_output(tmp_path, monkeypatch):
    """The flex path (CUDA's square calls; here on the CPU, forward only,
    float32: one compile)."""
    import attention.sparse.module as sparse

    monkeypatch.setattr(sparse, "FLEX_DEVICE_TYPES", ("cuda", "cpu"))
    n, heads = 48, 2
    pad = padding(n)
    (q, k, v), (ck, cv) = poisoned(n, heads, heads, pad, d=16, d_v=16)
    module = BlockSparseAttention("bigbird", block_size=16, num_random_blocks=1, store=PatternStore(tmp_path / "s"))
    assert sparse.attention_path("cpu", n, n, 0.0, 16) == "flex"
    with torch.no_grad():
        out = module(q.float(), k.float(), v.float(), key_padding_mask=pad)
    layout = generate(module.spec(n, heads))
    pairs = block_pairs(layout["kv_num_blocks"], layout["kv_indices"], n, 16).expand(heads, n, n)
    expected = dense_attention(q, ck, cv, weight=pairs, key_padding_mask=pad)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected.detach(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------ a padded value, dilated
@pytest.mark.parametrize("implementation", ["reference", "fast"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_a_padded_value_never_reaches_a_dilated_output(implementation, is_causal):
    n, heads = 22, 4
    pad = padding(n)
    (q, k, v), (ck, cv) = poisoned(n, heads, 2, pad)
    module = DilatedAttention((8, 16), (1, 2), implementation=implementation)
    out = module(q, k, v, is_causal=is_causal, key_padding_mask=pad)
    expected = dense_dilated_attention(q, ck, cv, (8, 16), (1, 2), is_causal=is_causal, key_padding_mask=pad)
    assert_equal_with_gradients(out, (q, k, v), expected, (q, ck, cv))


@pytest.mark.slow
def test_a_padded_value_never_reaches_the_dilated_flex_output():
    """flex on the CPU: forward only, float32 (one compile)."""
    n, heads = 40, 2
    pad = padding(n)
    (q, k, v), (ck, cv) = poisoned(n, heads, heads, pad, d=16, d_v=16)
    with torch.no_grad():
        out = DilatedAttention((16, 32), (1, 2), implementation="flex")(q.float(), k.float(), v.float(),
                                                                         key_padding_mask=pad)
        expected = dense_dilated_attention(q, ck, cv, (16, 32), (1, 2), key_padding_mask=pad)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- empty batch
def _modules(tmp_path):
    store = PatternStore(tmp_path / "s")
    return {
        "dilated-reference": DilatedAttention((8, 16), (1, 2)),
        "dilated-fast": DilatedAttention((8, 16), (1, 2), implementation="fast"),
        "bigbird": BlockSparseAttention("bigbird", block_size=4, num_random_blocks=1, attention="unidirectional",
                                      store=store),
        "local": BlockSparseAttention("local", block_size=4, store=store),
    }


@pytest.mark.parametrize("name", ["dilated-reference", "dilated-fast", "bigbird", "local"])
@pytest.mark.parametrize("q_len", [16, 1])
def test_an_empty_batch_gives_an_empty_output_as_sdpa(name, q_len, tmp_path):
    module = _modules(tmp_path)[name]
    q = torch.randn(0, q_len, 4, 8, requires_grad=True)
    k, v = torch.randn(0, 16, 2, 8, requires_grad=True), torch.randn(0, 16, 2, 6, requires_grad=True)
    causal = q_len < 16
    out = module(q, k, v, is_causal=causal, key_padding_mask=torch.zeros(0, 16, dtype=torch.bool))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                            enable_gqa=True).transpose(1, 2)
    assert out.shape == sdpa.shape == (0, q_len, 4, 6) and out.dtype == sdpa.dtype
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_an_empty_batch_through_the_functional_api_and_the_layers(tmp_path):
    layout = generate(SparseSpec("bigbird", seq_len=16, block_size=4, num_random_blocks=1))
    q = torch.randn(0, 16, 2, 8, requires_grad=True)
    out = block_sparse_attention(q, q, q, layout["kv_num_blocks"], layout["kv_indices"], 4)
    assert out.shape == (0, 16, 2, 8)
    torch.autograd.grad(out.sum(), q)
    store = PatternStore(tmp_path / "s")
    x = torch.randn(0, 16, 32)
    for layer in (MultiheadDilatedAttention(32, 4, (8, 16), (1, 2)), ImprovedMultiheadDilatedAttention(32, 4, (8,), (1,)),
                  MultiheadBlockSparseAttention(32, 4, "bigbird", block_size=4, store=store)):
        y, _ = layer(x)
        assert y.shape == (0, 16, 32)
    with pytest.raises(ValueError, match="must not be empty but for the batch"):
        DilatedAttention((8,), (1,))(torch.randn(1, 0, 2, 8), torch.randn(1, 0, 2, 8), torch.randn(1, 0, 2, 8))


# -------------------------------------------------------------- numpy integers
def test_numpy_integers_are_taken_wherever_an_int_is(tmp_path):
    """Every int option as a numpy integer: the same spec keys, the same
    modules (their descriptions hold Python ints), the same outputs as the
    float64 reference."""
    i64, i32 = np.int64, np.int32
    store = PatternStore(tmp_path / "s")
    assert SparseSpec("bigbird", i64(64), i64(8), i32(2), i64(1), num_random_blocks=i64(1)) == \
        SparseSpec("bigbird", 64, 8, 2, 1, num_random_blocks=1)
    assert DilatedSpec([i64(8), i32(16)], [i64(1), i64(2)], i64(2)) == DilatedSpec([8, 16], [1, 2], 2)
    sparse = BlockSparseAttention("bslongformer", block_size=i64(4), seed=i64(3), max_seq_len=i64(64),
                                  global_block_indices=[i64(0), i32(5)], store=store)
    assert sparse.layouts is BlockSparseAttention("bslongformer", block_size=4, seed=3, max_seq_len=64,
                                                  global_block_indices=[0, 5], store=store).layouts
    q, k, v = (torch.randn(2, 22, 2, 8, dtype=torch.float64) for _ in range(3))
    layout = generate(sparse.spec(22, 2))
    pairs = block_pairs(layout["kv_num_blocks"], layout["kv_indices"], 22, 4).expand(2, 22, 22)
    torch.testing.assert_close(sparse(q, k, v), dense_attention(q, k, v, weight=pairs), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        block_sparse_attention(q, k, v, layout["kv_num_blocks"], layout["kv_indices"], i64(4)),
        dense_attention(q, k, v, weight=pairs), rtol=1e-10, atol=1e-10)
    dilated = DilatedAttention([i64(8), i64(16)], [i64(1), i32(2)], implementation="fast")
    torch.testing.assert_close(dilated(q, k, v), dense_dilated_attention(q, k, v, (8, 16), (1, 2)),
                               rtol=1e-10, atol=1e-10)
    x = torch.randn(2, 16, 32)
    for layer in (MultiheadDilatedAttention(i64(32), i64(4), [i64(8)], [i64(1)]),
                  MultiheadBlockSparseAttention(i64(32), i32(4), "bigbird", block_size=i64(4), store=store)):
        assert layer(x)[0].shape == (2, 16, 32)


@pytest.mark.parametrize("block_size", [np.int64(8), 4096, 1 << 30])
def test_a_module_error_never_names_a_field_the_caller_did_not_pass(block_size):
    """The constructor validates without a probe length: no seq_len appears
    in what it raises, and every block size the spec allows is taken."""
    module = BlockSparseAttention("local", block_size=block_size)
    assert module.block_size == int(block_size) and type(module.block_size) is int
    for kwargs, message in [
        (dict(block_size=np.int64(3)), "block_size must be a power of two"),
        (dict(block_size=True), "block_size must be an int"),
        (dict(block_size=block_size, num_sliding_window_blocks=np.float64(3)), "num_sliding_window_blocks must be an int"),
        (dict(block_size=block_size, max_seq_len=np.bool_(True)), "max_seq_len must be an int"),
    ]:
        with pytest.raises((TypeError, ValueError), match=message) as error:
            BlockSparseAttention("local", **kwargs)
        assert not re.search(r"(?<!max_)seq_len", str(error.value))
