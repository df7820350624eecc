"""The capture-safe decode step over a static cache (attention.hf.decode):
for random patterns, cache fills, grouped-query heads and padding (left, and
holes after the first token), with and without attention sinks, it equals the padded path
(attention.hf.padding.attend_padded, itself checked against SDPA in
tests/test_hf.py) and the float64 dense reference, in float64 to 1e-12; it
dispatches no host sync (no ``aten::_local_scalar_dense``) once a layout's
row table exists; calls it does not serve return None."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("transformers")  # attention.hf.padding imports transformers' mask functions

from attention import BlockSparseAttention, DilatedAttention, ImprovedDilatedAttention  # noqa: E402
from attention.hf import decode as hf_decode
from attention.hf.padding import attend_padded
from attention.dense_reference import dense_attention, multiplicity
from strategies import small_dilated_branches  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def cache_inputs(batch, heads, kv_heads, length, filled, pads, holes, seed):
    """transformers' layouts (q (B, H, 1, d), k/v (B, H_kv, L, d)) and the traced
    mask (B, 2, 1, L): [:, 0] real tokens, [:, 1] rows holding tokens."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, 1, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(batch, kv_heads, length, 8, generator=g, dtype=torch.float64) for _ in range(2))
    held = (torch.arange(length) < filled).expand(batch, -1)
    real = held.clone()
    for row, (pad, hole) in enumerate(zip(pads, holes)):
        real[row, :pad] = False
        if hole is not None and pad < hole < filled - 1:
            real[row, hole] = False  # padding after the first token (never the query's own row)
    return q, k, v, torch.stack((real, held), 1)[:, :, None]


@st.composite
def dilated_cases(draw):
    segments, rates, heads, scheme = draw(small_dilated_branches(max_rate=5, max_heads=4))
    kv_heads = draw(st.sampled_from([g for g in (1, 2, heads) if heads % g == 0]))
    length = draw(st.integers(2, 60))
    filled = draw(st.integers(1, length))
    batch = draw(st.integers(1, 3))
    pads = [draw(st.integers(0, filled - 1)) for _ in range(batch)]
    holes = [draw(st.none() | st.integers(0, length)) for _ in range(batch)]
    return segments, rates, scheme, heads, kv_heads, length, filled, pads, holes


def random_sinks(heads: int, seed: int) -> torch.Tensor:
    """One sink logit per head (gpt-oss's ``s_aux``), float64."""
    return torch.randn(heads, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@settings(max_examples=30, deadline=None)
@given(dilated_cases(), st.booleans(), st.booleans())
def test_dilated_step_equals_the_padded_path_and_the_reference(case, causal, with_sinks):
    segments, rates, scheme, heads, kv_heads, length, filled, pads, holes = case
    module = DilatedAttention(segments, rates, implementation="fast", scheme=scheme)
    q, k, v, mask = cache_inputs(len(pads), heads, kv_heads, length, filled, pads, holes, seed=filled)
    sinks = random_sinks(heads, filled) if with_sinks else None
    got = hf_decode.step(module, q, k, v, mask, causal, sinks)
    want = attend_padded(module, q, k, v, mask, causal, sinks)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for row, pad in enumerate(pads):  # the row alone, its pattern from its first token, against float64
        real = mask[row, 0, 0, pad:filled]
        keys, values = (x[row:row + 1, :, pad:filled].transpose(1, 2) for x in (k, v))
        queries = torch.cat([torch.zeros(1, filled - pad - 1, heads, 8, dtype=q.dtype), q[row:row + 1, :, -1:]
                             .transpose(1, 2)], 1)  # the reference is square: earlier rows are not compared
        ref = dense_attention(queries, keys, values, weight=multiplicity(filled - pad, heads, segments, rates, scheme,
                                                                         True), key_padding_mask=~real[None], sinks=sinks)
        torch.testing.assert_close(got[row:row + 1], ref[:, -1:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind, params", [
    ("local", {}),
    ("bigbird", {"num_random_blocks": 1, "num_global_blocks": 1}),
    ("bigbird", {"num_random_blocks": 2, "different_layout_per_head": True}),
    ("bslongformer", {"global_block_indices": (0, 2)}),
])
@pytest.mark.parametrize("filled, pads, holes", [(37, [0, 5], [None, 20]), (64, [0, 0], [None, None]),
                                                 (1, [0, 0], [None, None]), (50, [49, 3], [None, 4])])
@pytest.mark.parametrize("with_sinks", [False, True], ids=["", "sinks"])
def test_sparse_step_equals_the_padded_path(kind, params, filled, pads, holes, with_sinks):
    module = BlockSparseAttention(kind, block_size=4, attention="unidirectional", **params)
    q, k, v, mask = cache_inputs(2, 4, 2, 64, filled, pads, holes, seed=filled)
    sinks = random_sinks(4, filled) if with_sinks else None
    got = hf_decode.step(module, q, k, v, mask, True, sinks)
    torch.testing.assert_close(got, attend_padded(module, q, k, v, mask, True, sinks), rtol=0, atol=1e-12)


class Syncs(TorchDispatchMode):
    """Counts the ops that copy a device value to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("module", [
    ImprovedDilatedAttention([4, 8, 16], [1, 2, 4]),
    BlockSparseAttention("bigbird", block_size=4, attention="unidirectional", num_random_blocks=1),
], ids=["dilated", "bigbird"])
def test_a_step_reads_nothing_on_the_host(module):
    q, k, v, mask = cache_inputs(2, 4, 2, 64, 40, [0, 6], [None, 11], seed=1)
    hf_decode.step(module, q, k, v, mask, True)  # the sparse row table: built once, here
    with Syncs() as syncs:
        out = hf_decode.step(module, q, k, v, mask, True)
        hf_decode.step(module, q, k, v, mask, True, random_sinks(4, 1))
    assert out is not None and syncs.count == 0
    with Syncs() as syncs:  # what it replaces: the padded path reads the fill level and the row layout
        attend_padded(module, q, k, v, mask, True)
    assert syncs.count > 0


def test_calls_it_does_not_serve_take_the_padded_path():
    module = ImprovedDilatedAttention([4, 8], [1, 2])
    q, k, v, mask = cache_inputs(1, 2, 2, 16, 9, [0], [None], seed=0)
    eager_mask = mask[:, :1]  # (B, 1, 1, L): the eager form
    assert hf_decode.step(module, q, k, v, eager_mask, True) is None
    assert hf_decode.step(module, q.expand(-1, -1, 2, -1), k, v, mask, True) is None  # two query rows
    assert hf_decode.step(DilatedAttention([4], [1], ordered=True), q, k, v, mask, True) is None
    bidirectional = BlockSparseAttention("bigbird", block_size=4, num_random_blocks=1)
    assert hf_decode.step(bidirectional, q, k, v, mask, True) is None  # not prefix-stable


def test_the_step_op_equals_the_padded_op_and_serves_only_decode_steps():
    """The two ops a compiled layer may call: attention::hf_attend (the step,
    chosen at trace time where hf_decode serves the call) and
    attention::hf_attend_padded give one result on a decode step; the step op
    refuses any other call instead of computing it another way."""
    import attention.hf.registration as hf
    from attention.hf.modules import DILATED, frozen
    from attention.hf.traced import traced_module_key

    hf.register()
    q, k, v, mask = cache_inputs(2, 4, 2, 40, 30, [0, 4], [None, 9], seed=2)
    settings = {"segment_lengths": [4, 8], "dilation_rates": [1, 2]}
    key = traced_module_key(DILATED, frozen(settings), None, 0.0, (4, 2, 8, 8), True)
    for sinks in (None, random_sinks(4, 3)):
        stepped = torch.ops.attention.hf_attend(q, k, v, mask, key, True, sinks)
        padded = torch.ops.attention.hf_attend_padded(q, k, v, mask, key, True, sinks)
        torch.testing.assert_close(stepped, padded, rtol=0, atol=1e-12)
    assert (stepped - torch.ops.attention.hf_attend(q, k, v, mask, key, True)).abs().max() > 1e-3  # sinks matter
    prefill = torch.randn(2, 4, 3, 8, dtype=q.dtype)
    with pytest.raises(ValueError, match="decode steps"):
        torch.ops.attention.hf_attend(prefill, k, v, mask, key, True)


def test_a_traced_decode_step_calls_the_capturable_op_and_a_prefill_the_tagged_one(monkeypatch):
    """Which op a compiled layer calls is decided at trace time: the decode
    step over a static cache (hf_decode serves it, DEVICE_TYPES has the device)
    ``attention::hf_attend``; a prefill ``attention::hf_attend_padded``, tagged
    ``cudagraph_unsafe`` so that inductor never captures its host reads."""
    from test_hf_compile import PATTERNS, left_padded, prefill_and_step, tiny_llama

    import attention.hf.registration as hf
    from attention.hf.modules import DILATED, frozen
    from attention.hf.traced import traced_module_key

    hf.register()
    monkeypatch.setattr(hf_decode, "DEVICE_TYPES", ("cuda", "cpu"))
    torch._dynamo.reset()
    ops = []

    def recording(graph_module, example_inputs):
        ops.append([str(n.target) for n in graph_module.graph.nodes if str(n.target).startswith("attention.")])
        return graph_module.forward

    model = tiny_llama(*PATTERNS["bigbird"])
    ids, mask = left_padded([0, 3], seed=5)
    with torch.no_grad():
        prefill, step = prefill_and_step(torch.compile(model, fullgraph=True, backend=recording), model, ids, mask)
        want_prefill, want_step = prefill_and_step(model, model, ids, mask)
    torch._dynamo.reset()
    assert ops == [["attention.hf_attend_padded"] * 2, ["attention.hf_attend"] * 2], ops
    torch.testing.assert_close(prefill, want_prefill, rtol=0, atol=1e-5)
    torch.testing.assert_close(step, want_step, rtol=0, atol=1e-5)
    assert torch.Tag.cudagraph_unsafe in torch.ops.attention.hf_attend_padded.default.tags
    assert torch.Tag.cudagraph_unsafe not in torch.ops.attention.hf_attend.default.tags


def test_an_eager_static_cache_step_reads_its_fill_level_from_the_mask_layout():
    """The eager mask of a static cache is the fixed-shape form with the row
    layout attached (padding_mask): the layers' padded path reads the fill
    level from it, not from the device, and equals the step."""
    from attention.hf.padding import padding_mask

    module = ImprovedDilatedAttention([4, 8, 16], [1, 2, 4])
    q, k, v, _ = cache_inputs(2, 4, 2, 64, 40, [0, 0], [None, None], seed=3)
    attention_mask = torch.ones(2, 40, dtype=torch.long)
    attention_mask[1, :6] = 0
    mask = padding_mask(2, q_length=1, kv_length=64, q_offset=torch.tensor(39), attention_mask=attention_mask)
    assert mask.shape == (2, 2, 1, 64)
    with Syncs() as syncs:
        out = attend_padded(module, q, k, v, mask, True)
    assert syncs.count == 0
    torch.testing.assert_close(out, hf_decode.step(module, q, k, v, mask, True), rtol=0, atol=1e-12)
