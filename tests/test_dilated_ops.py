"""The dilated custom ops of the ``attention::`` namespace against the
float64 dense definition: outputs, gradients, vmap rules and shapes."""

from __future__ import annotations

import pytest
import torch

import attention  # noqa: F401  (registers the operators)
from attention.dense_reference import dense_dilated_attention

SEGMENTS, RATES = (8, 16), (1, 2)


def _plan_and_inputs(n=21, seed=0):
    from patternstore import DilatedSpec, generate
    from attention import DilatedPlan

    plan = DilatedPlan.from_pattern(generate(DilatedSpec(SEGMENTS, RATES, 4)))
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, n, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    pad = torch.zeros(2, n, dtype=torch.bool)
    pad[0, -4:] = True
    return plan, q, k, v, pad


@pytest.mark.parametrize("name", ["dilated_forward", "dilated_reference"])
def test_the_forward_ops_compute_the_dense_definition_gradients_included(name):
    plan, q, k, v, pad = _plan_and_inputs()
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, _ = getattr(torch.ops.attention, name)(*leaves, pad, list(plan.flat), True, 8 ** -0.5)
    dense_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    dense = dense_dilated_attention(*dense_leaves, SEGMENTS, RATES, is_causal=True, key_padding_mask=pad)
    torch.testing.assert_close(out, dense, rtol=1e-10, atol=1e-10)
    for a, b in zip(torch.autograd.grad(out.square().sum(), leaves),
                    torch.autograd.grad(dense.square().sum(), dense_leaves)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_the_backward_op_computes_the_dense_gradients():
    plan, q, k, v, pad = _plan_and_inputs()
    out, lse = torch.ops.attention.dilated_forward(q, k, v, pad, list(plan.flat), False, 0.3)
    grad_out = torch.randn_like(out)
    got = torch.ops.attention.dilated_backward(grad_out, q, k, v, out, lse, pad, list(plan.flat), False, 0.3)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    dense = dense_dilated_attention(*leaves, SEGMENTS, RATES, key_padding_mask=pad, scale=0.3)
    for a, c in zip(got, torch.autograd.grad(dense, leaves, grad_out)):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["dilated_forward", "dilated_reference"])
def test_the_vmap_rule_folds_the_vmapped_dim_into_the_batch(name):
    """vmap over q (k, v shared, not batched) and over everything at a
    non-leading dim: each slice is the op on that slice."""
    op = getattr(torch.ops.attention, name)
    plan, q, k, v, pad = _plan_and_inputs()
    flat = list(plan.flat)
    stacked = torch.stack([q, q.flip(1), 2 * q])
    out, lse = torch.func.vmap(lambda x: op(x, k, v, pad, flat, True, 0.4))(stacked)
    for i in range(3):
        want = op(stacked[i], k, v, pad, flat, True, 0.4)
        torch.testing.assert_close(out[i], want[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse[i], want[1], rtol=1e-12, atol=1e-12)
    many = [torch.stack([x, x.roll(1, 1)], dim=2) for x in (q, k, v)]  # vmapped dim 2
    out, _ = torch.func.vmap(lambda q, k, v: op(q, k, v, None, flat, False, 0.4), in_dims=2)(*many)
    for i in range(2):
        want, _ = op(*(x.select(2, i) for x in many), None, flat, False, 0.4)
        torch.testing.assert_close(out[i], want, rtol=1e-12, atol=1e-12)


def test_the_ops_give_shapes_on_the_meta_device_with_the_value_head_dim():
    plan, *_ = _plan_and_inputs()
    q, k = (torch.empty(2, 21, 4, 8, device="meta") for _ in range(2))
    v = torch.empty(2, 21, 4, 5, device="meta")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        for op in (torch.ops.attention.dilated_forward, torch.ops.attention.dilated_reference):
            out, lse = op(q, k, v, None, list(plan.flat), True, 0.5)
            assert out.shape == (2, 21, 4, 5) and lse.shape == (2, 21, 4)
