"""Packed documents under ``torch.compile(fullgraph=True)`` and
``torch.export``: ``cu_seqlens`` is a tensor input of the graph (the custom
ops read it), so a new split at the same total length does not recompile,
``dynamic=True`` serves every length and document count with one graph, and
compiled equals eager, gradients included. Small on purpose: a cold compile
costs seconds."""

from __future__ import annotations

import pytest
import torch

from attention import DilatedAttention, ImprovedDilatedAttention

pytestmark = pytest.mark.slow

SEGMENTS, RATES = (4, 8), (1, 2)


def inputs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    q, k, v = (torch.randn(1, n, 2, 4, generator=g, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return (q, k, v), cu


def check_equal(compiled, module, lengths, seed):
    (q, k, v), cu = inputs(lengths, seed)
    out = compiled(q, k, v, is_causal=True, cu_seqlens=cu)
    expected = module(q, k, v, is_causal=True, cu_seqlens=cu)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(out.square().sum(), (q, k, v))
    want = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_new_split_at_the_same_length_does_not_recompile():
    module = ImprovedDilatedAttention(SEGMENTS, RATES)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    check_equal(compiled, module, [5, 11, 0, 8], seed=0)
    with torch.compiler.set_stance("fail_on_recompile"):
        for seed, lengths in enumerate(([1, 20, 2, 1], [24, 0, 0, 0], [3, 3, 9, 9])):
            check_equal(compiled, module, lengths, seed)


@pytest.mark.parametrize("module_class", [DilatedAttention, ImprovedDilatedAttention])
def test_dynamic_compiles_one_graph_for_every_length_and_split(module_class):
    module = module_class(SEGMENTS, RATES)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, dynamic=True)
    check_equal(compiled, module, [5, 11, 0, 8], seed=0)
    with torch.compiler.set_stance("fail_on_recompile"):
        for seed, lengths in enumerate(([9, 1], [2, 17, 3, 30, 1, 6], [13], [4, 4, 4]), start=1):
            check_equal(compiled, module, lengths, seed)


def test_export_takes_cu_seqlens():
    module = ImprovedDilatedAttention(SEGMENTS, RATES)

    class Packed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = module

        def forward(self, q, k, v, cu_seqlens):
            return self.attention(q, k, v, is_causal=True, cu_seqlens=cu_seqlens)

    (q, k, v), cu = inputs([5, 11, 8])
    seq, docs = torch.export.Dim("seq", min=2, max=1 << 16), torch.export.Dim("docs", min=2, max=1 << 16)
    shapes = ({1: seq}, {1: seq}, {1: seq}, {0: docs})
    program = torch.export.export(Packed(), (q.detach(), k.detach(), v.detach(), cu), dynamic_shapes=shapes)
    exported = program.module()
    for lengths in ([5, 11, 8], [1, 0, 30], [7, 7, 7, 7, 2]):
        (q, k, v), cu = inputs(lengths, seed=len(lengths))
        torch.testing.assert_close(exported(q.detach(), k.detach(), v.detach(), cu),
                                   module(q, k, v, is_causal=True, cu_seqlens=cu).detach(), rtol=1e-6, atol=1e-6)
