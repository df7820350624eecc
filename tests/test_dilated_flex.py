"""The fused dilated path (attention.dilated.flex): residue order, block
layout, compiled flex forward, gradient wiring and ordered mode, each against
the float64 dense reference (attention/dense_reference.py).

Compiled flex runs on the CPU for the forward in float32 only; its tolerance
here is 2e-6 (measured error 3e-7 at these sizes). Gradients are checked by
running the same gathers, mods and BlockMask with a dense softmax in place
of flex (``emulated_flex``) in float64, to 1e-10."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention.dilated.plan import DilatedPlan
from attention.dilated.flex import block_mask_from_layout, dilated_flex_attention, fused_forward, residue_block_mask
from attention.dilated.plan import plan_branches
from attention.residue import from_residue_order, residue_index, residue_inverse, residue_modulus, residue_order, to_residue_order
from attention.dilated.residue_layout import layout_period, residue_layout, residue_layouts
from attention.dense_reference import dense_dilated_attention, multiplicity
from patternstore import DilatedSpec, generate
from strategies import small_dilated_branches

pytestmark = pytest.mark.usefixtures("one_thread")


def plan_of(segments, rates, heads, scheme="longnet") -> DilatedPlan:
    return DilatedPlan.from_pattern(generate(DilatedSpec(segments, rates, heads, scheme)))


# ------------------------------------------------------------------ order
@given(st.integers(1, 200), st.integers(1, 24))
def test_residue_order_sorts_by_residue_then_position(n, modulus):
    order = residue_order(n, modulus)
    assert order.tolist() == sorted(range(n), key=lambda p: (p % modulus, p))
    assert torch.equal(residue_inverse(n, modulus)[order], torch.arange(n))
    assert torch.equal(residue_index(order, n, modulus), torch.arange(n))
    x = torch.randn(2, n, 3)
    assert torch.equal(to_residue_order(x, modulus), x[:, order])
    assert torch.equal(from_residue_order(to_residue_order(x, modulus), modulus), x)


def test_order_helpers_reject_bad_input():
    with pytest.raises(ValueError, match="seq_len"):
        residue_order(0, 4)
    with pytest.raises(ValueError, match="modulus"):
        residue_order(8, 0)
    with pytest.raises(ValueError, match="dim"):
        to_residue_order(torch.zeros(2, 3), 2, dim=2)
    with pytest.raises(ValueError, match="rates"):
        residue_modulus([2, 0])


# ----------------------------------------------------------------- layout
def dense_blocks(layout, heads, nb):
    """(active, full) bool (heads, nb, nb) read from the layout's CSR."""
    active = torch.zeros(heads, nb, nb, dtype=torch.bool)
    full = torch.zeros_like(active)
    start = 0
    for h in range(heads):
        for i in range(nb):
            count = int(layout.kv_num_blocks[h, i])
            cols = layout.kv_indices[start : start + count].long()
            assert bool((cols[1:] > cols[:-1]).all()), "each row ascending"
            active[h, i, cols] = True
            full[h, i, cols] = layout.full[start : start + count]
            start += count
    assert start == layout.kv_indices.numel()
    return active, full


def reduced_mask(segments, rates, heads, scheme, n, block, causal):
    """Block reduction of the dense M > 0 mask in residue order: (any, all) per block."""
    order = residue_order(n, residue_modulus(rates))
    m = multiplicity(n, heads, segments, rates, scheme, causal)[:, order][:, :, order] > 0
    nb = -(-n // block)
    padded = torch.zeros(heads, nb * block, nb * block, dtype=torch.bool)
    inside = torch.zeros(nb * block, nb * block, dtype=torch.bool)
    padded[:, :n, :n], inside[:n, :n] = m, True
    cells = lambda x: x.view(-1, nb, block, nb, block).transpose(2, 3).flatten(-2)  # noqa: E731
    return cells(padded).any(-1), cells(padded | ~inside).all(-1)


@settings(max_examples=150, deadline=None)
@given(small_dilated_branches(), st.integers(1, 60), st.integers(1, 9), st.booleans())
def test_layout_is_the_block_reduction_of_the_dense_mask(spec, n, block, causal):
    segments, rates, heads, scheme = spec
    layout = residue_layout(plan_of(segments, rates, heads, scheme), n, block, causal)
    active, full = dense_blocks(layout, heads, -(-n // block))
    any_pair, every_pair = reduced_mask(segments, rates, heads, scheme, n, block, causal)
    assert torch.equal(active, any_pair)
    assert not bool((full & ~every_pair).any()), "a block marked full holds a masked pair"


@settings(max_examples=100, deadline=None)
@given(small_dilated_branches(), st.lists(st.integers(1, 60), min_size=1, max_size=6), st.integers(1, 9),
       st.booleans())
def test_layouts_of_many_lengths_at_once_are_each_length_s_layout(spec, lengths, block, causal):
    segments, rates, heads, scheme = spec
    plan = plan_of(segments, rates, heads, scheme)
    counts, indices, full, first = residue_layouts(plan, lengths, block, causal)
    head_first = counts.sum(1).cumsum(0) - counts.sum(1)  # each head's first entry in the stack
    for u, n in enumerate(lengths):
        alone = residue_layout(plan, n, block, causal)
        nb = alone.kv_num_blocks.shape[1]
        assert torch.equal(counts[:, first[u]:first[u] + nb], alone.kv_num_blocks)
        for h in range(heads):
            before = int(counts[h, :first[u]].sum()) + int(head_first[h])
            mine = slice(int(alone.kv_num_blocks[:h].sum()), int(alone.kv_num_blocks[:h + 1].sum()))
            assert torch.equal(indices[before:before + mine.stop - mine.start], alone.kv_indices[mine])
            assert torch.equal(full[before:before + mine.stop - mine.start], alone.full[mine])
    assert counts.shape[1] == sum(-(-n // block) for n in lengths) and int(counts.sum()) == indices.numel()


def test_layouts_of_many_lengths_reject_bad_input():
    plan = plan_of((8,), (2,), 2)
    with pytest.raises(ValueError, match="lengths"):
        residue_layouts(plan, [4, 0], 4, False)
    with pytest.raises(ValueError, match="lengths"):
        residue_layouts(plan, [], 4, False)
    with pytest.raises(ValueError, match="block_size"):
        residue_layouts(plan, [8], 0, False)
    with pytest.raises(ValueError, match="is_causal"):
        residue_layouts(plan, [8], 4, 1)


@pytest.mark.parametrize("causal", [False, True])
def test_full_blocks_are_exact_when_blocks_lie_inside_runs(causal):
    # R = 6 divides every segment; the block (4) divides s / R and n / R.
    segments, rates, heads, n, block = (24, 48), (2, 3), 4, 96, 4
    layout = residue_layout(plan_of(segments, rates, heads), n, block, causal)
    active, full = dense_blocks(layout, heads, n // block)
    any_pair, every_pair = reduced_mask(segments, rates, heads, "longnet", n, block, causal)
    assert torch.equal(full, every_pair & any_pair)
    assert bool(full.any()) and (causal or torch.equal(full, active))


def test_layout_rejects_bad_input():
    plan = plan_of((8,), (2,), 2)
    with pytest.raises(ValueError, match="seq_len"):
        residue_layout(plan, 0, 4, False)
    with pytest.raises(ValueError, match="block_size"):
        residue_layout(plan, 8, 0, False)
    with pytest.raises(ValueError, match="is_causal"):
        residue_layout(plan, 8, 4, 1)
    with pytest.raises(ValueError, match="offset"):
        residue_layout(DilatedPlan(2, (plan.groups[0]._replace(offset=2),)), 8, 4, False)


# ------------------------------------------------- flex emulated densely
def emulated_flex(query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options=None):
    """flex_attention's definition, dense: score_mod everywhere, mask_mod in
    partial blocks only, full blocks unmasked, blocks absent from the
    BlockMask masked; a row with no key outputs 0. Differentiable."""
    b, h, n, _ = query.shape
    group = h // key.shape[1]
    assert enable_gqa == (group > 1)
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    bi, hi = torch.arange(b).view(b, 1, 1, 1), torch.arange(h).view(1, h, 1, 1)
    qi, ki = torch.arange(n).view(1, 1, n, 1), torch.arange(n).view(1, 1, 1, n)
    size = block_mask.BLOCK_SIZE[0]

    def blocks(num, indices):
        grid = torch.zeros(*num.shape, num.shape[-1], dtype=torch.bool)
        for head in range(num.shape[1]):
            for row in range(num.shape[2]):
                grid[0, head, row, indices[0, head, row, : int(num[0, head, row])].long()] = True
        return grid[:, :, qi // size, ki // size].squeeze(2).squeeze(2)

    partial = blocks(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = torch.zeros_like(partial)
    if block_mask.full_kv_num_blocks is not None:
        full = blocks(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    assert not bool((partial & full).any())
    allowed = full | (partial & block_mask.mask_mod(bi, hi, qi, ki))
    scores = score_mod(query @ key.transpose(-1, -2) * scale, bi, hi, qi, ki)
    assert bool(torch.isfinite(scores[full.expand_as(scores)]).all()), "log M finite in full blocks"
    scores = scores.masked_fill(~allowed, -math.inf)
    live = allowed.any(-1, keepdim=True)
    return torch.softmax(scores.masked_fill(~live, 0.0), -1) * live @ value


def emulated(q, k, v, plan, *, is_causal, key_padding_mask=None, ordered=False, block_size=16):
    """The fused path's own gathers, mods and BlockMask, with ``emulated_flex``."""
    n = q.shape[1]
    mask = residue_block_mask(plan, n, block_size, is_causal, key_padding_mask is None, q.device)
    modulus = residue_modulus(g.rate for g in plan.groups)
    return fused_forward(q, k, v, mask, key_padding_mask, plan_branches(plan), modulus, is_causal,
                         1.0 / math.sqrt(q.shape[-1]), ordered, attend=emulated_flex)


def inputs(n, heads, kv_heads, d=8, d_v=8, padded=False, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, n, heads, d, generator=g, dtype=dtype)
    k = torch.randn(2, n, kv_heads, d, generator=g, dtype=dtype)
    v = torch.randn(2, n, kv_heads, d_v, generator=g, dtype=dtype)
    pad = (torch.rand(2, n, generator=g) < 0.25) if padded else None
    return q, k, v, pad


def reference(q, k, v, segments, rates, scheme, causal, pad):
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    return dense_dilated_attention(q, k, v, segments, rates, scheme=scheme, is_causal=causal, key_padding_mask=pad)


@settings(max_examples=25, deadline=None)
@given(small_dilated_branches(), st.integers(1, 50), st.booleans(), st.booleans())
def test_emulated_fused_forward_equals_the_reference(spec, n, causal, padded):
    segments, rates, heads, scheme = spec
    q, k, v, pad = inputs(n, heads, heads, padded=padded)
    out = emulated(q, k, v, plan_of(segments, rates, heads, scheme), is_causal=causal, key_padding_mask=pad)
    torch.testing.assert_close(out, reference(q, k, v, segments, rates, scheme, causal, pad), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "n, causal, kv_heads, d_v, padded, ordered",
    [(45, True, 2, 8, True, False), (40, False, 4, 6, False, False), (33, True, 4, 8, True, True)],
)
def test_gradients_through_gathers_and_mods(n, causal, kv_heads, d_v, padded, ordered):
    segments, rates, heads = (8, 16, 12), (1, 2, 3), 4
    plan = plan_of(segments, rates, heads)
    q, k, v, pad = inputs(n, heads, kv_heads, d_v=d_v, padded=padded)
    modulus = residue_modulus(rates)
    grads = []
    for fused in (True, False):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        if fused and ordered:
            xo = [to_residue_order(t, modulus) for t in x]
            pad_o = None if pad is None else to_residue_order(pad, modulus)
            out = from_residue_order(emulated(*xo, plan, is_causal=causal, key_padding_mask=pad_o, ordered=True), modulus)
        elif fused:
            out = emulated(*x, plan, is_causal=causal, key_padding_mask=pad)
        else:
            out = reference(*x, segments, rates, "longnet", causal, pad)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        grads.append(torch.autograd.grad((out * weight).sum(), x))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


# ------------------------------------------------------ compiled flex (CPU)
@pytest.mark.parametrize(
    "n, causal, kv_heads, d_v, padded, ordered",
    # 197: rows narrower than its 13 blocks; ordered with inputs that require grad (under no_grad)
    [(40, False, 4, 8, False, False), (197, True, 2, 6, True, True)],
)
def test_compiled_flex_forward_equals_the_reference(n, causal, kv_heads, d_v, padded, ordered):
    segments, rates, heads = (8, 16, 24), (1, 2, 3), 4
    q, k, v, pad = inputs(n, heads, kv_heads, d_v=d_v, padded=padded, dtype=torch.float32)
    modulus = residue_modulus(rates)
    order = (lambda x: to_residue_order(x, modulus)) if ordered else (lambda x: x)
    with torch.no_grad():
        out = dilated_flex_attention(*(order(x).requires_grad_() for x in (q, k, v)), plan_of(segments, rates, heads),
                                     is_causal=causal, key_padding_mask=None if pad is None else order(pad),
                                     block_size=16, ordered=ordered)
    out = from_residue_order(out, modulus) if ordered else out
    assert out.dtype == torch.float32 and out.shape == (2, n, heads, d_v)
    torch.testing.assert_close(out.double(), reference(q, k, v, segments, rates, "longnet", causal, pad),
                               rtol=0, atol=2e-6)


def rope(x, positions):
    """Rotary embedding of x (B, n, H, d) at integer ``positions`` (n,)."""
    half = x.shape[-1] // 2
    angle = positions[:, None].to(x.dtype) * 10000.0 ** (-torch.arange(half, dtype=x.dtype) / half)
    cos, sin = angle.cos()[None, :, None], angle.sin()[None, :, None]
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)


# "fast" (it gathers inside; training, gradients included): the flex path in
# ordered mode is checked against the reference in the compiled test above
# (each compiled CPU flex graph costs ~20 s of the suite).
@pytest.mark.parametrize("implementation", ["fast"])
def test_ordered_two_layer_model_equals_natural_order(implementation):
    """Two layers of modules with ``ordered=True`` on residue-ordered
    activations (RoPE given the permuted ids) equal the natural-order model."""
    from attention import DilatedAttention

    segments, rates, heads, d, n = (8, 16, 24), (1, 2, 3), 4, 8, 40
    modulus = residue_modulus(rates)
    g = torch.Generator().manual_seed(3)
    layers = [[torch.randn(heads * d, heads * d, generator=g) / (heads * d) ** 0.5 for _ in range(6)] for _ in range(2)]
    natural_attention, ordered_attention = (DilatedAttention(segments, rates, implementation=implementation,
                                                             ordered=ordered) for ordered in (False, True))
    assert ordered_attention.residue_modulus == modulus

    def model(x, positions, attention):
        for wq, wk, wv, wo, w1, w2 in layers:
            b = x.shape[0]
            q, k, v = ((x @ w).view(b, n, heads, d) for w in (wq, wk, wv))
            q, k = rope(q, positions), rope(k, positions)
            x = x + attention(q, k, v).reshape(b, n, heads * d) @ wo
            x = x + torch.relu(x @ w1) @ w2  # per position
        return x

    x = torch.randn(2, n, heads * d, generator=g, requires_grad=implementation == "fast")
    with torch.set_grad_enabled(implementation == "fast"):
        natural = model(x, torch.arange(n), natural_attention)
        ordered = from_residue_order(model(to_residue_order(x, modulus), residue_order(n, modulus),
                                           ordered_attention), modulus)
    torch.testing.assert_close(ordered, natural, rtol=0, atol=1e-5)
    if implementation == "fast":
        weights = torch.randn_like(natural)
        got, want = (torch.autograd.grad(out, x, weights)[0] for out in (ordered, natural))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ----------------------------------------------------------------- errors
def test_fused_path_refuses_what_it_does_not_serve():
    plan = plan_of((8,), (2,), 2)
    q, k, v, _ = inputs(16, 2, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="dilated_attention"):
        dilated_flex_attention(q[:, :4], k, v, plan)
    with pytest.raises(ValueError, match="no CPU backward"):
        dilated_flex_attention(q.requires_grad_(), k, v, plan)
    q = q.detach()
    with pytest.raises(ValueError, match="float32"):
        dilated_flex_attention(q.double(), k.double(), v.double(), plan)
    with pytest.raises(ValueError, match="block_size"):
        dilated_flex_attention(q, k, v, plan, block_size=24)
    with pytest.raises(ValueError, match="num_heads"):
        dilated_flex_attention(q, k, v, plan_of((8,), (2,), 4))
    with pytest.raises(ValueError, match="ordered"):
        dilated_flex_attention(q, k, v, plan, ordered=1)
    with pytest.raises(ValueError, match="head_dim_v"):
        dilated_flex_attention(q, k, v[:, :8], plan)


@pytest.mark.parametrize("causal", [False, True])
def test_block_mask_holds_the_layout_and_its_transpose(causal):
    plan, n, block = plan_of((8, 16), (1, 3), 2), 70, 16
    layout = residue_layout(plan, n, block, causal)
    transposed = residue_layout(plan, n, block, causal, transposed=True)
    nb = -(-n // block)
    (active, full), (t_active, t_full) = dense_blocks(layout, 2, nb), dense_blocks(transposed, 2, nb)
    assert torch.equal(t_active, active.transpose(1, 2)) and torch.equal(t_full, full.transpose(1, 2))

    def grid(num, indices):
        out = torch.zeros(2, nb, nb, dtype=torch.bool)
        for h in range(2):
            for i in range(nb):
                out[h, i, indices[0, h, i, : int(num[0, h, i])].long()] = True
        return out

    mask = block_mask_from_layout(layout, transposed, with_full=True, device=torch.device("cpu"))
    assert torch.equal(grid(mask.kv_num_blocks, mask.kv_indices), active & ~full)
    assert torch.equal(grid(mask.full_kv_num_blocks, mask.full_kv_indices), full)
    assert torch.equal(grid(mask.q_num_blocks, mask.q_indices), (active & ~full).transpose(1, 2))
    assert torch.equal(grid(mask.full_q_num_blocks, mask.full_q_indices), full.transpose(1, 2))
    padded = block_mask_from_layout(layout, transposed, with_full=False, device=torch.device("cpu"))
    assert padded.full_kv_num_blocks is None and padded.full_q_indices is None
    assert torch.equal(grid(padded.kv_num_blocks, padded.kv_indices), active)
    assert torch.equal(grid(padded.q_num_blocks, padded.q_indices), active.transpose(1, 2))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_full", [False, True])
def test_block_mask_repeated_from_its_period_equals_the_direct_one(causal, with_full):
    plan, n, block = plan_of((8, 24), (2, 3), 5), 240, 4
    assert layout_period(plan, n, block) == 24
    direct = block_mask_from_layout(residue_layout(plan, n, block, causal),
                                    residue_layout(plan, n, block, causal, transposed=True),
                                    with_full=with_full, device=torch.device("cpu"))
    repeated = residue_block_mask(plan, n, block, causal, with_full, torch.device("cpu"))
    for side in ("kv", "full_kv", "q", "full_q"):
        num, idx = getattr(direct, f"{side}_num_blocks"), getattr(direct, f"{side}_indices")
        if num is None:
            assert getattr(repeated, f"{side}_num_blocks") is None
            continue
        assert torch.equal(getattr(repeated, f"{side}_num_blocks"), num)
        used = torch.arange(idx.shape[-1]) < num[..., None]  # slots past a row's count are never read
        kept = getattr(repeated, f"{side}_indices")
        assert kept.shape[-1] == n // block  # on the CPU one slot per block (torch's CPU flex asserts it)
        assert torch.equal(kept[..., :idx.shape[-1]][used], idx[used])


@pytest.mark.parametrize("causal", [False, True])
def test_layout_repeated_from_its_period_equals_the_dense_mask(causal):
    # lcm(R = 6, segments) = 24 divides n = 240 and 24 / 6 is a multiple of the block.
    segments, rates, heads, n, block = (8, 24), (2, 3), 5, 240, 4
    layout = residue_layout(plan_of(segments, rates, heads), n, block, causal)
    active, full = dense_blocks(layout, heads, n // block)
    any_pair, every_pair = reduced_mask(segments, rates, heads, "longnet", n, block, causal)
    assert torch.equal(active, any_pair) and torch.equal(full, every_pair & any_pair)


# ------------------------------------------- the module option (CPU forward)
def test_the_flex_implementation_of_the_module_equals_the_reference_eager_compiled_and_decoding():
    from attention import DilatedAttention

    segments, rates, heads, n = (8, 16, 24), (1, 2, 3), 4, 40
    module = DilatedAttention(segments, rates, implementation="flex")
    q, k, v, pad = inputs(n, heads, 2, d_v=8, padded=True, dtype=torch.float32)
    want = reference(q, k, v, segments, rates, "longnet", True, pad)
    with torch.no_grad():
        eager = module(q, k, v, is_causal=True, key_padding_mask=pad)
        compiled = torch.compile(module, fullgraph=True, dynamic=False)(q, k, v, is_causal=True, key_padding_mask=pad)
        decode = module(q[:, -3:], k, v, is_causal=True, key_padding_mask=pad)  # rows < keys: the per-branch path
    torch.testing.assert_close(eager.double(), want, rtol=0, atol=2e-6)
    torch.testing.assert_close(compiled.double(), want, rtol=0, atol=2e-6)
    torch.testing.assert_close(decode.double(), want[:, -3:], rtol=0, atol=2e-6)
