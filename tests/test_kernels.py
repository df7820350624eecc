"""attention.kernels against float64 dense references: the dispatch table
(every branch), every CUDA branch on meta tensors (shapes, dtypes, lse exactly
(B, H, M)) and numerically with CPU emulations of the fused CUDA ops'
conventions substituted (lse padding, (B, H, M, 1) lse, top-left causal,
no GQA, unit-stride rows), every stride pattern, bottom-right causal, GQA,
rows with no key, the merge and the one validation of each concept."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attention.kernels as kernels
from cuda_emulation import emulated_cuda_ops, recording
from attention.kernels import (
    EMPTY_LSE,
    attend,
    attend_backward,
    check_attention_inputs,
    check_dropout,
    check_is_causal,
    check_softmax_scale,
    choose_kernel,
    merge_,
)

CUDA_KERNELS = ("cuda_flash", "cuda_cudnn", "cuda_efficient", "cuda_efficient_float32")


# ------------------------------------------------------------ reference
def dense(q, k, v, causal, scale, key_mask=None):
    """float64 softmax attention, (B, H, M, d) over (B, H_kv, N, d),
    bottom-right causal, rows with no key: out 0 and lse EMPTY_LSE."""
    q, k, v = (x.double() for x in (q, k, v))
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
    s = q @ k.transpose(-1, -2) * scale
    m, n = q.shape[2], k.shape[2]
    if causal:
        s = s.masked_fill(~torch.ones(m, n, dtype=torch.bool).tril(n - m), -math.inf)
    if key_mask is not None:
        s = s.masked_fill(key_mask[:, None, None, :], -math.inf)
    live = (s > -math.inf).any(-1, keepdim=True)
    p = torch.where(live, torch.softmax(s.masked_fill(~live, 0.0), -1), 0.0)
    lse = torch.where(live.squeeze(-1), torch.logsumexp(s.masked_fill(~live, 0.0), -1), EMPTY_LSE)
    return p @ v, lse


def make(b, h, m, d, dtype=torch.float64, seed=0):
    return torch.randn(b, h, m, d, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def check_against_dense(q, k, v, causal, key_mask=None, tol=1e-10, backend=None):
    scale = 0.37
    with torch.no_grad():
        out, lse = attend(q, k, v, causal=causal, scale=scale, key_mask=key_mask, backend=backend)
    assert lse.shape == q.shape[:3] and lse.dtype == kernels.lse_dtype(q.dtype)
    assert out.shape == q.shape
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = dense(qd, kd, vd, causal, scale, key_mask)
    torch.testing.assert_close(out.double(), ref_out.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), ref_lse.detach(), rtol=tol, atol=tol)
    grad_out = make(*out.shape, seed=7).to(q.dtype)
    grads = attend_backward(grad_out, q, k, v, out.to(q.dtype), lse, causal=causal, scale=scale,
                            key_mask=key_mask, backend=backend)
    expected = torch.autograd.grad(ref_out, (qd, kd, vd), grad_out.double())
    for got, want, x in zip(grads, expected, (q, k, v)):
        assert got.shape == x.shape
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


# ------------------------------------------------------------ dispatch
@pytest.mark.parametrize(
    "device_type, dtype, head_dim, has_mask, kernel",
    [
        ("cpu", torch.float64, 64, False, "cpu_flash"),
        ("cpu", torch.float32, 64, True, "cpu_flash"),
        ("cpu", torch.bfloat16, 512, False, "cpu_flash"),
        ("cpu", torch.float16, 3, True, "cpu_flash"),
        ("cuda", torch.bfloat16, 64, False, "cuda_cudnn"),
        ("cuda", torch.float16, 128, False, "cuda_cudnn"),
        ("cuda", torch.bfloat16, 192, False, "cuda_flash"),
        ("cuda", torch.float16, 256, False, "cuda_flash"),
        ("cuda", torch.bfloat16, 320, False, "cuda_efficient_float32"),
        ("cuda", torch.bfloat16, 64, True, "cuda_efficient_float32"),
        ("cuda", torch.float16, 128, True, "cuda_efficient_float32"),
        ("cuda", torch.float32, 64, False, "cuda_efficient"),
        ("cuda", torch.float32, 64, True, "cuda_efficient"),
        ("cuda", torch.float64, 64, False, "matmul"),
        ("cuda", torch.bfloat16, 60, False, "matmul"),
        ("cuda", torch.float32, 12, True, "matmul"),
        ("mps", torch.float32, 64, False, "matmul"),
        ("meta", torch.float32, 64, False, "matmul"),
    ],
)
def test_choose_kernel_table(device_type, dtype, head_dim, has_mask, kernel):
    assert choose_kernel(device_type, dtype, head_dim, has_mask) == kernel


def test_cuda_half_kernel_is_a_table_entry():
    assert "cuda_cudnn" in CUDA_KERNELS
    assert {name for name, kernel in kernels.KERNELS.items() if kernel.takes_mask} == {"cpu_flash", "cuda_efficient", "cuda_efficient_float32", "flex", "matmul"}
    assert kernels.CUDNN_MAX_HEAD_DIM <= kernels.FLASH_MAX_HEAD_DIM
    assert not kernels.KERNELS["cuda_efficient"].native_gqa  # it refuses fewer k/v heads (H100, torch 2.11)


# One case per CUDA kernel branch: (dtype, head_dim, masked) that selects it.
CUDA_BRANCHES = {
    "cuda_cudnn": (torch.bfloat16, 64, False),
    "cuda_flash": (torch.float16, 192, False),
    "cuda_efficient": (torch.float32, 64, True),
    "cuda_efficient_float32": (torch.bfloat16, 64, True),
}


@pytest.mark.parametrize("expected", sorted(CUDA_BRANCHES))
@pytest.mark.parametrize("m, n, h_kv, causal", [(40, 40, 4, True), (13, 77, 2, True), (1, 50, 1, True), (33, 33, 2, False)])
def test_every_cuda_branch_runs_on_meta_tensors(monkeypatch, expected, m, n, h_kv, causal):
    """The CUDA control flow with the real fused ops' meta kernels: the
    chosen kernel, unit-stride rows, key/value heads as the kernel takes
    them, lse exactly (B, H, M) float32, gradients of the inputs' shapes."""
    dtype, d, masked = CUDA_BRANCHES[expected]
    calls = recording(monkeypatch)

    def strided(h, rows):  # last dim not contiguous: the layer must copy it
        return torch.empty(2, rows, h, 2 * d, dtype=dtype, device="meta")[..., ::2].transpose(1, 2)

    q, k, v = strided(4, m), strided(h_kv, n), strided(h_kv, n)
    mask = torch.zeros(2, n, dtype=torch.bool, device="meta") if masked else None
    out, lse = attend(q, k, v, causal=causal, scale=0.1, key_mask=mask, backend="cuda")
    assert out.shape == (2, 4, m, d) and out.device.type == "meta"
    assert lse.shape == (2, 4, m) and lse.dtype == torch.float32
    grads = attend_backward(out.to(dtype), q, k, v, out.to(dtype), lse, causal=causal, scale=0.1, key_mask=mask, backend="cuda")
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert {name for name, *_ in calls} == {expected}
    native = kernels.KERNELS[expected].native_gqa
    for _, _, cq, ck, cv in calls:
        assert all(x.stride(-1) == 1 for x in (cq, ck, cv))
        assert cq.shape[1] == (4 if native else h_kv) and ck.shape[1] == h_kv
    split = causal and 1 < m < n  # bottom-right causal: a non-causal prefix part and a square causal part
    assert len(calls) == 2 * (2 if split else 1) * (1 if native else 4 // h_kv)


# Masks only where the table can choose the kernel with one (test_choose_kernel_table).
KERNEL_MASK_CASES = [(name, False) for name in CUDA_KERNELS + ("matmul",)] + [
    ("cuda_efficient", True), ("cuda_efficient_float32", True), ("matmul", True)
]


@pytest.mark.parametrize("kernel, masked", KERNEL_MASK_CASES)
@pytest.mark.parametrize("m, n, h_kv", [(9, 9, 4), (5, 37, 2), (1, 20, 1), (40, 70, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_control_flow_with_cpu_kernels_substituted(monkeypatch, kernel, masked, m, n, h_kv, causal):
    """The CUDA branches' code (lse slicing and padding, GQA calls, causal
    split, dead rows) run numerically: CPU emulations of the ops behind it."""
    monkeypatch.setattr(kernels, "_ops", emulated_cuda_ops())
    monkeypatch.setattr(kernels, "choose_kernel", lambda *args: kernel)
    q = make(2, 4, 2 * m, 8, seed=1)[:, :, ::2]  # strided rows
    k, v = make(2, h_kv, n, 8, seed=2), make(2, h_kv, n, 8, seed=3)
    mask = None
    if masked:
        mask = torch.rand(2, n, generator=torch.Generator().manual_seed(4)) < 0.3
        mask[1, : n - m + 1] = True  # causal: row 0 of batch 1 sees only padding
    check_against_dense(q, k, v, causal, mask, backend="cuda")


# ------------------------------------------------------------ CPU numerics
def layouts(b, h, m, d, seed):
    """The same (b, h, m, d) values in every stride pattern: contiguous, the
    (b, m, h, d) transpose SDPA users make, every dim strided (head_dim
    included), head_dim-major, a permuted (b, d, m, h) activation, and an
    expanded (stride 0) batch."""
    x = make(b, h, m, d, seed=seed)
    wide = torch.zeros(2 * b, 2 * h, 2 * m, 2 * d, dtype=x.dtype)
    wide[::2, ::2, ::2, ::2] = x
    yield "contiguous", x
    yield "bmhd", x.transpose(1, 2).contiguous().transpose(1, 2)
    yield "every-dim-strided", wide[::2, ::2, ::2, ::2]
    yield "head-dim-strided", torch.stack([x, x], -1)[..., 0]
    yield "dmh", x.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)
    yield "permuted-bdnh", x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    yield "expanded-batch", x[:1].expand(b, h, m, d)


@pytest.mark.parametrize("kernel", ["cpu_flash", "matmul"])
@pytest.mark.parametrize("layout", [name for name, _ in layouts(1, 1, 1, 1, 0)])
def test_every_stride_pattern(monkeypatch, kernel, layout):
    monkeypatch.setattr(kernels, "choose_kernel", lambda *args: kernel)
    q = dict(layouts(2, 4, 6, 8, 1))[layout]
    k = dict(layouts(2, 2, 11, 8, 2))[layout]
    v = dict(layouts(2, 2, 11, 8, 3))[layout]
    for causal in (False, True):
        check_against_dense(q, k, v, causal)


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 2), h_kv=st.integers(1, 3), group=st.integers(1, 3), m=st.integers(1, 20),
    extra=st.integers(0, 30), d=st.sampled_from([1, 4, 8]), causal=st.booleans(), masked=st.booleans(),
    kernel=st.sampled_from(["cpu_flash", "matmul"]),
)
def test_attend_equals_dense_property(b, h_kv, group, m, extra, d, causal, masked, kernel):
    """Any M <= N (bottom-right causal), GQA ratio, head_dim, mask: out, lse and gradients."""
    n = m + extra
    q, k, v = make(b, h_kv * group, m, d, seed=m), make(b, h_kv, n, d, seed=n), make(b, h_kv, n, d, seed=n + 1)
    mask = (torch.rand(b, n, generator=torch.Generator().manual_seed(extra)) < 0.3) if masked else None
    original = kernels.choose_kernel
    kernels.choose_kernel = lambda *args: kernel
    try:
        check_against_dense(q, k, v, causal, mask)
    finally:
        kernels.choose_kernel = original


def test_cpu_flash_takes_fewer_key_value_heads_natively(monkeypatch):
    """No repeated keys on the CPU: the kernel gets h_kv heads (its result is checked above)."""
    calls = recording(monkeypatch)
    q, k, v = make(1, 6, 5, 8), make(1, 2, 9, 8, seed=1), make(1, 2, 9, 8, seed=2)
    attend(q, k, v, causal=False, scale=0.3)
    ((name, _, cq, ck, _),) = calls
    assert name == "cpu_flash" and cq.shape[1] == 6 and ck.shape[1] == 2


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_lower_precision_on_cpu(dtype, tol):
    q, k, v = (make(2, 4, 16, 8, seed=s).to(dtype) for s in range(3))
    with torch.no_grad():
        out, lse = attend(q, k, v, causal=True, scale=0.3)
    assert lse.dtype == torch.float32
    ref, ref_lse = dense(q, k, v, True, 0.3)
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=tol, atol=tol)


@pytest.mark.parametrize("kernel", ["cpu_flash", "matmul"])
def test_rows_with_no_key_are_zero_with_the_empty_lse(monkeypatch, kernel):
    monkeypatch.setattr(kernels, "choose_kernel", lambda *args: kernel)
    q, k, v = make(2, 2, 4, 8), make(2, 2, 6, 8, seed=1), make(2, 2, 6, 8, seed=2)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0] = True          # batch 0: no key at all
    mask[1, :4] = True      # batch 1, causal: query 0 (position 2) sees keys 0..2, all padded
    for causal in (False, True):
        with torch.no_grad():
            out, lse = attend(q, k, v, causal=causal, scale=0.3, key_mask=mask)
        assert (out[0] == 0).all() and (lse[0] == EMPTY_LSE).all()
        if causal:
            assert (out[1, :, :2] == 0).all() and (lse[1, :, :2] == EMPTY_LSE).all()
        assert torch.isfinite(lse).all()
        check_against_dense(q, k, v, causal, mask)


def test_a_nan_in_a_future_key_leaves_earlier_queries_finite():
    """The score of a future key is masked before the exponential. (A NaN in
    a future VALUE propagates, in the fused kernels as in SDPA: see the
    module docstring.)"""
    q, k, v = make(1, 2, 40, 8), make(1, 2, 40, 8, seed=1), make(1, 2, 40, 8, seed=2)
    k[:, :, 30] = math.nan
    with torch.no_grad():
        out, lse = attend(q, k, v, causal=True, scale=0.3)
    assert torch.isfinite(out[:, :, :30]).all() and torch.isfinite(lse[:, :, :30]).all()
    assert out[:, :, 30:].isnan().all()


@pytest.mark.parametrize("kernel", ["cpu_flash", "matmul"])
def test_scale_none_is_one_over_sqrt_head_dim(monkeypatch, kernel):
    """``scale=None`` in attend and attend_backward means 1/sqrt(d), as in SDPA."""
    monkeypatch.setattr(kernels, "choose_kernel", lambda *args: kernel)
    q, k, v = make(2, 4, 9, 16, seed=1), make(2, 2, 9, 16, seed=2), make(2, 2, 9, 16, seed=3)
    out, lse = attend(q, k, v, causal=True, scale=None)
    want_out, want_lse = attend(q, k, v, causal=True, scale=0.25)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
    grad_out = make(2, 4, 9, 16, seed=4)
    got = attend_backward(grad_out, q, k, v, out, lse, causal=True, scale=None)
    want = attend_backward(grad_out, q, k, v, out, lse, causal=True, scale=0.25)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------ merge
def test_merge_of_two_key_halves_is_attention_over_all_keys():
    q, k, v = make(2, 3, 7, 8), make(2, 3, 20, 8, seed=1), make(2, 3, 20, 8, seed=2)
    with torch.no_grad():
        out, lse = attend(q, k[:, :, :9], v[:, :, :9], causal=False, scale=0.3)
        o, l = attend(q, k[:, :, 9:], v[:, :, 9:], causal=False, scale=0.3)
    merge_(out, lse, o, l)
    ref, ref_lse = dense(q, k, v, False, 0.3)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)


def test_merge_with_empty_parts_stays_finite():
    out, lse = torch.zeros(1, 1, 2, 3), torch.full((1, 1, 2), EMPTY_LSE)
    o, l = torch.ones(1, 1, 2, 3), torch.tensor([[[EMPTY_LSE, 0.5]]])
    o[0, 0, 0] = 0  # an empty row's part is 0 (the contract of attend)
    merge_(out, lse, o, l)
    assert torch.equal(out[0, 0, 0], torch.zeros(3)) and torch.equal(out[0, 0, 1], torch.ones(3))
    assert lse[0, 0, 0] == EMPTY_LSE and lse[0, 0, 1] == pytest.approx(0.5)


# ------------------------------------------------------------ validation
@pytest.mark.parametrize("value", [None, 0.5, 2, 1e-3])
def test_softmax_scale_accepts(value):
    assert check_softmax_scale(value) == (None if value is None else float(value))


@pytest.mark.parametrize("value", [0, -1.0, math.inf, math.nan, True, "0.5", [1.0]])
def test_softmax_scale_refuses(value):
    with pytest.raises(ValueError, match=r"softmax_scale must be None or a finite number > 0"):
        check_softmax_scale(value)


@pytest.mark.parametrize("value", [1.0, -0.1, math.nan, False, "0.1", None])
def test_dropout_refuses(value):
    with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\)"):
        check_dropout(value)


def test_dropout_and_is_causal_accept():
    assert check_dropout(0) == 0.0 and check_dropout(0.5) == 0.5
    assert check_is_causal(True) is True and check_is_causal(False) is False


@pytest.mark.parametrize("value", ["yes", 1, 0, None, torch.tensor(True)])
def test_is_causal_refuses(value):
    with pytest.raises(ValueError, match="is_causal must be True or False"):
        check_is_causal(value)


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((1, 8, 4, 2), (1, 9, 2, 2), (1, 9, 2, 2)), None),          # GQA and q_len < kv_len are fine
        (((1, 10, 4, 2), (1, 9, 2, 2), (1, 9, 2, 2)), "q_len must be <= kv_len"),
        (((1, 8, 3, 2), (1, 9, 2, 2), (1, 9, 2, 2)), "multiple of the key/value heads"),
        (((1, 8, 4, 2), (1, 9, 2, 2), (1, 9, 1, 2)), "k and v must have one shape"),
        (((2, 8, 4, 2), (1, 9, 2, 2), (1, 9, 2, 2)), "same batch and head_dim"),
        (((1, 8, 4), (1, 9, 2, 2), (1, 9, 2, 2)), "q must have shape"),
    ],
)
def test_check_attention_inputs(shapes, message):
    q, k, v = (torch.zeros(s) for s in shapes)
    if message is None:
        check_attention_inputs(q, k, v, torch.zeros(1, 9, dtype=torch.bool))
    else:
        with pytest.raises(ValueError, match=message):
            check_attention_inputs(q, k, v)


def test_key_padding_mask_is_over_the_keys():
    q, k = torch.zeros(2, 3, 2, 4), torch.zeros(2, 7, 2, 4)
    with pytest.raises(ValueError, match=r"\(batch, kv_len\) = \(2, 7\)"):
        check_attention_inputs(q, k, k, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool tensor"):
        check_attention_inputs(q, k, k, torch.zeros(2, 7))
