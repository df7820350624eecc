"""Block-sparse attention in the programs users write around it: torch.func
transforms (vmap, per-sample gradients, jacrev), value head_dim different
from q/k's (MLA), errors raised before any operator runs, padded keys that
hold NaN/Inf, a decode step without a device sync (no host read at a length seen before), whole-graph compile with
no lookup in the graph and the export floor. References: the float64
``dense_attention`` over ``block_pairs`` (attention/dense_reference.py)."""

from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import attention.sparse.layouts as sparse_layouts
import attention.sparse.ops as sparse_ops
import attention.sparse.tiles as sparse_tiles
from attention import BlockSparseAttention, MultiheadBlockSparseAttention, block_sparse_attention
from attention.dense_reference import block_pairs, dense_attention
from patternstore import PatternStore, SparseSpec, generate

pytestmark = pytest.mark.usefixtures("one_thread")



def module_reference(module: BlockSparseAttention, q, k, v, *, causal=False, key_padding_mask=None):
    """dense_attention over the module's stored layout at k's length."""
    n = k.shape[1]
    pattern = generate(module.spec(n, q.shape[2]))
    pairs = block_pairs(pattern["kv_num_blocks"], pattern["kv_indices"], n, module.block_size)
    return dense_attention(q, k, v, weight=pairs, is_causal=causal or module.layouts.unidirectional,
                           key_padding_mask=key_padding_mask, scale=module.softmax_scale)


def randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


# ------------------------------------------------------------ torch.func
def test_vmap_per_sample_gradients_and_jacrev_are_exact(tmp_path):
    module = BlockSparseAttention("bigbird", block_size=4, num_random_blocks=1, store=PatternStore(tmp_path / "s"))
    q, k, v = randn(3, 1, 20, 2, 4), randn(3, 1, 20, 2, 4), randn(3, 1, 20, 2, 4)   # 3 samples of batch 1

    out = torch.func.vmap(module)(q, k, v)
    for i in range(3):
        torch.testing.assert_close(out[i], module_reference(module, q[i], k[i], v[i]), rtol=1e-10, atol=1e-10)

    def loss(q, k, v):
        return module(q, k, v, is_causal=True).square().sum()

    def reference_loss(q, k, v):
        return module_reference(module, q, k, v, causal=True).square().sum()

    grads = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1, 2)))(q, k, v)      # per-sample gradients
    for i in range(3):
        want = torch.func.grad(reference_loss, argnums=(0, 1, 2))(q[i], k[i], v[i])
        for got, expected in zip(grads, want):
            torch.testing.assert_close(got[i], expected, rtol=1e-9, atol=1e-9)

    small = [x[0, :, :8] for x in (q, k, v)]                                          # 2 blocks
    jac = torch.func.jacrev(lambda k: module(small[0], k, small[2]))(small[1])
    want = torch.func.jacrev(lambda k: module_reference(module, small[0], k, small[2]))(small[1])
    torch.testing.assert_close(jac, want, rtol=1e-9, atol=1e-9)


def test_vmap_over_the_multihead_layer_and_an_unbatched_argument(tmp_path):
    layer = MultiheadBlockSparseAttention(16, 2, "local", block_size=4, store=PatternStore(tmp_path / "s"),
                                          dtype=torch.float64)
    x = randn(3, 1, 12, 16)
    out = torch.func.vmap(lambda x: layer(x)[0])(x)
    for i in range(3):
        torch.testing.assert_close(out[i], layer(x[i])[0], rtol=1e-12, atol=1e-12)
    params = dict(layer.named_parameters())
    # vmap over the inputs, parameters shared: per-sample gradients of the weights.
    grads = torch.func.vmap(torch.func.grad(
        lambda p, x: torch.func.functional_call(layer, p, (x,))[0].sum()), in_dims=(None, 0))(params, x)
    for i in range(3):
        layer.zero_grad()
        layer(x[i])[0].sum().backward()
        for name, p in layer.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-9, atol=1e-9)


def test_a_vmapped_layout_is_refused():
    pattern = generate(SparseSpec("local", seq_len=8, block_size=4, num_heads=1))
    counts = torch.stack([pattern["kv_num_blocks"]] * 2)
    q = randn(2, 1, 8, 1, 4)
    with pytest.raises(ValueError, match="must not be vmapped"):
        torch.func.vmap(lambda q, c: block_sparse_attention(q, q, q, c, pattern["kv_indices"], 4))(q, counts)


# ------------------------------------------------------------------ MLA
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
def test_value_head_dim_different_from_the_query_s(fused, monkeypatch, tmp_path):
    monkeypatch.setattr(sparse_tiles, "USE_CPU_FLASH_KERNEL", fused)
    module = BlockSparseAttention("bigbird", block_size=4, num_random_blocks=1, attention="unidirectional",
                                  store=PatternStore(tmp_path / "s"))
    q = randn(2, 22, 4, 6).requires_grad_()
    k = randn(2, 22, 2, 6).requires_grad_()                   # GQA too
    v = randn(2, 22, 2, 3).requires_grad_()                   # v_dim 3 != head_dim 6
    pad = torch.zeros(2, 22, dtype=torch.bool)
    pad[1, -5:] = True
    for q_len in (22, 3):                                     # prefill and the last 3 rows
        out = module(q[:, -q_len:], k, v, is_causal=True, key_padding_mask=pad)
        assert out.shape == (2, q_len, 4, 3)
        want = module_reference(module, q[:, -q_len:], k, v, causal=True, key_padding_mask=pad)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), grad)
        expected = torch.autograd.grad(want, (q, k, v), grad)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------- errors before work
def test_a_length_the_layout_cannot_serve_raises_before_any_operator(monkeypatch, tmp_path):
    module = BlockSparseAttention("variable", block_size=4, num_random_blocks=5, store=PatternStore(tmp_path / "s"))
    calls = []
    monkeypatch.setattr(sparse_ops, "forward_op", lambda *args: calls.append(args))
    x = torch.randn(1, 16, 2, 4)                              # 4 blocks: a row cannot draw 5 distinct ones
    with pytest.raises(ValueError, match="num_random_blocks"):
        module(x, x, x)
    assert calls == []


# ----------------------------------------------------------- masked NaN
@settings(max_examples=20, deadline=None)
@given(st.booleans(), st.sampled_from([float("nan"), float("inf"), float("-inf")]), st.integers(1, 7))
def test_nan_and_inf_in_padded_keys_never_reach_an_output(fused, bad, padded):
    """Masked scores are filled, not added, and padded keys' value rows
    zeroed: a non-finite key or VALUE of a padded key reaches no output."""
    sparse_tiles.USE_CPU_FLASH_KERNEL = fused
    try:
        module = BlockSparseAttention("bigbird", block_size=4, num_random_blocks=1)
        q, k, v = randn(2, 18, 2, 4), randn(2, 18, 2, 4), randn(2, 18, 2, 4)
        pad = torch.zeros(2, 18, dtype=torch.bool)
        pad[0, -padded:] = True
        clean = module(q, k, v, key_padding_mask=pad)
        k[0, -padded:] = bad
        v[0, -padded:] = bad
        out = module(q, k, v, key_padding_mask=pad)
        assert torch.isfinite(out).all()
        # The same numbers: the padded rows are zeroed in the gathered tiles before any kernel.
        torch.testing.assert_close(out, clean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out, module_reference(module, q, k, v, key_padding_mask=pad),
                                   rtol=1e-10, atol=1e-10)
    finally:
        sparse_tiles.USE_CPU_FLASH_KERNEL = True


# ----------------------------------------------------------- decode: no sync
def test_a_decode_step_groups_no_rows_inside_the_operator_and_runs_on_meta(monkeypatch, tmp_path):
    """The row groups come with the layout (grouped once per length and
    first block), so the operator reads no value on the host: a meta-tensor
    decode (where any read of a value raises) runs, and the operator's own
    grouping (its one sync) is never called."""
    module = BlockSparseAttention("bigbird", block_size=4, num_random_blocks=1, attention="unidirectional",
                                  store=PatternStore(tmp_path / "s"))
    q, k, v = randn(1, 1, 2, 4), randn(1, 30, 2, 4), randn(1, 30, 2, 4)
    want = module(q, k, v)                                    # caches the layout and its groups

    def refuse(*args):
        raise AssertionError("row_groups called inside the operator")

    monkeypatch.setattr(sparse_tiles, "row_groups", refuse)
    torch.testing.assert_close(module(q, k, v), want, rtol=0, atol=0)
    meta = [x.to("meta") for x in (q, k, v)]
    out = module(*meta)
    assert out.shape == (1, 1, 2, 4) and out.device.type == "meta"


# Operators that read a tensor's values on the host, or whose output shape
# depends on them: each is a device-to-host sync on a GPU, which a CUDA graph
# capture refuses. Tensor.tolist reads the values without dispatching an
# operator on the CPU, so it is counted apart.
HOST_READS = ("aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.argwhere", "aten.unique",
              "aten._unique", "aten.unique_consecutive", "aten.masked_select", "aten.equal", "aten.is_nonzero")


class HostReads(TorchDispatchMode):
    """The operators dispatched while open: how many, and those of HOST_READS."""

    def __init__(self) -> None:
        super().__init__()
        self.count, self.reads = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        if str(func).startswith(HOST_READS):
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("q_len, kv_heads, padded", [(1, 2, False), (3, 1, True)], ids=["step", "chunk-mqa-padded"])
def test_a_decode_step_at_a_length_seen_before_reads_no_value_on_the_host(monkeypatch, tmp_path, q_len, kv_heads,
                                                                          padded):
    """``LayoutSource.plan`` keeps the layout and its row groups per (kv_len in
    whole blocks, heads, device, causal, first query block): the first call groups the rows
    (``row_groups``, whose ``tolist`` is a device-to-host copy on a GPU); a
    second call at that length groups nothing, calls no ``tolist`` and
    dispatches no operator of HOST_READS: nothing that would break a CUDA
    graph capture of a decode step against a fixed-length cache; a cache
    grown by a token inside the same key block shares the plan too. The
    grouping runs outside any dispatch mode (``real_tensors``), so it is
    seen by its calls, not by the mode."""
    module = BlockSparseAttention("bigbird", block_size=4, num_random_blocks=1, attention="unidirectional",
                                  store=PatternStore(tmp_path / "s"))
    q, k, v = randn(2, q_len, 2, 4), randn(2, 30, kv_heads, 4), randn(2, 30, kv_heads, 4)
    pad = None
    if padded:
        pad = torch.zeros(2, 30, dtype=torch.bool)
        pad[1, 25:] = True
    calls = {"row_groups": 0, "tolist": 0}

    def counted(name, function):
        def call(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return call

    for where in (sparse_layouts, sparse_tiles):
        monkeypatch.setattr(where, "row_groups", counted("row_groups", where.row_groups))
    monkeypatch.setattr(torch.Tensor, "tolist", counted("tolist", torch.Tensor.tolist))
    want = module(q, k, v, is_causal=True, key_padding_mask=pad)
    assert calls["row_groups"] >= 1 and calls["tolist"] >= 1, f"the first call groups the rows: {calls}"
    calls.update(row_groups=0, tolist=0)
    with HostReads() as mode:
        got = module(q, k, v, is_causal=True, key_padding_mask=pad)
    assert mode.count > 0, "the mode saw the call's operators"
    assert mode.reads == [] and calls == {"row_groups": 0, "tolist": 0}, (mode.reads, calls)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got, module_reference(module, q, k, v, causal=True, key_padding_mask=pad),
                               rtol=1e-10, atol=1e-10)
    if q_len > 1:
        return  # a chunk's first query block moves with the cache: its own plan
    # The cache grown by a token inside the same block (30 -> 31 keys, block 4): the same plan, no grouping.
    k, v = (torch.cat([x, randn(2, 1, kv_heads, 4)], 1) for x in (k, v))
    pad = None if pad is None else torch.cat([pad, torch.zeros(2, 1, dtype=torch.bool)], 1)
    grown = module(q, k, v, is_causal=True, key_padding_mask=pad)
    assert calls == {"row_groups": 0, "tolist": 0}, calls
    torch.testing.assert_close(grown, module_reference(module, q, k, v, causal=True, key_padding_mask=pad),
                               rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------- compile
@pytest.mark.slow
def test_fullgraph_compile_holds_the_layout_as_constants_and_never_reads_the_store(monkeypatch, tmp_path):
    torch._dynamo.reset()
    store = PatternStore(tmp_path / "cold")
    module = BlockSparseAttention("bigbird", block_size=4, num_random_blocks=1, attention="unidirectional",
                                  store=store)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(module, backend=backend, fullgraph=True)
    q, k, v = (torch.randn(1, 22, 2, 4) for _ in range(3))
    out = compiled(q, k, v, is_causal=True)
    torch.testing.assert_close(out, module(q, k, v, is_causal=True), rtol=0, atol=0)
    step = compiled(q[:, -1:], k, v, is_causal=True)                 # a decode step: its own graph
    torch.testing.assert_close(step, module(q[:, -1:], k, v, is_causal=True), rtol=0, atol=0)
    assert len(graphs) == 2
    targets = {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}
    assert any("sparse_forward" in t for t in targets)
    assert not any("sparse_layout" in t or "block_mask" in t for t in targets)

    def refuse(*args, **kwargs):
        raise AssertionError("store read at run time")

    monkeypatch.setattr(store, "get", refuse)
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(compiled(q, k, v, is_causal=True), out, rtol=0, atol=0)
        torch.testing.assert_close(compiled(q[:, -1:], k, v, is_causal=True), step, rtol=0, atol=0)


@pytest.mark.slow
def test_an_export_with_a_dim_on_the_length_takes_lengths_down_to_two(tmp_path):
    """The floor of a Dim is 2 (attention/sparse/module.py), not block_size + 1:
    lengths inside the first block, at the block and one past it."""
    module = BlockSparseAttention("local", block_size=8, num_sliding_window_blocks=2,
                                  store=PatternStore(tmp_path / "s"))
    sequence = torch.export.Dim("sequence", min=2, max=64)
    example = tuple(randn(1, 20, 2, 4) for _ in range(3))
    program = torch.export.export(module, example, dynamic_shapes=({1: sequence},) * 3)
    for n in (2, 8, 9, 40):
        x = tuple(randn(1, n, 2, 4) for _ in range(3))
        torch.testing.assert_close(program.module()(*x), module(*x), rtol=0, atol=0)


