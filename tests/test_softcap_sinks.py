"""Soft-capping and attention sinks (attention/kernels/sinks.py) in the modules, the
functional APIs and the kernel table, against the float64 dense reference
(tests/dense_reference.py: capped scores, a sink column appended to each
row's softmax), gradients of q, k, v and the sinks included."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attention.kernels.attend as kernels
from attention.dilated.module import DilatedAttention
from attention.dilated.ops import dilated_attention
from attention.dilated.ops import fast_attention
from attention.kernels.flex import flex_attend
from attention.kernels.sinks import apply_sinks, sinks_grad
from attention.sparse.module import BlockSparseAttention, attention_path
from attention.sparse.ops import block_sparse_attention
from attention.dense_reference import block_pairs, dense_attention, multiplicity
from patternstore.generate import generate
from patternstore.specs import SparseSpec
from strategies import small_dilated_branches

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def inputs(b, q_len, n, heads, kv_heads, d, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, q_len, heads, d, generator=g, dtype=dtype) * 2  # scores where tanh bends
    k = torch.randn(b, n, kv_heads, d, generator=g, dtype=dtype) * 2
    v = torch.randn(b, n, kv_heads, d, generator=g, dtype=dtype)
    sinks = torch.randn(heads, generator=g, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, v, sinks)]


def check(out, ref, tensors, rtol=1e-10, atol=1e-10):
    torch.testing.assert_close(out, ref.to(out.dtype), rtol=rtol, atol=atol)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, tensors, grad, allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(ref, tensors, grad.to(ref.dtype), allow_unused=True, materialize_grads=True)
    for name, a, b in zip("q k v sinks".split(), got, want):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=rtol, atol=atol, msg=name)


# ------------------------------------------------------------------ dilated
@settings(max_examples=25, deadline=None)
@given(branches=small_dilated_branches(max_heads=4), n=st.integers(1, 24), data=st.data(),
       implementation=st.sampled_from(["reference", "fast", "flex"]), causal=st.booleans(),
       softcap=st.one_of(st.none(), st.floats(0.25, 20.0)), with_sinks=st.booleans())
def test_dilated_soft_cap_and_sinks_equal_the_dense_reference(branches, n, data, implementation, causal, softcap,
                                                             with_sinks):
    segments, rates, heads, scheme = branches
    kv_heads = data.draw(st.sampled_from([h for h in range(1, heads + 1) if heads % h == 0]))
    q_len = data.draw(st.integers(1, n))
    q, k, v, sinks = inputs(2, q_len, n, heads, kv_heads, 4, seed=n)
    pad = torch.zeros(2, n, dtype=torch.bool)
    pad[1, : data.draw(st.integers(0, n - 1))] = True
    module = DilatedAttention(segments, rates, scheme=scheme, implementation=implementation, softcap=softcap)
    out = module(q, k, v, is_causal=causal, key_padding_mask=pad, sinks=sinks if with_sinks else None)
    weight = multiplicity(n, heads, segments, rates, scheme, causal)
    ref = dense_attention(q, k, v, weight=weight, key_padding_mask=pad, softcap=softcap,
                          sinks=sinks if with_sinks else None)
    check(out, ref, (q, k, v, sinks))


def test_dilated_functional_api_and_float32_kernels():
    q, k, v, sinks = inputs(2, 20, 20, 4, 2, 8, dtype=torch.float32)
    plan = DilatedAttention([8, 16], [1, 2]).plan(4)
    out = dilated_attention(q, k, v, plan, is_causal=True, softcap=3.0, sinks=sinks)
    ref = dense_attention(q, k, v, weight=multiplicity(20, 4, [8, 16], [1, 2], "longnet", True), softcap=3.0,
                          sinks=sinks)
    check(out, ref, (q, k, v, sinks), rtol=1e-5, atol=1e-5)


def test_vmap_of_the_fast_path_takes_one_set_of_sinks():
    q, k, v, sinks = (x.detach() for x in inputs(3, 12, 12, 2, 2, 4))
    plan = DilatedAttention([4, 8], [1, 2]).plan(2)
    batched = torch.func.vmap(lambda a, b, c: fast_attention(a[None], b[None], c[None], plan.flat, True, 0.5, None,
                                                             2.0, sinks)[0])(q, k, v)
    for i in range(3):
        one = fast_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], plan.flat, True, 0.5, None, 2.0, sinks)
        torch.testing.assert_close(batched[i], one[0], rtol=0, atol=1e-14)


# ------------------------------------------------------------------- sparse
@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["bigbird", "local", "fixed"]), n=st.integers(1, 30), data=st.data(),
       softcap=st.one_of(st.none(), st.floats(0.25, 20.0)), with_sinks=st.booleans(), heads=st.sampled_from([2, 4]))
def test_sparse_soft_cap_and_sinks_equal_the_dense_reference(kind, n, data, softcap, with_sinks, heads):
    params = {"fixed": dict(num_local_blocks=2, num_global_blocks=1), "local": dict(num_sliding_window_blocks=2),
              "bigbird": dict(num_random_blocks=1, num_global_blocks=1)}[kind]
    module = BlockSparseAttention(kind, block_size=4, softcap=softcap, attention="unidirectional", **params)
    q_len = data.draw(st.integers(1, n))  # decode rows and chunks of prefill too: a prefix-stable layout
    q, k, v, sinks = inputs(2, q_len, n, heads, 2, 4, seed=n)
    pad = torch.zeros(2, n, dtype=torch.bool)
    pad[0, data.draw(st.integers(1, n)):] = True
    out = module(q, k, v, is_causal=True, key_padding_mask=pad, sinks=sinks if with_sinks else None)
    counts, indices = module.layouts.layout(n, heads, torch.device("cpu"), True)
    ref = dense_attention(q, k, v, weight=block_pairs(counts, indices, n, 4), is_causal=True, key_padding_mask=pad,
                          softcap=softcap, sinks=sinks if with_sinks else None)
    check(out, ref, (q, k, v, sinks))


@pytest.mark.parametrize("flash", [True, False], ids=["cpu-flash-tiles", "matmul-tiles"])
def test_sparse_functional_api_in_float32(monkeypatch, flash):
    import attention.sparse.tiles as sparse_tiles

    monkeypatch.setattr(sparse_tiles, "USE_CPU_FLASH_KERNEL", flash)
    spec = SparseSpec("bigbird", seq_len=33, block_size=4, num_heads=4, num_random_blocks=1)
    layout = generate(spec)
    q, k, v, sinks = inputs(2, 33, 33, 4, 4, 8, dtype=torch.float32)
    out = block_sparse_attention(q, k, v, layout["kv_num_blocks"], layout["kv_indices"], 4, softcap=1.5, sinks=sinks)
    ref = dense_attention(q, k, v, weight=block_pairs(layout["kv_num_blocks"], layout["kv_indices"], 33, 4),
                          softcap=1.5, sinks=sinks)
    check(out, ref, (q, k, v, sinks), rtol=1e-5, atol=1e-5)


def test_the_flex_path_hands_soft_caps_and_sinks_to_the_gather_path(monkeypatch):
    import attention.sparse.module as sparse

    monkeypatch.setattr(sparse, "FLEX_DEVICE_TYPES", ("cpu",))
    assert attention_path("cpu", 64, 64, 0.0, 16) == "flex"
    assert attention_path("cpu", 64, 64, 0.0, 16, softcap_or_sinks=True) == "gather"


# ------------------------------------------------------------------ sinks
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5), heads=st.integers(1, 4), keys=st.integers(0, 6), seed=st.integers(0, 1000))
def test_a_sink_is_a_key_with_a_zero_value(rows, heads, keys, seed):
    """apply_sinks on (out, lse) of some keys equals attention over those keys
    plus one key of score z and value 0; sinks_grad equals autograd of that."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, heads, keys, generator=g, dtype=F64) * 3
    values = torch.randn(rows, heads, keys, 3, generator=g, dtype=F64)
    z = (torch.randn(heads, generator=g, dtype=F64) * 3).requires_grad_()
    lse = scores.logsumexp(-1) if keys else torch.full((rows, heads), kernels.EMPTY_LSE, dtype=F64)
    out = (scores.softmax(-1)[..., None] * values).sum(-2) if keys else torch.zeros(rows, heads, 3, dtype=F64)
    got_out, got_lse = apply_sinks(out, lse, z)
    joined = torch.cat([scores, z.expand(rows, heads)[..., None]], -1)
    want_out = (joined.softmax(-1)[..., :keys, None] * values).sum(-2)
    torch.testing.assert_close(got_out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_lse, joined.logsumexp(-1), rtol=1e-12, atol=1e-12)
    grad = torch.randn(rows, heads, 3, generator=g, dtype=F64)
    want = torch.autograd.grad(want_out, z, grad)[0]
    torch.testing.assert_close(sinks_grad(grad, got_out.detach(), got_lse.detach(), z), want, rtol=1e-10,
                               atol=1e-12)


def test_a_very_negative_sink_changes_nothing():
    q, k, v, _ = (x.detach() for x in inputs(1, 16, 16, 2, 2, 4))
    module = DilatedAttention([8], [1], implementation="fast")
    torch.testing.assert_close(module(q, k, v, sinks=torch.full((2,), -1e4, dtype=F64)), module(q, k, v),
                               rtol=0, atol=0)


# ------------------------------------------------------------ kernel table
def test_the_table_says_which_kernels_take_a_soft_cap_and_the_walk_skips_the_others():
    assert {name for name, kernel in kernels.KERNELS.items() if kernel.softcap} == {"matmul", "flex"}
    assert kernels.choose_kernel("cpu", torch.float32, 64) == "cpu_flash"
    assert kernels.choose_kernel("cpu", torch.float32, 64, softcap=True) == "matmul"
    assert kernels.choose_kernel("cuda", torch.bfloat16, 64, softcap=True) == "matmul"
    assert kernels.choose_kernel("cuda", torch.bfloat16, 64, softcap=True, prefer="flex") == "flex"
    assert kernels.choose_kernel("cuda", torch.bfloat16, 64, softcap=True, prefer="cuda_flash") == "matmul"


@pytest.mark.parametrize("backend", [None, "cpu_flash", "cuda"])
def test_attend_with_a_soft_cap_runs_a_kernel_that_takes_it(backend, monkeypatch):
    called = []
    for name in ("matmul", "cpu_flash"):
        kernel = kernels.KERNELS[name]
        monkeypatch.setitem(kernels.KERNELS, name, kernel._replace(
            forward=lambda *a, _f=kernel.forward, _n=name, **kw: called.append(_n) or _f(*a, **kw)))
    q, k, v = (x.detach().transpose(1, 2) for x in inputs(1, 6, 6, 2, 2, 4)[:3])
    out, lse = kernels.attend(q, k, v, causal=True, scale=0.5, softcap=1.0, backend=backend)
    assert called == ["matmul"]
    ref, ref_lse = dense_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                   scale=0.5, softcap=1.0, return_lse=True)
    torch.testing.assert_close(out.transpose(1, 2), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)


def test_flex_takes_a_soft_cap_by_score_mod():
    q, k, v = (x.detach().float().transpose(1, 2) for x in inputs(1, 16, 16, 2, 2, 16)[:3])
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, 3] = True
    out, lse = flex_attend(q, k, v, mask, causal=True, scale=0.25, softcap=1.5)
    ref, ref_lse = dense_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=True, scale=0.25,
                                   key_padding_mask=mask, softcap=1.5, return_lse=True)
    torch.testing.assert_close(out.transpose(1, 2), ref.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse.float(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("softcap", [0, -1.0, math.inf, math.nan, True, "30"])
def test_a_bad_soft_cap_names_the_field(softcap):
    for build in (lambda: DilatedAttention([8], [1], softcap=softcap),
                  lambda: BlockSparseAttention("local", block_size=4, softcap=softcap)):
        with pytest.raises(ValueError, match="softcap must be None or a finite number > 0"):
            build()


@pytest.mark.parametrize("sinks, message", [
    (torch.zeros(3, dtype=F64), r"sinks must be None or a floating \(2,\) tensor"),
    (torch.zeros(2, dtype=torch.int64), r"sinks must be None or a floating \(2,\) tensor"),
    (torch.zeros(1, 2, dtype=F64), r"sinks must be None or a floating \(2,\) tensor"),
    (torch.zeros(2, dtype=F64, device="meta"), "sinks is on meta"),
])
def test_bad_sinks_name_the_field(sinks, message):
    q, k, v, _ = (x.detach() for x in inputs(1, 8, 8, 2, 2, 4))
    for module in (DilatedAttention([8], [1]), BlockSparseAttention("local", block_size=4)):
        with pytest.raises(ValueError, match=message):
            module(q, k, v, sinks=sinks)
