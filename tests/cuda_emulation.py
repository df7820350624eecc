"""Test helpers for the kernel layer's CUDA control flow on the CPU: CPU
emulations of the fused CUDA attention ops, to substitute for
``attention.kernels._ops`` with a forced CUDA kernel choice; and a recorder of
the calls every kernel of the table receives."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

import attention.kernels.attend as kernels


def emulated_cuda_ops():
    """CPU emulations of the fused CUDA ops with the conventions measured on
    an H100 (torch 2.11): unit-stride rows required; the efficient kernel's
    lse padded to a multiple of 32 (the padding is NaN here, so a missed
    slice shows); cuDNN's lse (B, H, M, 1); the efficient kernel refuses
    fewer key/value heads and takes a value head_dim of its own (emulated by
    zero-padding the narrower of q/k and v to one head_dim, which changes no
    score and no output column); causal with M != N is not asked of any of
    them."""
    aten = torch.ops.aten

    def check(q, k, v, causal, gqa=True):
        assert all(x.stride(-1) == 1 for x in (q, k, v)), "fused CUDA kernels need unit-stride rows"
        assert not causal or q.shape[2] == k.shape[2], "the layer must split bottom-right causal problems"
        assert gqa or q.shape[1] == k.shape[1], "this kernel refuses fewer key/value heads"

    def flash(q, k, v, dropout, causal, debug, *, scale):
        check(q, k, v, causal)
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout, causal, scale=scale)
        return out, lse, None, None, q.shape[2], k.shape[2], None, None, None

    def flash_backward(do, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, dropout, causal, seed, offset, *, scale):
        check(q, k, v, causal)
        assert (max_q, max_k) == (q.shape[2], k.shape[2])
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(do, q, k, v, out, lse, dropout, causal, scale=scale)

    def cudnn(q, k, v, bias, compute_lse, dropout, causal, debug, *, scale):
        check(q, k, v, causal)
        assert bias is None and compute_lse
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout, causal, scale=scale)
        return out, lse.unsqueeze(-1), None, None, q.shape[2], k.shape[2], None, None, None

    def pad(x, width):
        return torch.nn.functional.pad(x, (0, width - x.shape[-1]))

    def efficient(q, k, v, bias, compute_lse, dropout, causal, *, scale):
        check(q, k, v, causal, gqa=False)
        assert compute_lse
        d, width = v.shape[-1], max(q.shape[-1], v.shape[-1])
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            pad(q, width), pad(k, width), pad(v, width), dropout, causal, attn_mask=bias, scale=scale
        )
        out = out[..., :d]
        b, h, m = lse.shape
        padded = torch.full((b, h, -(-m // 32) * 32), math.nan, dtype=lse.dtype)
        padded[:, :, :m] = lse
        return out, padded, None, None

    def efficient_backward(do, q, k, v, bias, out, lse, seed, offset, dropout, grad_input_mask, causal, *, scale):
        check(q, k, v, causal, gqa=False)
        m = q.shape[2]
        assert lse.shape[2] % 32 == 0 and lse.shape[2] >= m
        width = max(q.shape[-1], v.shape[-1])
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            pad(do, width), pad(q, width), pad(k, width), pad(v, width), pad(out, width), lse[:, :, :m], dropout,
            causal, attn_mask=bias, scale=scale,
        )
        return dq[..., : q.shape[-1]], dk[..., : k.shape[-1]], dv[..., : v.shape[-1]], None

    return SimpleNamespace(
        _scaled_dot_product_flash_attention=flash,
        _scaled_dot_product_flash_attention_backward=flash_backward,
        _scaled_dot_product_cudnn_attention=cudnn,
        _scaled_dot_product_efficient_attention=efficient,
        _scaled_dot_product_efficient_attention_backward=efficient_backward,
    )


def recording(monkeypatch):
    """Wrap every kernel of the table; return the list of (name, inputs) calls."""
    calls = []
    for name, kernel in list(kernels.KERNELS.items()):
        def forward(q, k, v, *rest, _name=name, _f=kernel.forward):
            calls.append((_name, "forward", q, k, v))
            return _f(q, k, v, *rest)

        def backward(do, q, k, v, *rest, _name=name, _b=kernel.backward):
            calls.append((_name, "backward", q, k, v))
            return _b(do, q, k, v, *rest)

        monkeypatch.setitem(kernels.KERNELS, name, kernel._replace(forward=forward, backward=backward))
    return calls
