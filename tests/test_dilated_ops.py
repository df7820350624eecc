"""The dilated custom ops: one ``attention::`` namespace, and the
``patternstore::`` names of the previous version kept as aliases, so that
programs exported by it still load and compute.

``tests/data/dilated_v1.pt2`` (``ImprovedDilatedAttention``) and
``tests/data/dilated_reference_v1.pt2`` (``DilatedAttention``) were exported
by commit c61d590 with ``torch.export`` (segments (8, 16), rates (1, 2),
q/k/v (2, 24, 4, 8) float32, causal, the last 5 keys of batch row 1 padded,
the sequence dimension a ``Dim``) and saved with ``torch.export.save``; their
``*_io.pt`` hold the inputs and that version's outputs at lengths 24 and 19,
tensors only (loaded with ``weights_only=True``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import attention  # noqa: F401  (registers the operators before the programs load)
from attention.dense_reference import dense_dilated_attention

DATA = Path(__file__).parent / "data"
SEGMENTS, RATES = (8, 16), (1, 2)


@pytest.mark.parametrize("name, old_op", [("dilated_v1", "patternstore.dilated_attention"),
                                          ("dilated_reference_v1", "patternstore.dilated_attention_reference")])
def test_programs_exported_by_the_previous_version_load_and_compute(name, old_op):
    io = torch.load(DATA / f"{name}_io.pt", weights_only=True)
    program = torch.export.load(DATA / f"{name}.pt2")
    called = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert f"{old_op}.default" in called  # the program names the old op: the alias is what runs
    module = program.module()
    q, k, v, pad = io["q"], io["k"], io["v"], io["key_padding_mask"]
    for n, expected in ((24, io["out"]), (19, io["out_19"])):
        xs = [x[:, :n] for x in (q, k, v)]
        with torch.no_grad():
            out = module(*xs, is_causal=True, key_padding_mask=pad[:, :n])
        # float32 against that version's float32 output, and both against the float64 definition
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
        dense = dense_dilated_attention(*xs, SEGMENTS, RATES, is_causal=True, key_padding_mask=pad[:, :n])
        torch.testing.assert_close(out.double(), dense, rtol=1e-5, atol=1e-5)


def _plan_and_inputs(n=21, seed=0):
    from patternstore import DilatedSpec, generate
    from attention import DilatedPlan

    plan = DilatedPlan.from_pattern(generate(DilatedSpec(SEGMENTS, RATES, 4)))
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, n, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    pad = torch.zeros(2, n, dtype=torch.bool)
    pad[0, -4:] = True
    return plan, q, k, v, pad


@pytest.mark.parametrize("new, old", [("dilated_forward", "dilated_attention"),
                                      ("dilated_reference", "dilated_attention_reference")])
def test_the_old_names_compute_what_the_new_ones_do_gradients_included(new, old):
    plan, q, k, v, pad = _plan_and_inputs()
    dense = dense_dilated_attention(q, k, v, SEGMENTS, RATES, is_causal=True, key_padding_mask=pad)
    results = []
    for op in (getattr(torch.ops.attention, new), getattr(torch.ops.patternstore, old)):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = op(*leaves, pad, list(plan.flat), True, 8 ** -0.5)
        torch.testing.assert_close(out, dense, rtol=1e-10, atol=1e-10)
        results.append((out, lse, *torch.autograd.grad(out.square().sum(), leaves)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_backward_op_and_its_old_name_agree():
    plan, q, k, v, pad = _plan_and_inputs()
    out, lse = torch.ops.attention.dilated_forward(q, k, v, pad, list(plan.flat), False, 0.3)
    grad_out = torch.randn_like(out)
    new = torch.ops.attention.dilated_backward(grad_out, q, k, v, out, lse, pad, list(plan.flat), False, 0.3)
    old = torch.ops.patternstore.dilated_attention_backward(grad_out, q, k, v, out, lse, pad, list(plan.flat), False, 0.3)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    dense = dense_dilated_attention(*leaves, SEGMENTS, RATES, key_padding_mask=pad, scale=0.3)
    want = torch.autograd.grad(dense, leaves, grad_out)
    for a, b, c in zip(new, old, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
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
        for op in (torch.ops.attention.dilated_forward, torch.ops.attention.dilated.reference):
            out, lse = op(q, k, v, None, list(plan.flat), True, 0.5)
            assert out.shape == (2, 21, 4, 5) and lse.shape == (2, 21, 4)
