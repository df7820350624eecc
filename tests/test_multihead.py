"""MultiheadDilatedAttention and ImprovedMultiheadDilatedAttention (and the
MultiheadWrapper beneath every multi-head layer): the
composition (projections, dense dilated attention, sub-LayerNorm, output
projection) written out in the test, the initialization, padding, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attention import (
    ImprovedMultiheadDilatedAttention,
    MultiheadBlockSparseAttention,
    MultiheadDilatedAttention,
    MultiheadWrapper,
)
from attention.dense_reference import dense_dilated_attention

CLASSES = [MultiheadDilatedAttention, ImprovedMultiheadDilatedAttention]
SEGMENTS, RATES = (4, 8, 16), (1, 2, 4)


def make(cls, embed_dim=24, heads=4, **kwargs):
    torch.manual_seed(0)
    return cls(embed_dim, heads, SEGMENTS, RATES, dtype=torch.float64, **kwargs)


def projections(module):
    """(weight, bias) of q, k, v, whichever way the module stores them."""
    return [(w, b) for w, b, _ in module.input_projections()]


def by_hand(module, query, key, value, key_padding_mask=None, is_causal=False):
    h = module.num_heads
    q, k, v = (F.linear(x, w, b).unflatten(-1, (h, -1)) for x, (w, b) in zip((query, key, value), projections(module)))
    x = dense_dilated_attention(q, k, v, SEGMENTS, RATES, is_causal=is_causal, key_padding_mask=key_padding_mask)
    x = x.flatten(-2)
    if module.norm is not None:
        x = F.layer_norm(x, (module.embed_dim,), module.norm.weight, module.norm.bias, module.norm.eps)
    return F.linear(x, module.out_proj.weight, module.out_proj.bias)


def inputs(b=2, n=37, e=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, e, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("layer_norm", [True, False])
@pytest.mark.parametrize("is_causal", [False, True])
def test_self_attention_matches_composition(cls, layer_norm, is_causal):
    module = make(cls, layer_norm=layer_norm)
    x, _, _ = inputs()
    pad = torch.zeros(2, 37, dtype=torch.bool)
    pad[0, 3:9] = True
    out, weights = module(x, key_padding_mask=pad, is_causal=is_causal)
    assert weights is None
    expected = by_hand(module, x, x, x, pad, is_causal)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    # gradients reach every parameter and the input
    x = x.clone().requires_grad_()
    module(x, key_padding_mask=pad, is_causal=is_causal)[0].square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", CLASSES)
def test_cross_attention_matches_composition(cls):
    module = make(cls)
    query, key, value = inputs()
    out, _ = module(query, key, value)
    torch.testing.assert_close(out, by_hand(module, query, key, value), rtol=1e-10, atol=1e-10)
    out, _ = module(query, key)  # value defaults to key
    torch.testing.assert_close(out, by_hand(module, query, key, key), rtol=1e-10, atol=1e-10)


def test_improved_equals_plain_with_the_same_weights():
    plain, fused = make(MultiheadDilatedAttention), make(ImprovedMultiheadDilatedAttention)
    with torch.no_grad():
        fused.in_proj.weight.copy_(torch.cat([w for w, _ in projections(plain)]))
        fused.in_proj.bias.copy_(torch.cat([b for _, b in projections(plain)]))
        fused.out_proj.load_state_dict(plain.out_proj.state_dict())
    query, key, value = inputs()
    for args in ((query,), (query, key, value)):
        torch.testing.assert_close(fused(*args, is_causal=True)[0], plain(*args, is_causal=True)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", CLASSES)
def test_padded_keys_have_no_influence(cls):
    module = make(cls)
    query, key, value = inputs()
    pad = torch.zeros(2, 37, dtype=torch.bool)
    pad[:, ::3] = True
    pad[1, :] = True  # every key padded in this row: finite outputs
    out, _ = module(query, key, value, key_padding_mask=pad)
    noise = torch.randn(2, 37, 24, dtype=torch.float64) * 100 * pad[..., None]
    changed, _ = module(query, key + noise, value + noise, key_padding_mask=pad)
    torch.testing.assert_close(changed, out, rtol=1e-10, atol=1e-10)
    assert torch.isfinite(out).all()
    # self-attention: changing padded positions changes only their own rows
    x = query
    out, _ = module(x, key_padding_mask=pad)
    changed, _ = module(x + noise, key_padding_mask=pad)
    torch.testing.assert_close(changed[~pad], out[~pad], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls", CLASSES)
def test_initialization(cls):
    e, gamma = 256, 0.5
    module = cls(e, 8, SEGMENTS, RATES, gamma_init=gamma)
    xavier_std = math.sqrt(2.0 / (e + e))
    weights = [w for w, _ in projections(module)] + [module.out_proj.weight]
    for w, gain in zip(weights, (1.0, 1.0, gamma, gamma)):
        assert w.shape == (e, e)
        assert abs(w.std().item() / (gain * xavier_std) - 1) < 0.03
        assert abs(w.mean().item()) < 0.02 * gain * xavier_std  # 5 standard errors
    for _, b in projections(module):
        assert torch.equal(b, torch.zeros(e))
    assert torch.equal(module.out_proj.bias, torch.zeros(e))
    assert isinstance(module.norm, torch.nn.LayerNorm)
    assert cls(e, 8, SEGMENTS, RATES, layer_norm=False, bias=False).out_proj.bias is None


@pytest.mark.parametrize("cls", CLASSES)
def test_errors(cls):
    module = make(cls)
    x, _, _ = inputs()
    with pytest.raises(ValueError, match="need_weights=True is not supported"):
        module(x, need_weights=True)
    with pytest.raises(ValueError, match="query must have shape"):
        module(x[..., :20])
    with pytest.raises(ValueError, match="one shape"):
        module(x, x[:, :30])
    with pytest.raises(ValueError, match="one shape"):
        module(x, x, x[:, :30])
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        module(x, key_padding_mask=torch.zeros(2, 30, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        cls(24, 5, SEGMENTS, RATES)
    with pytest.raises(ValueError, match="num_heads must be an int"):
        cls(24, 0, SEGMENTS, RATES)


@pytest.mark.parametrize("cls", CLASSES)
def test_decode_rows_through_the_wrapper_are_the_full_forward_rows(cls):
    """query of the last positions against the whole key/value sequence (a
    KV cache): the same rows as the full causal self-attention."""
    module = make(cls)
    x, _, _ = inputs()
    full, _ = module(x, is_causal=True)
    for q_len in (1, 4):
        out, _ = module(x[:, -q_len:], x, x, is_causal=True)
        torch.testing.assert_close(out, full[:, -q_len:], rtol=1e-10, atol=1e-10)


class _DenseAttention(torch.nn.Module):
    """SDPA on (batch, seq, heads, head_dim), padding as an additive mask."""

    def forward(self, q, k, v, is_causal=False, key_padding_mask=None):
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask,
                                             is_causal=is_causal)
        return out.transpose(1, 2)


def test_the_wrapper_serves_any_attention_module_and_the_layers_are_not_each_other():
    torch.manual_seed(0)
    module = MultiheadWrapper(24, 4, _DenseAttention(), dtype=torch.float64)
    query, key, value = inputs(n=16)
    pad = torch.zeros(2, 16, dtype=torch.bool)
    pad[1, 10:] = True
    out, _ = module(query, key, value, key_padding_mask=pad)
    q, k, v = (F.linear(x, w, b).unflatten(-1, (4, 6)).transpose(1, 2)
               for x, (w, b) in zip((query, key, value), projections(module)))
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=~pad[:, None, None, :]).transpose(1, 2).flatten(-2)
    x = F.layer_norm(x, (24,), module.norm.weight, module.norm.bias, module.norm.eps)
    torch.testing.assert_close(out, F.linear(x, module.out_proj.weight, module.out_proj.bias), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="_DenseAttention never materializes"):
        module(query, need_weights=True)
    sparse = MultiheadBlockSparseAttention(16, 2, "local", block_size=4)
    assert isinstance(sparse, MultiheadWrapper) and not isinstance(sparse, MultiheadDilatedAttention)
    assert isinstance(make(ImprovedMultiheadDilatedAttention), MultiheadWrapper)


def test_the_presets_are_the_options():
    """``ImprovedMultiheadDilatedAttention`` is ``MultiheadDilatedAttention(
    implementation="fast", fused_qkv=True)``: same parameters, same state_dict
    keys, same outputs; and ``fused_qkv`` alone changes only the projection's
    storage (``in_proj`` instead of ``q_proj``/``k_proj``/``v_proj``)."""
    preset = make(ImprovedMultiheadDilatedAttention)
    options = make(MultiheadDilatedAttention, implementation="fast", fused_qkv=True)
    assert list(preset.state_dict()) == list(options.state_dict())
    options.load_state_dict(preset.state_dict())
    x, _, _ = inputs()
    torch.testing.assert_close(options(x, is_causal=True)[0], preset(x, is_causal=True)[0], rtol=0, atol=0)
    assert options.attention.implementation == preset.attention.implementation == "fast"
    fused_reference = make(MultiheadDilatedAttention, fused_qkv=True)
    assert "in_proj.weight" in fused_reference.state_dict() and fused_reference.attention.implementation == "reference"
    torch.testing.assert_close(fused_reference(x)[0], by_hand(fused_reference, x, x, x), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="implementation must be one of 'reference', 'fast'"):
        make(MultiheadDilatedAttention, implementation="flash")
    with pytest.raises(ValueError, match="fused_qkv must be a bool"):
        make(MultiheadDilatedAttention, fused_qkv=1)
