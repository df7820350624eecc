"""Block-sparse attention against a dense float64 reference built in the test
from the layout's CSR arrays (outputs and gradients), the store wiring, the
multi-head wrapper, bad input, and the compile contract (docs/design.md section 4)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attention.sparse.layouts as sparse_layouts
import attention.sparse.ops as sparse_ops
import attention.sparse.tiles as sparse_tiles
from attention import BlockSparseAttention, MultiheadBlockSparseAttention, block_sparse_attention
from patternstore import PatternStore, SparseSpec, generate
from attention.dense_reference import block_pairs, dense_attention
from strategies import tiny_sparse_specs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["fused", "explicit"])
def cpu_path(request, monkeypatch):
    """Run a test through the fused CPU flash kernel and through the explicit
    (matmul) path that other devices and dropout use."""
    monkeypatch.setattr(sparse_tiles, "USE_CPU_FLASH_KERNEL", request.param == "fused")
    return request.param


# ---------------------------------------------------------------- reference
def allowed_pairs(kv_num_blocks, kv_indices, n, block_size, causal, heads) -> torch.Tensor:
    """bool ``[heads, n, n]``: query i may attend key t (``block_pairs`` of
    the CSR, and with ``causal`` t <= i)."""
    pairs = block_pairs(kv_num_blocks, kv_indices, n, block_size)
    if causal:
        pairs = pairs & torch.ones(n, n, dtype=torch.bool).tril()
    return pairs.expand(heads, n, n)


def reference_attention(q, k, v, pairs, key_padding_mask=None, scale=None):
    """``dense_attention`` over ``pairs`` (over the full length: ``q`` may hold
    only the last rows), float64."""
    return dense_attention(q, k, v, weight=pairs, key_padding_mask=key_padding_mask, scale=scale)


def check_against_reference(spec: SparseSpec, *, batch=2, dim=8, causal=None, key_padding_mask=None,
                            scale=None):
    pattern = generate(spec)
    counts, indices = pattern["kv_num_blocks"], pattern["kv_indices"]
    unidirectional = spec.params["attention"] == "unidirectional"
    causal = unidirectional if causal is None else causal
    n, h = spec.seq_len, spec.num_heads
    q, k, v = (torch.randn(batch, n, h, dim, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = block_sparse_attention(q, k, v, counts, indices, spec.block_size, causal=causal,
                                 softmax_scale=scale, key_padding_mask=key_padding_mask)
    pairs = allowed_pairs(counts, indices, n, spec.block_size, causal, h)
    expected = reference_attention(q, k, v, pairs, key_padding_mask, scale)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")
    return out


# Every kind, uni- and bidirectional, shared and per-head layouts. n = 45 with
# block 8: nb = 6, the last block holds 5 positions.
KINDS = [
    ("dense", {}),
    ("fixed", dict(num_local_blocks=2, num_global_blocks=1)),
    ("fixed", dict(num_local_blocks=4, num_global_blocks=2, different_layout_per_head=True,
                   num_different_global_patterns=2)),
    ("bigbird", dict(num_random_blocks=2, num_sliding_window_blocks=3, num_global_blocks=1)),
    ("bigbird", dict(num_random_blocks=1, num_global_blocks=2, different_layout_per_head=True)),
    ("bslongformer", dict(num_sliding_window_blocks=3, global_block_indices=(0, 3))),
    ("bslongformer", dict(global_block_indices=(1,), global_block_end_indices=(3,))),
    ("variable", dict(num_random_blocks=1, local_window_blocks=(1, 2), global_block_indices=(2,))),
    ("variable", dict(num_random_blocks=2, local_window_blocks=(3,), different_layout_per_head=True)),
    ("local", dict(num_sliding_window_blocks=3)),
    ("dilated_blocks", dict(segment_lengths=(2, 4), dilation_rates=(1, 2))),
]


@pytest.mark.parametrize("attention", ["bidirectional", "unidirectional"])
@pytest.mark.parametrize("kind,params", KINDS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(KINDS)])
def test_every_kind_matches_the_dense_reference(kind, params, attention, cpu_path):
    spec = SparseSpec(kind, seq_len=45, block_size=8, num_heads=4, seed=3, attention=attention, **params)
    check_against_reference(spec)


@pytest.mark.parametrize("kind,params", [
    ("fixed", dict(num_local_blocks=2, horizontal_global_attention=True)),
    ("variable", dict(local_window_blocks=(2, 1), global_block_indices=(1, 4), horizontal_global_attention=True)),
])
def test_horizontal_global_rows_match_the_reference(kind, params, cpu_path):
    check_against_reference(SparseSpec(kind, seq_len=45, block_size=8, num_heads=2, **params))


def test_is_causal_on_a_bidirectional_layout_padding_and_scale(cpu_path):
    spec = SparseSpec("bigbird", seq_len=37, block_size=4, num_heads=3, seed=1, num_random_blocks=2)
    key_padding_mask = torch.rand(2, 37, generator=torch.Generator().manual_seed(0)) < 0.3
    check_against_reference(spec, causal=True, key_padding_mask=key_padding_mask, scale=0.3)


def test_module_is_causal_on_a_bidirectional_layout(tmp_path, cpu_path):
    """The module's path trusts its layouts (no value check, no dropping of
    future blocks in the op: _forward_op's trusted_layout): its causal layout
    of a bidirectional kind must come without future blocks, so the result
    equals the functional API's (which drops them itself, checked against the
    dense reference above), forward and backward, with padding."""
    store = PatternStore(tmp_path)
    module = BlockSparseAttention("bigbird", block_size=4, seed=1, num_random_blocks=2, store=store)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 37, 3, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pad = torch.rand(2, 37, generator=g) < 0.3
    pattern = store.get(module.spec(37, 3))
    out = module(q, k, v, is_causal=True, key_padding_mask=pad)
    want = block_sparse_attention(q, k, v, pattern["kv_num_blocks"], pattern["kv_indices"], 4, causal=True,
                                  key_padding_mask=pad)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for got, expected in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_tiles_split_rows_and_global_rows_across_key_tiles(monkeypatch, cpu_path):
    # 256 gathered key elements per tile with 2 * 4 batch rows, block 4 and
    # head_dim 8: two key blocks per tile, so a global row (all 12 blocks)
    # runs as six key tiles merged by their log-sum-exps.
    monkeypatch.setattr(sparse_tiles, "TILE_ELEMENTS", 256)
    for attention in ("bidirectional", "unidirectional"):
        spec = SparseSpec("bslongformer", seq_len=46, block_size=4, num_heads=4, attention=attention,
                          global_block_indices=(0, 5))
        check_against_reference(spec, key_padding_mask=torch.arange(46).expand(2, 46) % 7 == 3)


def test_a_query_without_any_allowed_key_outputs_zero_with_zero_gradient(monkeypatch, cpu_path):
    monkeypatch.setattr(sparse_tiles, "TILE_ELEMENTS", 256)  # empty rows in every key tile
    spec = SparseSpec("local", seq_len=20, block_size=4, num_heads=2, attention="bidirectional")
    key_padding_mask = torch.zeros(2, 20, dtype=torch.bool)
    key_padding_mask[1] = True                       # batch 1 ignores every key
    out = check_against_reference(spec, key_padding_mask=key_padding_mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_low_precision_is_computed_in_float32():
    spec = SparseSpec("bigbird", seq_len=40, block_size=8, num_heads=2)
    pattern = generate(spec)
    q, k, v = (torch.randn(1, 40, 2, 16) for _ in range(3))
    full = block_sparse_attention(q, k, v, pattern["kv_num_blocks"], pattern["kv_indices"], 8)
    half = block_sparse_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(),
                                  pattern["kv_num_blocks"], pattern["kv_indices"], 8)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, rtol=0.02, atol=0.02)


@settings(max_examples=60, deadline=None)
@given(tiny_sparse_specs(), st.booleans())
def test_random_layouts_match_the_dense_reference(spec, is_causal):
    for fused in (True, False):
        sparse_tiles.USE_CPU_FLASH_KERNEL = fused
        try:
            check_against_reference(spec, batch=1, dim=4, causal=is_causal or None)
        finally:
            sparse_tiles.USE_CPU_FLASH_KERNEL = True


def test_dropout_gradients_are_exact_and_eval_disables_it():
    spec = SparseSpec("bigbird", seq_len=12, block_size=4, num_heads=2, num_random_blocks=1)
    pattern = generate(spec)
    seed = torch.tensor(1234)
    inputs = [torch.randn(1, 12, 2, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]

    def dropped(q, k, v):
        return sparse_ops.SparseFunction.apply(q, k, v, pattern["kv_num_blocks"], pattern["kv_indices"], [], [],
                                               None, seed, 4, False, 0.5, 0.4, False, None, None, None)[0]

    assert torch.autograd.gradcheck(dropped, inputs)
    plain = block_sparse_attention(*inputs, pattern["kv_num_blocks"], pattern["kv_indices"], 4,
                                   softmax_scale=0.5)
    assert not torch.allclose(dropped(*inputs), plain)

    module = BlockSparseAttention("bigbird", block_size=4, dropout=0.4, num_random_blocks=1)
    module.eval()
    torch.testing.assert_close(module(*inputs), block_sparse_attention(
        *inputs, pattern["kv_num_blocks"], pattern["kv_indices"], 4))


# ------------------------------------------------------------ module + store
def test_module_takes_its_layout_from_the_store_once_per_length(tmp_path):
    store = PatternStore(tmp_path / "store")
    module = BlockSparseAttention("bigbird", block_size=8, seed=5, num_random_blocks=2,
                                  attention="unidirectional", store=store)
    q, k, v = (torch.randn(2, 50, 4, 8) for _ in range(3))
    for _ in range(3):
        out = module(q, k, v)
    assert store.stats()["misses"] == 1 and store.stats()["memory_hits"] == 0
    spec = SparseSpec("bigbird", seq_len=50, block_size=8, num_heads=4, seed=5, num_random_blocks=2,
                      attention="unidirectional")
    # causal use: the entry of the capacity (7 blocks -> 8 blocks = 64 tokens), whose first rows serve 50
    capacity = SparseSpec("bigbird", seq_len=64, block_size=8, num_heads=4, seed=5, num_random_blocks=2,
                          attention="unidirectional")
    assert store.contains(capacity) and not store.contains(spec)
    pattern = generate(spec)
    expected = block_sparse_attention(q, k, v, pattern["kv_num_blocks"], pattern["kv_indices"], 8, causal=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    module(*(torch.randn(1, 70, 4, 8) for _ in range(3)))
    assert store.stats()["misses"] == 2
    # A second module with the same layout source shares the looked-up layouts.
    BlockSparseAttention("bigbird", block_size=8, seed=5, num_random_blocks=2,
                         attention="unidirectional", store=store)(q, k, v)
    assert store.stats()["misses"] == 2


def test_module_defaults_to_the_default_store():
    from patternstore import default_store

    module = BlockSparseAttention("local", block_size=4, num_sliding_window_blocks=5)
    module(*(torch.randn(1, 33, 2, 4) for _ in range(3)))
    assert default_store().contains(SparseSpec("local", seq_len=64, block_size=4, num_heads=2,  # capacity
                                               num_sliding_window_blocks=5))


def test_multihead_wrapper_projects_and_attends():
    torch.manual_seed(0)
    mha = MultiheadBlockSparseAttention(32, 4, "bslongformer", block_size=8, global_block_indices=(1,))
    x, y = torch.randn(2, 40, 32), torch.randn(2, 40, 32)
    key_padding_mask = torch.zeros(2, 40, dtype=torch.bool)
    key_padding_mask[0, 30:] = True
    out, weights = mha(x, y, key_padding_mask=key_padding_mask, is_causal=True)
    assert weights is None and out.shape == (2, 40, 32)
    pattern = generate(SparseSpec("bslongformer", seq_len=40, block_size=8, num_heads=4,
                                  global_block_indices=(1,)))
    split = lambda t: t.view(2, 40, 4, 8)  # noqa: E731
    attended = block_sparse_attention(split(mha.q_proj(x)), split(mha.k_proj(y)), split(mha.v_proj(y)),
                                      pattern["kv_num_blocks"], pattern["kv_indices"], 8, causal=True,
                                      key_padding_mask=key_padding_mask)
    torch.testing.assert_close(out, mha.out_proj(mha.norm(attended.reshape(2, 40, 32))))
    self_out, _ = mha(x)
    torch.testing.assert_close(self_out, mha(x, x, x)[0])


# ----------------------------------------------------------------- bad input
def test_bad_input_raises_before_any_work(tmp_path):
    store = PatternStore(tmp_path / "store")
    module = BlockSparseAttention("bigbird", block_size=8, store=store)
    good = torch.randn(1, 16, 2, 4)
    cases = [
        ((torch.randn(16, 2, 4), good, good), "batch, seq, heads, head_dim"),
        ((good, torch.randn(1, 24, 2, 4), good), "one shape"),
        ((good, good, torch.randn(1, 16, 3, 4)), "one shape"),
        ((torch.randn(1, 24, 2, 4), good, good), "q_len must be <= kv_len"),
        ((torch.randn(1, 16, 3, 4), good, good), "multiple of the key/value heads"),
        ((good, good, good.double()), "one dtype"),
        ((good.int(), good, good), "floating-point"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            module(*args)
    with pytest.raises(ValueError, match="key_padding_mask"):
        module(good, good, good, key_padding_mask=torch.zeros(1, 15, dtype=torch.bool))
    assert store.stats()["misses"] == 0 and not store.disk.keys()
    with pytest.raises(ValueError, match="num_random_blocks"):  # a length the layout does not fit (2 blocks)
        BlockSparseAttention("bigbird", block_size=8, num_random_blocks=3, store=store)(good, good, good)


@pytest.mark.parametrize("kwargs,message", [
    (dict(kind="nope"), "kind must be one of"),
    (dict(kind="bigbird", num_local_blocks=2), "unknown parameter"),
    (dict(kind="bigbird", block_size=12), "power of two"),
    (dict(kind="bigbird", dropout=1.0), "dropout"),
    (dict(kind="bigbird", softmax_scale=float("nan")), "softmax_scale"),
    (dict(kind="local", num_heads=4), "num_heads"),
    (dict(kind="local", store="/tmp"), "PatternStore"),
])
def test_bad_module_arguments_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlockSparseAttention(**kwargs)


def test_bad_layouts_are_refused():
    q = torch.randn(1, 16, 2, 4)
    counts = torch.tensor([[2, 2]], dtype=torch.int32)
    cases = [
        (counts, torch.tensor([0, 1, 1, 2], dtype=torch.int32), "lie in"),        # index past nb
        (counts, torch.tensor([1, 0, 0, 1], dtype=torch.int32), "ascending"),     # unsorted row
        (counts, torch.tensor([0, 0, 0, 1], dtype=torch.int32), "ascending"),     # duplicate
        (counts, torch.tensor([0, 1, 0], dtype=torch.int32), "sums to"),
        (counts.long(), torch.tensor([0, 1, 0, 1], dtype=torch.int32), "int32"),
        (torch.tensor([[2, 2, 2]], dtype=torch.int32), torch.zeros(6, dtype=torch.int32), "shape"),
        (torch.ones(3, 2, dtype=torch.int32), torch.zeros(6, dtype=torch.int32), "shape"),
    ]
    for kv_num_blocks, kv_indices, message in cases:
        with pytest.raises(ValueError, match=message):
            block_sparse_attention(q, q, q, kv_num_blocks, kv_indices, 8)
    with pytest.raises(ValueError, match="dropout"):
        block_sparse_attention(q, q, q, counts, torch.tensor([0, 1, 0, 1], dtype=torch.int32), 8, dropout_p=1.5)


def test_multihead_bad_input():
    mha = MultiheadBlockSparseAttention(16, 2, "local", block_size=4)
    x = torch.randn(1, 12, 16)
    with pytest.raises(ValueError, match="need_weights=True is not supported: BlockSparseAttention never"):
        mha(x, need_weights=True)
    with pytest.raises(ValueError, match="one shape"):
        mha(x, torch.randn(1, 8, 16))
    with pytest.raises(ValueError, match="embed_dim=16"):
        mha(torch.randn(1, 12, 8))
    with pytest.raises(ValueError, match="divisible"):
        MultiheadBlockSparseAttention(10, 4, "local")


# ------------------------------------------------------------ compile contract
@pytest.mark.slow
def test_compiled_module_cold_start_no_recompiles_and_equal_to_eager(tmp_path):
    """fullgraph compile with the store lookup inside forward, on a store that
    has never seen the layout and a module that has never run."""
    torch._dynamo.reset()
    store = PatternStore(tmp_path / "cold")
    module = BlockSparseAttention("bigbird", block_size=8, num_random_blocks=2,
                                  different_layout_per_head=True, store=store)
    compiled = torch.compile(module, fullgraph=True)

    def inputs():
        return [torch.randn(2, 43, 4, 8, requires_grad=True) for _ in range(3)]

    q, k, v = inputs()
    out = compiled(q, k, v)
    assert store.stats()["generations"] == 1
    expected = module(q, k, v)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(5):
            compiled(*inputs()).sum().backward()

    mha = MultiheadBlockSparseAttention(16, 2, "local", block_size=4, store=store)
    x = torch.randn(2, 30, 16)
    compiled_mha = torch.compile(mha, fullgraph=True)
    torch.testing.assert_close(compiled_mha(x, is_causal=True)[0], mha(x, is_causal=True)[0])
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(5):
            compiled_mha(torch.randn(2, 30, 16), is_causal=True)


def test_a_copied_module_shares_its_layout_source(tmp_path):
    import copy

    store = PatternStore(tmp_path / "store")
    module = BlockSparseAttention("local", block_size=4, store=store)
    q, k, v = (torch.randn(1, 20, 2, 4) for _ in range(3))
    twin = copy.deepcopy(module)
    torch.testing.assert_close(twin(q, k, v), module(q, k, v), rtol=0, atol=0)
    assert store.stats()["misses"] == 1


# ------------------------------------------ decode, GQA, strides (issue 13, 10)
def check_rows(spec: SparseSpec, q_len: int, kv_heads: int, *, causal=None, key_padding_mask=None, batch=2,
               dim=8):
    """``q_len`` query rows (the last ones) with ``kv_heads`` key/value heads
    against the reference over the full length: outputs and gradients."""
    pattern = generate(spec)
    counts, indices = pattern["kv_num_blocks"], pattern["kv_indices"]
    causal = spec.params["attention"] == "unidirectional" if causal is None else causal
    n, h = spec.seq_len, spec.num_heads
    q = torch.randn(batch, q_len, h, dim, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(batch, n, kv_heads, dim, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = block_sparse_attention(q, k, v, counts, indices, spec.block_size, causal=causal,
                                 key_padding_mask=key_padding_mask)
    expected = reference_attention(q, k, v, allowed_pairs(counts, indices, n, spec.block_size, causal, h),
                                   key_padding_mask)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), grad),
                          torch.autograd.grad(expected, (q, k, v), grad)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")


DECODE_KINDS = [
    ("local", dict(num_sliding_window_blocks=3)),
    ("bigbird", dict(num_random_blocks=2, attention="unidirectional", different_layout_per_head=True)),
    ("bslongformer", dict(global_block_indices=(0, 2), attention="unidirectional")),
    ("fixed", dict(num_local_blocks=2, attention="bidirectional")),
]


@pytest.mark.parametrize("kind,params", DECODE_KINDS, ids=[k for k, _ in DECODE_KINDS])
@pytest.mark.parametrize("q_len", [1, 3, 9, 45])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_short_queries_are_the_last_rows_of_the_full_forward(kind, params, q_len, kv_heads, cpu_path):
    spec = SparseSpec(kind, seq_len=45, block_size=8, num_heads=4, seed=2, **params)
    key_padding_mask = torch.arange(45).expand(2, 45) % 5 == 1
    check_rows(spec, q_len, kv_heads, key_padding_mask=key_padding_mask if q_len % 2 else None)
    if spec.params["attention"] == "bidirectional":
        check_rows(spec, q_len, kv_heads, causal=True)


@settings(max_examples=40, deadline=None)
@given(tiny_sparse_specs(), st.booleans(), st.data())
def test_random_layouts_short_queries_and_grouped_heads(spec, is_causal, data):
    q_len = data.draw(st.integers(1, spec.seq_len), label="q_len")
    kv_heads = data.draw(st.sampled_from([d for d in range(1, spec.num_heads + 1) if spec.num_heads % d == 0]),
                         label="kv_heads")
    for fused in (True, False):
        sparse_tiles.USE_CPU_FLASH_KERNEL = fused
        try:
            check_rows(spec, q_len, kv_heads, causal=is_causal or None, batch=1, dim=4)
        finally:
            sparse_tiles.USE_CPU_FLASH_KERNEL = True


def test_a_decode_step_gathers_only_the_key_blocks_of_its_row(monkeypatch):
    """Cost proportional to the row's layout: one query against 512 keys in
    64 blocks of a 3-block window gathers 3 key blocks per key/value head,
    and grouped query heads share them (no key repeated per query head)."""
    gathered: dict[str, int] = {}
    real = sparse_tiles.TilePlan.gather

    def counting(self, slot, x, index, rows):
        gathered[slot] = gathered.get(slot, 0) + index.numel()
        return real(self, slot, x, index, rows)

    monkeypatch.setattr(sparse_tiles.TilePlan, "gather", counting)
    spec = SparseSpec("local", seq_len=512, block_size=8, num_heads=8, num_sliding_window_blocks=5)
    pattern = generate(spec)
    q = torch.randn(1, 1, 8, 16)
    k, v = (torch.randn(1, 512, 2, 16) for _ in range(2))
    out = block_sparse_attention(q, k, v, pattern["kv_num_blocks"], pattern["kv_indices"], 8, causal=True)
    assert gathered["k"] == gathered["v"] == 2 * 3 * 8      # kv heads x blocks (window 5, causal: 3) x bs
    assert gathered["q"] == 8 * 8                           # one query block, every query head
    expected = reference_attention(q, k, v, allowed_pairs(pattern["kv_num_blocks"], pattern["kv_indices"],
                                                          512, 8, True, 8))
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_inputs_strided_in_every_dimension_give_the_contiguous_result(cpu_path):
    spec = SparseSpec("bigbird", seq_len=37, block_size=4, num_heads=4, num_random_blocks=2,
                      different_layout_per_head=True)
    pattern = generate(spec)
    args = (pattern["kv_num_blocks"], pattern["kv_indices"], 4)
    base = [torch.randn(4, 74, 8, 16, requires_grad=True) for _ in range(3)]
    strided = [x[::2, ::2, ::2, ::2] for x in base]                       # every dim, head_dim included
    permuted = [torch.randn(2, 8, 37, 4).permute(0, 2, 3, 1).requires_grad_() for _ in range(3)]  # (b, d, n, h)
    heads_outer = [torch.randn(2, 4, 37, 8).transpose(1, 2).requires_grad_() for _ in range(3)]  # transformers' (b, h, n, d)
    for inputs in (strided, permuted, heads_outer):
        dense = [x.detach().contiguous().requires_grad_() for x in inputs]
        out, want = block_sparse_attention(*inputs, *args, causal=True), block_sparse_attention(*dense, *args,
                                                                                               causal=True)
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, inputs, grad)
        for a, b in zip(got, torch.autograd.grad(want, dense, grad)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_a_nan_in_a_future_key_leaves_earlier_queries_finite(cpu_path):
    """SDPA's causal kernels keep them finite; so must a causal diagonal block."""
    spec = SparseSpec("local", seq_len=16, block_size=8, num_heads=2)
    pattern = generate(spec)
    q, k, v = (torch.randn(1, 16, 2, 4) for _ in range(3))
    k[0, 5] = float("nan")
    out = block_sparse_attention(q, k, v, pattern["kv_num_blocks"], pattern["kv_indices"], 8, causal=True)
    assert torch.isfinite(out[0, :5]).all()
    assert torch.isnan(out[0, 5:]).all()                   # every later query attends position 5
    clean = k.clone()
    clean[0, 5:] = 0
    torch.testing.assert_close(out[0, :5], block_sparse_attention(
        q, clean, v, pattern["kv_num_blocks"], pattern["kv_indices"], 8, causal=True)[0, :5])


def test_torch_func_grad_inference_mode_and_a_clear_double_backward_error():
    spec = SparseSpec("bigbird", seq_len=20, block_size=4, num_heads=2, num_random_blocks=1)
    pattern = generate(spec)
    args = (pattern["kv_num_blocks"], pattern["kv_indices"], 4)
    q, k, v = (torch.randn(1, 20, 2, 4, dtype=torch.float64) for _ in range(3))
    dq = torch.func.grad(lambda q: block_sparse_attention(q, k, v, *args).square().sum())(q)
    pairs = allowed_pairs(pattern["kv_num_blocks"], pattern["kv_indices"], 20, 4, False, 2)
    qr = q.clone().requires_grad_()
    (want,) = torch.autograd.grad(reference_attention(qr, k, v, pairs).square().sum(), qr)
    torch.testing.assert_close(dq, want, rtol=1e-9, atol=1e-9)

    module = BlockSparseAttention("local", block_size=4, num_sliding_window_blocks=3)
    expected = module(q, k, v)  # a cold store under inference mode is the store's (tests/test_store.py)
    with torch.inference_mode():
        torch.testing.assert_close(module(q, k, v), expected, rtol=0, atol=0)

    qg = q.clone().requires_grad_()
    (g,) = torch.autograd.grad(block_sparse_attention(qg, k, v, *args).square().sum(), qg, create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        g.sum().backward()


# ------------------------------------------- generation: decode and capacity
@pytest.mark.parametrize("kind,params", [
    ("local", dict(num_sliding_window_blocks=3)),
    ("bigbird", dict(num_random_blocks=2, attention="unidirectional", different_layout_per_head=True)),
    ("bslongformer", dict(global_block_indices=(0, 2), attention="unidirectional")),
    # DeepSpeed's rule: ranges past a length's blocks skipped, ends clipped, at every step.
    ("bslongformer", dict(global_block_indices=(0, 5, 9), global_block_end_indices=(1, 7, 20),
                          attention="unidirectional")),
])
def test_module_decode_steps_equal_the_rows_of_the_full_forward(kind, params, tmp_path):
    """A cached decode (one query row against a growing cache, grouped
    heads, padding over the cache) computes the rows of one full causal
    forward: the layout's rows do not depend on the length."""
    store = PatternStore(tmp_path / "store")
    module = BlockSparseAttention(kind, block_size=4, seed=1, store=store, **params)
    n = 29
    q = torch.randn(2, n, 4, 8, dtype=torch.float64)
    k, v = (torch.randn(2, n, 2, 8, dtype=torch.float64) for _ in range(2))
    key_padding_mask = torch.zeros(2, n, dtype=torch.bool)
    key_padding_mask[1, :3] = True                       # left padding of the second sequence
    full = module(q, k, v, key_padding_mask=key_padding_mask)
    reference = reference_attention(q, k, v, allowed_pairs(
        *_layout(module, n, 4), n, 4, True, 4), key_padding_mask)
    torch.testing.assert_close(full, reference, rtol=1e-10, atol=1e-10)
    for t in range(5, n):                                # prefill of 5 rows, then one row per step
        step = module(q[:, t: t + 1], k[:, : t + 1], v[:, : t + 1], key_padding_mask=key_padding_mask[:, : t + 1])
        torch.testing.assert_close(step, full[:, t: t + 1], rtol=1e-10, atol=1e-10)
    chunk = module(q[:, 11:20], k[:, :20], v[:, :20], key_padding_mask=key_padding_mask[:, :20])
    torch.testing.assert_close(chunk, full[:, 11:20], rtol=1e-10, atol=1e-10)   # chunked prefill


def _layout(module, n, h):
    pattern = generate(module.spec(n, h))
    return pattern["kv_num_blocks"], pattern["kv_indices"]


def test_causal_decode_of_a_layout_that_depends_on_the_length_is_refused():
    module = BlockSparseAttention("bigbird", block_size=4, num_random_blocks=2)   # random over the whole row
    q, k = torch.randn(1, 1, 2, 4), torch.randn(1, 20, 2, 4)
    with pytest.raises(ValueError, match="prefix-stable"):
        module(q, k, k, is_causal=True)
    full = module(k, k, k, is_causal=True)                # the square forward stays available
    pattern = generate(module.spec(20, 2))
    reference = reference_attention(k, k, k, allowed_pairs(pattern["kv_num_blocks"], pattern["kv_indices"],
                                                           20, 4, True, 2))
    torch.testing.assert_close(full.double(), reference, rtol=1e-5, atol=1e-5)


def test_store_entries_grow_with_log_of_the_length_not_with_the_number_of_lengths(tmp_path):
    store = PatternStore(tmp_path / "store")
    module = BlockSparseAttention("local", block_size=4, num_sliding_window_blocks=5, store=store)
    lengths = [3 + 7 * i for i in range(20)]             # 3 .. 136 tokens: 1 .. 34 blocks
    for n in lengths:
        q, k, v = (torch.randn(1, n, 2, 4, dtype=torch.float64) for _ in range(3))
        out = module(q, k, v)
        reference = reference_attention(q, k, v, allowed_pairs(*_layout(module, n, 2), n, 4, True, 2))
        torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10)
    # capacities 1, 2, 4, ..., 64 blocks: at most 7 entries for 20 lengths
    assert len(store.disk.keys()) <= 7 and store.stats()["misses"] <= 7
    assert len(module.layouts._layouts) <= module.layouts.MAX_LAYOUTS
    sized = BlockSparseAttention("local", block_size=4, num_sliding_window_blocks=5, store=store, max_seq_len=200)
    for n in lengths:
        sized(*(torch.randn(1, n, 2, 4) for _ in range(3)))
    assert len(store.disk.keys()) <= 8                   # one more entry: the 200-token layout


# --------------------------------------------- pickling, copies, processes
def test_copies_and_pickles_find_their_layouts_again(tmp_path):
    import copy
    import pickle

    store = PatternStore(tmp_path / "store")
    module = BlockSparseAttention("bigbird", block_size=4, num_random_blocks=1, attention="unidirectional",
                                  store=store)
    q, k, v = (torch.randn(1, 22, 2, 4) for _ in range(3))
    expected = module(q, k, v)
    for twin in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        torch.testing.assert_close(twin(q, k, v), expected, rtol=0, atol=0)
    sparse_layouts.SOURCES.clear()                               # as in a process that never built the module
    torch.testing.assert_close(pickle.loads(pickle.dumps(module))(q, k, v), expected, rtol=0, atol=0)


SAVED_PROGRAM = """
import sys, torch
import attention  # registers the patternstore:: operators
folder = sys.argv[1]
module = torch.load(folder + "/module.pt", weights_only=False)
inputs = torch.load(folder + "/inputs.pt")
program = torch.export.load(folder + "/program.pt2")
torch.save({"module": module(*inputs), "program": program.module()(*inputs)}, folder + "/outputs.pt")
"""


@pytest.mark.slow
def test_a_saved_module_and_an_exported_program_run_in_a_fresh_process(tmp_path):
    """torch.save + torch.load and torch.export.save + load in another
    process (no registry there), on a store directory that process has to
    find by name; export on a cold module."""
    import subprocess
    import sys

    store = PatternStore(tmp_path / "store")
    module = BlockSparseAttention("bslongformer", block_size=4, global_block_indices=(1,), store=store)
    inputs = tuple(torch.randn(1, 26, 2, 4) for _ in range(3))
    program = torch.export.export(module, inputs)
    torch.export.save(program, tmp_path / "program.pt2")
    torch.save(module, tmp_path / "module.pt")
    torch.save(inputs, tmp_path / "inputs.pt")
    subprocess.run([sys.executable, "-c", SAVED_PROGRAM, str(tmp_path)], check=True, timeout=300,
                   env={**__import__("os").environ, "PATTERNSTORE_DIR": str(tmp_path / "elsewhere")})
    outputs = torch.load(tmp_path / "outputs.pt")
    expected = module(*inputs)
    torch.testing.assert_close(outputs["module"], expected, rtol=0, atol=0)
    torch.testing.assert_close(outputs["program"], expected, rtol=0, atol=0)


# ------------------------------------------------- any number of lengths
@pytest.mark.slow
def test_dynamic_compile_runs_twenty_lengths_with_one_compile_and_export_takes_a_dynamic_length(tmp_path):
    torch._dynamo.reset()
    store = PatternStore(tmp_path / "store")
    module = BlockSparseAttention("bigbird", block_size=4, num_random_blocks=1, store=store)
    compiled = torch.compile(module, fullgraph=True, dynamic=True)
    lengths = [9 + 5 * i for i in range(20)]
    for i, n in enumerate(lengths):
        q, k, v = (torch.randn(1, n, 2, 8) for _ in range(3))
        with torch._dynamo.config.patch(error_on_recompile=i >= 2):
            out = compiled(q, k, v, is_causal=True)
        if i % 6 == 0:
            torch.testing.assert_close(out, module(q, k, v, is_causal=True), rtol=1e-6, atol=1e-6)
    mha = MultiheadBlockSparseAttention(16, 2, "local", block_size=4, store=store)
    compiled_mha = torch.compile(mha, fullgraph=True, dynamic=True)
    for i, n in enumerate(lengths[:4]):
        x = torch.randn(1, n, 16)
        with torch._dynamo.config.patch(error_on_recompile=i >= 2):
            torch.testing.assert_close(compiled_mha(x)[0], mha(x)[0], rtol=1e-6, atol=1e-6)

    # min: dynamo specializes sizes 0 and 1 (a length inside one block is fine: test_sparse_programs.py)
    sequence = torch.export.Dim("sequence", min=5, max=4096)
    inputs = tuple(torch.randn(1, 40, 2, 8) for _ in range(3))
    program = torch.export.export(module, inputs, dynamic_shapes=({1: sequence},) * 3)
    for n in (17, 40, 77):
        q, k, v = (torch.randn(1, n, 2, 8) for _ in range(3))
        torch.testing.assert_close(program.module()(q, k, v), module(q, k, v), rtol=0, atol=0)


def test_threads_sharing_one_module_at_different_lengths(tmp_path, monkeypatch):
    """The bounded per-source caches evict under concurrent use (2 entries
    here) without a wrong layout reaching any call."""
    from concurrent.futures import ThreadPoolExecutor

    module = BlockSparseAttention("bigbird", block_size=4, num_random_blocks=1, attention="unidirectional",
                                  store=PatternStore(tmp_path / "store"))
    for cache in (module.layouts._layouts, module.layouts._plans):
        monkeypatch.setattr(cache, "limit", 2)
    inputs = {n: tuple(torch.randn(1, n, 2, 4) for _ in range(3)) for n in (9, 17, 30, 41, 64)}
    expected = {n: module(*x) for n, x in inputs.items()}
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda n: (n, module(*inputs[n])), list(inputs) * 6))
    for n, out in results:
        torch.testing.assert_close(out, expected[n], rtol=0, atol=0)
    assert len(module.layouts._layouts) <= 2
