"""The dilated modules' ``ordered`` flag and ``implementation="auto"``
(attention.dilated.implementations): ordered mode computes the natural-order
function on residue-ordered sequences for every implementation (against the
float64 dense reference, gradients included); "auto" chooses "flex" exactly
where its measured table says so, and is "fast" where the table has nothing.
The flex implementation in ordered mode is checked in tests/test_dilated_flex.py
(compiled flex costs seconds per graph on the CPU)."""

from __future__ import annotations

import pickle

import pytest
import torch

from attention import DilatedAttention, ImprovedDilatedAttention, MultiheadDilatedAttention
from attention.dilated.implementations import FlexFaster, choose_implementation
from attention.residue import from_residue_order, residue_modulus, to_residue_order
from attention.dense_reference import dense_dilated_attention

pytestmark = pytest.mark.usefixtures("one_thread")

SEGMENTS, RATES = (8, 16, 24), (1, 2, 3)  # R = 6


def inputs(n: int, heads: int, kv_heads: int, padded: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, n, heads, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, n, kv_heads, 8, generator=g, dtype=torch.float64) for _ in range(2))
    pad = None
    if padded:
        pad = torch.zeros(2, n, dtype=torch.bool)
        pad[0, -3:] = True
        pad[1, :2] = True
    return q, k, v, pad


@pytest.mark.parametrize("implementation", ["reference", "fast", "auto"])
@pytest.mark.parametrize("n, causal, kv_heads, padded", [
    (40, False, 4, False), (41, True, 2, True), (5, True, 4, False), (67, False, 1, True),
])
def test_ordered_mode_is_the_natural_function_in_residue_order(implementation, n, causal, kv_heads, padded):
    module = DilatedAttention(SEGMENTS, RATES, implementation=implementation, ordered=True)
    modulus = module.residue_modulus
    assert modulus == residue_modulus(RATES) == 6
    q, k, v, pad = inputs(n, 4, kv_heads, padded)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    ordered = [to_residue_order(x, modulus) for x in (q, k, v)]
    pad_ordered = None if pad is None else to_residue_order(pad, modulus)
    out = from_residue_order(module(*ordered, is_causal=causal, key_padding_mask=pad_ordered), modulus)
    want = dense_dilated_attention(q, k, v, SEGMENTS, RATES, is_causal=causal, key_padding_mask=pad)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-10)
    weights = torch.randn_like(want)
    got, expected = (torch.autograd.grad(y, leaves, weights) for y in (out, want))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_ordered_multihead_layer_equals_natural_order():
    torch.manual_seed(0)
    natural = MultiheadDilatedAttention(32, 4, SEGMENTS, RATES, implementation="fast").double()
    ordered = MultiheadDilatedAttention(32, 4, SEGMENTS, RATES, implementation="fast", ordered=True).double()
    ordered.load_state_dict(natural.state_dict())
    x = torch.randn(2, 45, 32, dtype=torch.float64)
    want = natural(x, is_causal=True)[0]
    got = from_residue_order(ordered(to_residue_order(x, 6), is_causal=True)[0], 6)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_ordered_mode_compiles_with_a_dynamic_length():
    module = ImprovedDilatedAttention(SEGMENTS, RATES, ordered=True)
    compiled = torch.compile(module, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (40, 57):
        q, k, v, _ = inputs(n, 4, 2, False, seed=n)
        torch.testing.assert_close(compiled(q, k, v, is_causal=True), module(q, k, v, is_causal=True),
                                   rtol=0, atol=1e-12)


def test_ordered_flag_errors_repr_and_pickles():
    with pytest.raises(ValueError, match="ordered must be True or False"):
        DilatedAttention(SEGMENTS, RATES, ordered=1)
    module = DilatedAttention(SEGMENTS, RATES, implementation="fast", ordered=True)
    q, k, v, _ = inputs(24, 4, 4, False)
    with pytest.raises(ValueError, match=r"ordered=True .*q_len 1 and kv_len 24"):
        module(q[:, -1:], k, v)
    assert "ordered=True" in repr(module)
    assert "ordered" not in repr(DilatedAttention(SEGMENTS, RATES))
    assert pickle.loads(pickle.dumps(module)).ordered is True
    with pytest.raises(ValueError, match="implementation"):
        DilatedAttention(SEGMENTS, RATES, implementation="fused")


# ------------------------------------------------------------------ auto
def meta(n: int, q_len: int | None = None, d: int = 64, dtype=torch.bfloat16, grad: bool = False):
    """(q, k, v) on the meta device: "auto" reads devices, dtypes and shapes only."""
    q = torch.empty(1, q_len or n, 4, d, device="meta", dtype=dtype, requires_grad=grad)
    k, v = (torch.empty(1, n, 4, d, device="meta", dtype=dtype) for _ in range(2))
    return q, k, v


TABLE = (FlexFaster("meta", torch.bfloat16, (64, 128), 16384, 1 << 20, causal=False, training=False),
         FlexFaster("meta", torch.bfloat16, (128,), 32768, 1 << 20, causal=True, training=True))


@pytest.mark.parametrize("call, causal, dropout_p, expected", [
    (dict(n=16384), False, 0.0, "flex"),
    (dict(n=1 << 20, d=128), False, 0.0, "flex"),
    (dict(n=8192), False, 0.0, "fast"),                        # shorter than the measured range
    (dict(n=(1 << 20) + 16), False, 0.0, "fast"),              # longer
    (dict(n=16384, d=96), False, 0.0, "fast"),                 # a head_dim not measured
    (dict(n=16384, dtype=torch.float16), False, 0.0, "fast"),  # another dtype
    (dict(n=16384), True, 0.0, "fast"),                        # causal: only training measured
    (dict(n=65536, d=128, grad=True), True, 0.0, "flex"),
    (dict(n=65536, d=128, grad=True), False, 0.0, "fast"),     # non-causal training not measured
    (dict(n=65536, d=128, grad=True), True, 0.1, "fast"),      # dropout: flex has none
    (dict(n=16384, q_len=1), False, 0.0, "fast"),              # decode rows: the per-branch views
])
def test_auto_takes_flex_exactly_where_the_table_measured_it(call, causal, dropout_p, expected):
    q, k, v = meta(**call)
    assert choose_implementation(q, k, v, causal, dropout_p, table=TABLE) == expected
    assert choose_implementation(q, k, v, causal, dropout_p, table=()) == "fast"


def test_auto_never_takes_flex_on_the_cpu_and_equals_fast():
    q, k, v, pad = inputs(40, 4, 2, True)
    cpu_table = (FlexFaster("cpu", torch.float64, (8,), 1, 1 << 20, causal=True, training=False),)
    assert choose_implementation(q, k, v, True, 0.0, table=cpu_table) == "fast"
    auto, fast = (DilatedAttention(SEGMENTS, RATES, implementation=name) for name in ("auto", "fast"))
    assert torch.equal(auto(q, k, v, is_causal=True, key_padding_mask=pad),
                       fast(q, k, v, is_causal=True, key_padding_mask=pad))
