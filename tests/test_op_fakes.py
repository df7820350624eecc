"""Every custom op of ``attention::``
returns from its fake kernel exactly what the real op returns: shapes,
strides, dtypes, devices (``torch.library.opcheck``'s fake-tensor check, which
cross-checks strides), on inputs laid out as callers pass them: the
modules' strided views, and transformers' non-contiguous ``(batch, heads,
seq, head_dim)`` views of its projections. A compiled graph trusts the fake
kernel's strides (inductor asserts them), so a mismatch crashes a compiled
program (it did: ``attention::hf_attend_backward`` returned contiguous
gradients where its fake said the views' strides). A new op without a case
here fails the first test; the ops that take attention sinks are checked
with them too."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")  # installed by `make test` (the test extra)

import attention.hf.registration as hf  # noqa: E402
from attention.hf.modules import DILATED, SPARSE, frozen  # noqa: E402
from attention.hf.traced import traced_module_key  # noqa: E402
from attention import BlockSparseAttention  # noqa: E402
from attention.dilated.module import ImprovedDilatedAttention

pytestmark = pytest.mark.usefixtures("one_thread")

CHECKS = ("test_schema", "test_faketensor")
B, N, H, H_KV, D, D_V = 2, 12, 4, 2, 8, 6


def module_views(g: torch.Generator, dtype=torch.float32, batch: int = B):
    """q, k, v as (batch, seq, heads, dim) views of transformers' (batch, heads, seq, dim) tensors."""
    return tuple(torch.randn(batch, heads, N, dim, generator=g, dtype=dtype).transpose(1, 2)
                 for heads, dim in ((H, D), (H_KV, D), (H_KV, D_V)))


def hf_views(g: torch.Generator):
    """q, k, v in transformers' layout (batch, heads, seq, dim), views of (batch, seq, heads, dim) tensors."""
    return tuple(torch.randn(B, N, heads, dim, generator=g).transpose(1, 2)
                 for heads, dim in ((H, D), (H_KV, D), (H_KV, D_V)))


def padding() -> torch.Tensor:
    """key_padding_mask (True = padding): row 0 a hole after its first token, row 1 left padding."""
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[0, 5] = True
    mask[1, :3] = True
    return mask


def dilated_cases():
    module = ImprovedDilatedAttention([4, 8], [1, 2])
    flat = list(module.plan(H).flat)
    q, k, v = module_views(torch.Generator().manual_seed(0), torch.float64)
    mask = padding()
    out, lse = torch.ops.attention.dilated_forward(q, k, v, mask, flat, True, 0.3)
    grad = torch.randn(B, H, N, D_V, dtype=out.dtype).transpose(1, 2)  # strided, as a transposed layer's grad
    forward = (q, k, v, mask, flat, True, 0.3)
    backward = (grad, q, k, v, out, lse, mask, flat, True, 0.3)
    return {
        "attention::dilated_forward": forward,
        "attention::dilated_reference": forward,
        "attention::dilated_backward": backward,
    }


def sparse_cases():
    module = BlockSparseAttention("bigbird", block_size=4, num_random_blocks=1, num_sliding_window_blocks=3,
                                  num_global_blocks=1, attention="unidirectional")
    plan = module.layouts.plan(N, H, torch.device("cpu"), True, 0)
    rows, keys = [r for r, _ in plan.groups], [c for _, c in plan.groups]
    q, k, v = module_views(torch.Generator().manual_seed(1), torch.bfloat16)  # half types: an lse of another dtype
    mask = padding()
    layout = (plan.kv_num_blocks, plan.kv_indices)
    options = (4, True, 0.3, 0.0, True)
    out, lse = torch.ops.attention.sparse_forward(q, k, v, *layout, rows, keys, mask, None, *options, None)
    grad = torch.randn_like(out)
    description = module._description
    return {
        "attention::sparse_forward": (q, k, v, *layout, rows, keys, mask, None, *options, None),
        "attention::sparse_backward": (grad, q, k, v, out, lse, *layout, rows, keys, mask, None, *options, None),
        "attention::sparse_layout": (q, k, description, True),
        "attention::sparse_block_mask": (q, k, description, True, True),
    }


def packed_dilated_cases():
    """Packed documents (batch 1) of 5, 0 and 7 tokens through the dilated ops, a padded key, a soft-cap
    and sinks."""
    module = ImprovedDilatedAttention([4, 8], [1, 2])
    flat = list(module.plan(H).flat)
    g = torch.Generator().manual_seed(5)
    q, k, v = module_views(g, torch.float64, batch=1)
    cu = torch.tensor([0, 5, 5, N])
    mask = torch.zeros(1, N, dtype=torch.bool)
    mask[0, 6] = True
    forward = (q, k, v, mask, cu, flat, True, 0.3, 2.0, torch.randn(H, dtype=torch.float64, generator=g))
    out, lse = torch.ops.attention.dilated_packed_forward(*forward)
    grad = torch.randn(1, H, N, D_V, dtype=out.dtype).transpose(1, 2)
    return {
        "attention::dilated_packed_forward": forward,
        "attention::dilated_packed_reference": forward,
        "attention::dilated_packed_backward": (grad, q, k, v, out, lse, mask, cu, flat, True, 0.3, 2.0),
    }


def packed_sparse_cases():
    """Packed documents (batch 1): the module's layouts, documents of 5, 0 and 7 tokens, a padded key, a
    soft-cap and sinks."""
    module = BlockSparseAttention("bigbird", block_size=4, num_random_blocks=1, num_sliding_window_blocks=3,
                                  num_global_blocks=1, attention="unidirectional")
    g = torch.Generator().manual_seed(4)
    q, k, v = module_views(g, torch.float64, batch=1)
    cu = torch.tensor([0, 5, 5, N])
    mask = torch.zeros(1, N, dtype=torch.bool)
    mask[0, 6] = True
    options = (module._description, 4, True, 0.3, 0.0, 2.0)
    sinks = torch.randn(H, dtype=torch.float64, generator=g)
    out, lse = torch.ops.attention.sparse_packed_forward(q, k, v, cu, None, None, mask, None, *options, sinks)
    grad = torch.randn_like(out)
    return {
        "attention::sparse_packed_forward": (q, k, v, cu, None, None, mask, None, *options, sinks),
        "attention::sparse_packed_backward": (grad, q, k, v, out, lse, cu, None, None, mask, None, *options),
    }


def hf_cases():
    """transformers' layouts: (batch, heads, seq, dim) views of projections, the whole cache."""
    settings = {"segment_lengths": [4, 8], "dilation_rates": [1, 2]}
    key = traced_module_key(DILATED, frozen(settings), None, 0.0, (H, H_KV, D, D_V), True)
    g = torch.Generator().manual_seed(2)
    q, k, v = hf_views(g)
    mask = torch.ones(B, N, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    out, lse = torch.ops.attention.hf_attend_lse(q, k, v, mask, key, True)
    grad = torch.randn_like(out)
    # A decode step over a static cache: one query row, the fixed-shape mask (real tokens; held rows).
    step = torch.zeros(B, 2, 1, N, dtype=torch.bool)
    step[:, :, 0, :9] = True
    step[1, 0, 0, :4] = False  # left padding
    return {
        "attention::hf_attend": (q[:, :, -1:], k, v, step, key, True),
        "attention::hf_attend_padded": (q, k, v, mask, key, True),
        "attention::hf_attend_lse": (q, k, v, mask, key, True),
        "attention::hf_attend_backward": (grad, q, k, v, out, lse, mask, key, True),
    }


def dense_cases():
    """The exact layers (sliding windows) over transformers' layouts: a window mask, soft-capping, sinks."""
    g = torch.Generator().manual_seed(3)
    q, k, v = hf_views(g)
    i = torch.arange(N)
    excluded = ((i[None, :] > i[:, None]) | (i[:, None] - i[None, :] >= 4))[None, None]  # causal window of 4
    sinks = torch.randn(H, generator=g)
    out, lse = torch.ops.attention.hf_dense(q, k, v, excluded, False, 0.3, 20.0, sinks)
    grad = torch.randn_like(out)
    return {
        "attention::hf_dense": (q, k, v, excluded, False, 0.3, 20.0, sinks),
        "attention::hf_dense_backward": (grad, q, k, v, out, lse, excluded, False, 0.3, 20.0),
    }


def registered_ops() -> set[str]:
    return {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("attention::")}


@pytest.fixture(scope="module")
def cases():
    hf.register()
    return {**dilated_cases(), **packed_dilated_cases(), **sparse_cases(), **packed_sparse_cases(), **hf_cases(),
            **dense_cases()}


def test_every_custom_op_has_a_case(cases):
    assert registered_ops() == set(cases) | {"attention::reduce_scatter_rows"}


@pytest.mark.parametrize("name", sorted(registered_ops() - {"attention::reduce_scatter_rows"}))
def test_the_fake_kernel_returns_what_the_op_returns(cases, name):
    namespace, op = name.split("::")
    inputs = cases[name]
    assert any(isinstance(x, torch.Tensor) and not x.is_contiguous() for x in inputs), "strided inputs"
    torch.library.opcheck(getattr(getattr(torch.ops, namespace), op).default, inputs, test_utils=CHECKS)


def test_the_fake_reduce_scatter_returns_what_the_op_returns(tmp_path):
    """A one-rank gloo group (the op needs a process group)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1,
                            timeout=timedelta(seconds=30))
    try:
        full = torch.randn(3, 6, 4).transpose(1, 2)
        torch.library.opcheck(torch.ops.attention.reduce_scatter_rows.default, (full, [0], 30.0), test_utils=CHECKS)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("impl, settings", [
    (DILATED, {"segment_lengths": [4, 8], "dilation_rates": [1, 2]}),
    (SPARSE, {"kind": "bigbird", "block_size": 4, "num_random_blocks": 1, "attention": "unidirectional"}),
])
def test_the_training_ops_return_what_their_fakes_say_without_padding(cases, impl, settings):
    """The unpadded call hands the kernels' own outputs on (the sparse lse transposed from (b, h, q))."""
    key = traced_module_key(impl, frozen(settings), None, 0.0, (H, H_KV, D, D_V), True)
    g = torch.Generator().manual_seed(3)
    q, k, v = hf_views(g)
    torch.library.opcheck(torch.ops.attention.hf_attend_lse.default, (q, k, v, None, key, True), test_utils=CHECKS)
    out, lse = torch.ops.attention.hf_attend_lse(q, k, v, None, key, True)
    grad = torch.randn(B, H, N, D_V, generator=g).transpose(1, 2)
    torch.library.opcheck(torch.ops.attention.hf_attend_backward.default,
                          (grad, q, k, v, out, lse, None, key, True), test_utils=CHECKS)


def ops_taking_sinks() -> list[str]:
    return sorted(name for name in registered_ops() if "sinks" in schema_names(name))


def schema_names(name: str) -> list[str]:
    namespace, op = name.split("::")
    return [argument.name for argument in getattr(getattr(torch.ops, namespace), op).default._schema.arguments]


@pytest.mark.parametrize("with_sinks", [False, True], ids=["no-sinks", "sinks"])
@pytest.mark.parametrize("name", ops_taking_sinks())
def test_an_op_that_takes_sinks_returns_what_its_fake_says_with_and_without_them(cases, name, with_sinks):
    """Each op with a ``sinks`` argument, on its case's inputs, given one logit per query head or None."""
    namespace, op = name.split("::")
    overload = getattr(getattr(torch.ops, namespace), op).default
    inputs, arguments = cases[name], overload._schema.arguments
    where = schema_names(name).index("sinks")
    sinks = torch.randn(H, generator=torch.Generator().manual_seed(7)) if with_sinks else None
    inputs = (*inputs[:where], *(argument.default_value for argument in arguments[len(inputs):where]), sinks,
              *inputs[where + 1:])
    torch.library.opcheck(overload, inputs, test_utils=CHECKS)


SINKS_SETTINGS = {
    DILATED: {"segment_lengths": [4, 8], "dilation_rates": [1, 2]},
    SPARSE: {"kind": "bigbird", "block_size": 4, "num_random_blocks": 1, "attention": "unidirectional"},
}


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("impl", [DILATED, SPARSE])
def test_the_training_ops_return_what_their_fakes_say_with_sinks(cases, impl, padded):
    """The training op with sinks, padded or not (the unpadded call merges them into the kernels' own
    outputs), and its backward fed the final out and lse it gives."""
    key = traced_module_key(impl, frozen(SINKS_SETTINGS[impl]), None, 0.0, (H, H_KV, D, D_V), True)
    g = torch.Generator().manual_seed(6)
    q, k, v = hf_views(g)
    sinks = torch.randn(H, generator=g)
    mask = None
    if padded:
        mask = torch.ones(B, N, dtype=torch.long)
        mask[1, :4] = 0  # left padding
    torch.library.opcheck(torch.ops.attention.hf_attend_lse.default, (q, k, v, mask, key, True, sinks),
                          test_utils=CHECKS)
    out, lse = torch.ops.attention.hf_attend_lse(q, k, v, mask, key, True, sinks)
    grad = torch.randn(B, H, N, D_V, generator=g).transpose(1, 2)
    torch.library.opcheck(torch.ops.attention.hf_attend_backward.default,
                          (grad, q, k, v, out, lse, mask, key, True), test_utils=CHECKS)
