"""attention.kernels against the float64 dense reference
(attention/dense_reference.py::dense_attention): the capability table and its
dispatch (every branch, preferences, value head_dims, masks, dropout), every
CUDA branch on meta tensors (shapes, dtypes, lse exactly (B, H, M)) and
numerically with CPU emulations of the fused CUDA ops' conventions
substituted (lse padding, (B, H, M, 1) lse, top-left causal, no GQA,
unit-stride rows), every stride pattern, bottom-right causal, GQA, key and
structural masks (NaN and Inf in masked keys and values), dropout keep
masks, rows with no key, the FlexAttention entry (compiled forward on the
CPU; its backward's wiring with an explicit part), the merge and the one
validation of each concept."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attention.kernels.attend as kernels
from attention.kernels.flex import flex_attend, flex_attend_backward
from attention.kernels.softmax_parts import EMPTY_LSE, lse_dtype, merge_
from attention.kernels.attend import KERNELS, PREFERENCES, attend, attend_backward, choose_kernel
from attention.checks import check_attention_inputs, check_dropout, check_is_causal, check_softmax_scale
from cuda_emulation import emulated_cuda_ops, recording
from attention.dense_reference import dense_attention

CUDA_KERNELS = ("cuda_flash", "cuda_cudnn", "cuda_efficient", "cuda_efficient_float32")
CPU_KERNELS = ("cpu_flash", "matmul")


# ------------------------------------------------------------ reference
def allowed_weight(allowed, n):
    """(B, H, M, N) bool -> dense_attention's weight over all N positions (the M queries are the last)."""
    b, h, m, _ = allowed.shape
    weight = torch.ones(b, h, n, n, dtype=torch.bool)
    weight[:, :, n - m:] = allowed
    return weight


def reference(q, k, v, causal, scale, key_mask=None, mask=None, with_lse=True):
    """dense_attention in the layer's (B, H, M, d) layout; empty rows' lse as EMPTY_LSE."""
    b, h, m, _ = q.shape
    n = k.shape[2]
    weight = None if mask is None else allowed_weight(~mask.expand(b, h, m, n), n)
    out, lse = dense_attention(*(x.transpose(1, 2) for x in (q, k, v)), weight=weight, is_causal=causal,
                               key_padding_mask=key_mask, scale=scale, return_lse=True)
    return out.transpose(1, 2), lse.masked_fill(torch.isneginf(lse), EMPTY_LSE)


def make(b, h, m, d, dtype=torch.float64, seed=0):
    return torch.randn(b, h, m, d, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def without_masked_keys(k, v, key_mask):
    """The same function's inputs with masked keys' rows set to 0: the
    reference does not depend on them, but its autograd would meet their NaN."""
    if key_mask is None:
        return k, v
    rows = key_mask[:, None, :, None]
    return k.masked_fill(rows, 0.0), v.masked_fill(rows, 0.0)


def check_against_dense(q, k, v, causal, key_mask=None, tol=1e-10, backend=None, mask=None, backward=True):
    scale = 0.37
    with torch.no_grad():
        out, lse = attend(q, k, v, causal=causal, scale=scale, key_mask=key_mask, mask=mask, backend=backend)
    assert lse.shape == q.shape[:3] and lse.dtype == lse_dtype(q.dtype)
    assert out.shape == (*q.shape[:3], v.shape[-1])
    ref_out, ref_lse = reference(q, k, v, causal, scale, key_mask, mask)
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=tol, atol=tol)
    if not backward:
        return
    clean_k, clean_v = without_masked_keys(k, v, key_mask)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, clean_k, clean_v))
    grad_out = make(*out.shape, seed=7).to(q.dtype)
    grads = attend_backward(grad_out, q, k, v, out.to(q.dtype), lse, causal=causal, scale=scale,
                            key_mask=key_mask, mask=mask, backend=backend)
    expected = torch.autograd.grad(reference(qd, kd, vd, causal, scale, key_mask, mask)[0], (qd, kd, vd),
                                   grad_out.double())
    for got, want, x in zip(grads, expected, (q, k, v)):
        assert got.shape == x.shape
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def force(monkeypatch, kernel):
    """Every choice is ``kernel`` (the CUDA entries on CPU emulations, whatever the dtype)."""
    monkeypatch.setattr(kernels, "choose_kernel", lambda *args: kernel)


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
    assert KERNELS[kernel].takes(device_type, dtype, head_dim, head_dim, has_mask, False, False, True)


@pytest.mark.parametrize(
    "args, kernel",
    [
        # MLA (DeepSeek: qk 192, v 128): only the efficient kernel among the fused ones takes d_v != d.
        (("cuda", torch.bfloat16, 192, False, 128), "cuda_efficient_float32"),
        (("cuda", torch.float32, 192, True, 128), "cuda_efficient"),
        (("cuda", torch.bfloat16, 64, False, 60), "matmul"),  # d_v not a multiple of 8
        (("cpu", torch.float32, 192, False, 128), "matmul"),  # CPU flash needs one head size
        # A structural mask: the CPU flash kernel (it adds it; see the NaN tests), matmul on CUDA.
        (("cpu", torch.float32, 64, False, None, True), "cpu_flash"),
        (("cuda", torch.bfloat16, 64, True, None, True), "matmul"),
        # A dropout keep mask: matmul only.
        (("cpu", torch.float32, 64, False, None, False, True), "matmul"),
        (("cuda", torch.bfloat16, 64, False, None, False, True), "matmul"),
    ],
)
def test_choose_kernel_reads_the_capabilities(args, kernel):
    assert choose_kernel(*args) == kernel


def test_a_preferred_kernel_is_chosen_where_it_takes_the_call():
    """The public override of the device order (what benchmarks use instead of a module global)."""
    assert choose_kernel("cuda", torch.bfloat16, 64, False, prefer="cuda_flash") == "cuda_flash"
    assert choose_kernel("cuda", torch.bfloat16, 64, True, prefer="cuda_flash") == "cuda_efficient_float32"
    assert choose_kernel("cuda", torch.bfloat16, 64, False, prefer="matmul") == "matmul"
    assert choose_kernel("cpu", torch.float32, 32, True, 16, prefer="flex") == "flex"
    # No flex backward on the CPU: the backward falls back to the device's order.
    assert choose_kernel("cpu", torch.float32, 32, True, 16, backward=True, prefer="flex") == "matmul"
    assert choose_kernel("cpu", torch.float32, 16, True, backward=True, prefer="flex") == "cpu_flash"
    assert choose_kernel("cuda", torch.bfloat16, 8, False, prefer="flex") == "cuda_cudnn"  # flex: head_dim >= 16
    with pytest.raises(ValueError, match="prefer must be None or one of"):
        choose_kernel("cuda", torch.bfloat16, 64, False, prefer="cudnn")


def test_the_table_is_consistent():
    for device_type, order in PREFERENCES.items():
        assert order[0] == "cpu_flash" if device_type == "cpu" else order[0] == "cuda_cudnn"
        assert all(device_type in KERNELS[name].devices for name in order)
    assert "flex" not in sum(PREFERENCES.values(), ())  # it compiles on first use: chosen only by name
    matmul = KERNELS["matmul"]
    assert matmul.devices == matmul.backward_devices == ("*",) and matmul.dtypes == ()  # every walk ends there
    assert all((matmul.takes_mask, matmul.takes_structural_mask, matmul.fills_mask, matmul.value_head_dim,
                matmul.dropout, matmul.bottom_right_causal))
    assert {name for name, kernel in KERNELS.items() if kernel.takes_mask} == {
        "cpu_flash", "cuda_efficient", "cuda_efficient_float32", "flex", "matmul"}
    assert {name for name, kernel in KERNELS.items() if kernel.value_head_dim} == {
        "cuda_efficient", "cuda_efficient_float32", "flex", "matmul"}
    assert {name for name, kernel in KERNELS.items() if kernel.dropout} == {"matmul"}
    assert kernels.CUDNN_MAX_HEAD_DIM <= kernels.FLASH_MAX_HEAD_DIM
    assert not KERNELS["cuda_efficient"].native_gqa  # it refuses fewer k/v heads (H100, torch 2.11)


@pytest.mark.parametrize("backend", ["cuda_flsh", "gpu0", 3])
def test_an_unknown_backend_is_refused(backend):
    q = make(1, 2, 4, 8)
    with pytest.raises(ValueError, match="backend must be None, a device type or one of"):
        attend(q, q, q, causal=False, scale=None, backend=backend)


def test_a_kernel_name_for_another_device_is_refused():
    q = make(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"backend 'cuda_flash' runs on \('cuda',\) tensors; q is on cpu"):
        attend(q, q, q, causal=False, scale=None, backend="cuda_flash")


def test_a_kernel_is_picked_by_name_through_attend(monkeypatch):
    calls = recording(monkeypatch)
    q = torch.empty(1, 4, 16, 64, dtype=torch.bfloat16, device="meta")
    attend(q, q, q, causal=True, scale=None, backend="cuda_flash")
    assert {name for name, *_ in calls} == {"cuda_flash"}
    calls.clear()
    attend(q, q, q, causal=True, scale=None, backend="cuda")
    assert {name for name, *_ in calls} == {"cuda_cudnn"}
    calls.clear()
    mask = torch.zeros(1, 16, dtype=torch.bool, device="meta")
    attend(q, q, q, causal=True, scale=None, key_mask=mask, backend="cuda_flash")  # flash takes no mask
    assert {name for name, *_ in calls} == {"cuda_efficient_float32"}


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
    native = KERNELS[expected].native_gqa
    for _, _, cq, ck, cv in calls:
        assert all(x.stride(-1) == 1 for x in (cq, ck, cv))
        assert cq.shape[1] == (4 if native else h_kv) and ck.shape[1] == h_kv
    split = causal and 1 < m < n  # bottom-right causal: a non-causal prefix part and a square causal part
    assert len(calls) == 2 * (2 if split else 1) * (1 if native else 4 // h_kv)


@pytest.mark.parametrize("dtype, masked, expected", [(torch.bfloat16, False, "cuda_efficient_float32"),
                                                     (torch.float32, True, "cuda_efficient")])
def test_a_value_head_dim_of_its_own_on_meta_tensors(monkeypatch, dtype, masked, expected):
    """DeepSeek's MLA shapes (qk 192, v 128) through the CUDA branch that takes them."""
    calls = recording(monkeypatch)
    q = torch.empty(2, 8, 13, 192, dtype=dtype, device="meta")
    k = torch.empty(2, 4, 40, 192, dtype=dtype, device="meta")
    v = torch.empty(2, 4, 40, 128, dtype=dtype, device="meta")
    mask = torch.zeros(2, 40, dtype=torch.bool, device="meta") if masked else None
    out, lse = attend(q, k, v, causal=True, scale=None, key_mask=mask, backend="cuda")
    assert out.shape == (2, 8, 13, 128) and out.dtype in (dtype, torch.float32) and lse.shape == (2, 8, 13)
    grads = attend_backward(out.to(dtype), q, k, v, out.to(dtype), lse, causal=True, scale=None, key_mask=mask,
                            backend="cuda")
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert {name for name, *_ in calls} == {expected}


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
    force(monkeypatch, kernel)
    q = make(2, 4, 2 * m, 8, seed=1)[:, :, ::2]  # strided rows
    k, v = make(2, h_kv, n, 8, seed=2), make(2, h_kv, n, 8, seed=3)
    mask = None
    if masked:
        mask = torch.rand(2, n, generator=torch.Generator().manual_seed(4)) < 0.3
        mask[1, : n - m + 1] = True  # causal: row 0 of batch 1 sees only padding
    check_against_dense(q, k, v, causal, mask, backend="cuda")


def poisoned(b, h, h_kv, m, n, d, d_v, key_mask, seed=0):
    """q, k, v with NaN and Inf in every masked key's k and v rows."""
    q, k, v = make(b, h, m, d, seed=seed), make(b, h_kv, n, d, seed=seed + 1), make(b, h_kv, n, d_v, seed=seed + 2)
    rows = key_mask[:, None, :, None]
    k = k.masked_fill(rows, math.nan)
    v = v.masked_fill(rows, math.inf)
    k[:, :, :, 0] = torch.where(key_mask[:, None], -math.inf, k[:, :, :, 0])
    return q, k, v


def test_a_nan_in_a_padded_key_on_every_cpu_kernel():
    """q, k, v (1, 16, 2, 8) in (batch, seq, heads, dim), the last 3 keys
    padded, k[:, -1] = NaN: the output is the unpadded keys' attention."""
    x = torch.randn(3, 1, 16, 2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    q, k, v = (t.transpose(1, 2) for t in x)
    k = k.clone()
    k[:, :, -1] = math.nan
    pad = torch.zeros(1, 16, dtype=torch.bool)
    pad[:, -3:] = True
    for kernel in CPU_KERNELS:
        for causal in (False, True):
            check_against_dense(q, k, v, causal, pad, backend=kernel)


@pytest.mark.parametrize("kernel", CPU_KERNELS + ("cuda_efficient", "cuda_efficient_float32"))
@pytest.mark.parametrize("m, n, h_kv, d_v", [(6, 6, 2, 8), (5, 29, 1, 8), (7, 31, 2, 16)])
@pytest.mark.parametrize("causal", [False, True])
def test_nan_and_inf_in_masked_keys_and_values_change_nothing(monkeypatch, kernel, m, n, h_kv, d_v, causal):
    """Every kernel that takes a key mask (the CUDA ones on CPU emulations),
    forward and backward: outputs and gradients equal the reference, which
    removes the masked keys; their gradients are 0."""
    if kernel.startswith("cuda"):
        monkeypatch.setattr(kernels, "_ops", emulated_cuda_ops())
        force(monkeypatch, kernel)
    key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(n)) < 0.4
    key_mask[0, -1] = key_mask[1, 0] = True
    key_mask[1, n - m + 1:] = False  # batch 1: a live key for every causal row but row 0's (it may have none)
    q, k, v = poisoned(2, 4, h_kv, m, n, 8, d_v, key_mask)
    check_against_dense(q, k, v, causal, key_mask, backend=None if kernel.startswith("cuda") else kernel)


@pytest.mark.parametrize("kernel", ["cuda_efficient", "cuda_efficient_float32", "matmul"])
def test_cuda_value_head_dim_with_cpu_kernels_substituted(monkeypatch, kernel):
    monkeypatch.setattr(kernels, "_ops", emulated_cuda_ops())
    force(monkeypatch, kernel)
    key_mask = torch.rand(2, 30, generator=torch.Generator().manual_seed(3)) < 0.3
    for d, d_v in ((16, 8), (8, 24)):
        q, k, v = make(2, 4, 11, d, seed=1), make(2, 2, 30, d, seed=2), make(2, 2, 30, d_v, seed=3)
        for causal in (False, True):
            check_against_dense(q, k, v, causal, key_mask, backend="cuda")


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


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("layout", [name for name, _ in layouts(1, 1, 1, 1, 0)])
def test_every_stride_pattern(kernel, layout):
    q = dict(layouts(2, 4, 6, 8, 1))[layout]
    k = dict(layouts(2, 2, 11, 8, 2))[layout]
    v = dict(layouts(2, 2, 11, 8, 3))[layout]
    for causal in (False, True):
        check_against_dense(q, k, v, causal, backend=kernel)


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 2), h_kv=st.integers(1, 3), group=st.integers(1, 3), m=st.integers(1, 20),
    extra=st.integers(0, 30), d=st.sampled_from([1, 4, 8]), d_v=st.sampled_from([None, 3, 8]),
    causal=st.booleans(), masked=st.booleans(), structural=st.sampled_from([None, "heads", "batch"]),
    kernel=st.sampled_from(CPU_KERNELS),
)
def test_attend_equals_dense_property(b, h_kv, group, m, extra, d, d_v, causal, masked, structural, kernel):
    """Any M <= N (bottom-right causal), GQA ratio, head_dim and value
    head_dim, key mask and structural mask (per head or per batch row): out,
    lse and gradients."""
    n, h = m + extra, h_kv * group
    q, k = make(b, h, m, d, seed=m), make(b, h_kv, n, d, seed=n)
    v = make(b, h_kv, n, d if d_v is None else d_v, seed=n + 1)
    generator = torch.Generator().manual_seed(extra)
    key_mask = (torch.rand(b, n, generator=generator) < 0.3) if masked else None
    mask = None
    if structural is not None:
        shape = (1, h, m, n) if structural == "heads" else (b, 1, m, n)
        mask = torch.rand(shape, generator=generator) < 0.3
    check_against_dense(q, k, v, causal, key_mask, backend=kernel, mask=mask)


def test_cpu_flash_takes_fewer_key_value_heads_natively(monkeypatch):
    """No repeated keys on the CPU: the kernel gets h_kv heads (its result is checked above)."""
    calls = recording(monkeypatch)
    q, k, v = make(1, 6, 5, 8), make(1, 2, 9, 8, seed=1), make(1, 2, 9, 8, seed=2)
    attend(q, k, v, causal=False, scale=0.3)
    ((name, _, cq, ck, _),) = calls
    assert name == "cpu_flash" and cq.shape[1] == 6 and ck.shape[1] == 2


def test_a_value_head_dim_of_its_own_on_the_cpu(monkeypatch):
    """MLA shapes (scaled down: qk 24, v 16) run on matmul, the CPU kernel that takes them."""
    calls = recording(monkeypatch)
    key_mask = torch.zeros(2, 19, dtype=torch.bool)
    key_mask[0, 3:6] = True
    q, k, v = make(2, 4, 7, 24, seed=1), make(2, 2, 19, 24, seed=2), make(2, 2, 19, 16, seed=3)
    for causal in (False, True):
        check_against_dense(q, k, v, causal, key_mask)
    assert {name for name, *_ in calls} == {"matmul"}


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_lower_precision_on_cpu(dtype, tol):
    q, k, v = (make(2, 4, 16, 8, seed=s).to(dtype) for s in range(3))
    with torch.no_grad():
        out, lse = attend(q, k, v, causal=True, scale=0.3)
    assert lse.dtype == torch.float32
    ref, ref_lse = reference(q, k, v, True, 0.3)
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=tol, atol=tol)


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_rows_with_no_key_are_zero_with_the_empty_lse(kernel):
    q, k, v = make(2, 2, 4, 8), make(2, 2, 6, 8, seed=1), make(2, 2, 6, 8, seed=2)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0] = True          # batch 0: no key at all
    mask[1, :4] = True      # batch 1, causal: query 0 (position 2) sees keys 0..2, all padded
    structural = torch.zeros(1, 2, 4, 6, dtype=torch.bool)
    structural[0, 1, 3] = True  # head 1, query 3: every key excluded by the structural mask
    for causal in (False, True):
        with torch.no_grad():
            out, lse = attend(q, k, v, causal=causal, scale=0.3, key_mask=mask, backend=kernel)
            s_out, s_lse = attend(q, k, v, causal=causal, scale=0.3, mask=structural, backend=kernel)
        assert (out[0] == 0).all() and (lse[0] == EMPTY_LSE).all()
        if causal:
            assert (out[1, :, :2] == 0).all() and (lse[1, :, :2] == EMPTY_LSE).all()
        assert (s_out[:, 1, 3] == 0).all() and (s_lse[:, 1, 3] == EMPTY_LSE).all()
        assert torch.isfinite(lse).all() and torch.isfinite(s_lse).all()
        check_against_dense(q, k, v, causal, mask, backend=kernel)
        check_against_dense(q, k, v, causal, backend=kernel, mask=structural)


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


def test_a_nan_key_excluded_by_the_structural_mask_leaves_the_forward_exact(monkeypatch):
    """CPU flash ADDS its mask, so a call with a non-finite key and a
    structural mask goes to matmul, which fills: the forward equals the
    reference (the backward's limit is in the module docstring)."""
    calls = recording(monkeypatch)
    q, k, v = make(2, 4, 9, 8), make(2, 2, 9, 8, seed=1), make(2, 2, 9, 8, seed=2)
    mask = torch.rand(1, 4, 9, 9, generator=torch.Generator().manual_seed(1)) < 0.3
    mask[..., 4] = True  # key 4 excluded for every query
    k[:, :, 4] = math.nan
    k[:, 1, 4, 0] = math.inf
    for causal in (False, True):
        check_against_dense(q, k, v, causal, mask=mask, backward=False)
    assert {name for name, *_ in calls} == {"matmul"}
    calls.clear()
    k[:, :, 4] = 0.5
    check_against_dense(q, k, v, True, mask=mask, backward=True)
    assert {name for name, *_ in calls} == {"cpu_flash"}


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_scale_none_is_one_over_sqrt_head_dim(kernel):
    """``scale=None`` in attend and attend_backward means 1/sqrt(d), as in SDPA."""
    q, k, v = make(2, 4, 9, 16, seed=1), make(2, 2, 9, 16, seed=2), make(2, 2, 9, 16, seed=3)
    out, lse = attend(q, k, v, causal=True, scale=None, backend=kernel)
    want_out, want_lse = attend(q, k, v, causal=True, scale=0.25, backend=kernel)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
    grad_out = make(2, 4, 9, 16, seed=4)
    got = attend_backward(grad_out, q, k, v, out, lse, causal=True, scale=None, backend=kernel)
    want = attend_backward(grad_out, q, k, v, out, lse, causal=True, scale=0.25, backend=kernel)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------ dropout
def dropped_reference(q, k, v, causal, scale, key_mask, keep, p):
    """Attention with the probabilities times keep / (1 - p), from
    dense_attention alone: with the kept pairs as its weight it returns the
    kept probabilities renormalised, and exp(lse_kept - lse) is the kept mass."""
    b, h, m, _ = q.shape
    n = k.shape[2]
    out_all, lse_all = reference(q, k, v, causal, scale, key_mask)
    weight = allowed_weight(keep.expand(b, h, m, n), n)
    out, lse = dense_attention(*(x.transpose(1, 2) for x in (q, k, v)), weight=weight, is_causal=causal,
                               key_padding_mask=key_mask, scale=scale, return_lse=True)
    return out.transpose(1, 2) * (lse - lse_all).exp().unsqueeze(-1) / (1 - p)


@pytest.mark.parametrize("m, n, h_kv, causal", [(8, 8, 2, True), (5, 23, 1, True), (6, 17, 2, False)])
def test_dropout_keep_mask_forward_and_backward(monkeypatch, m, n, h_kv, causal):
    calls = recording(monkeypatch)
    p, scale = 0.3, 0.37
    generator = torch.Generator().manual_seed(m)
    q, k, v = make(2, 4, m, 8, seed=1), make(2, h_kv, n, 8, seed=2), make(2, h_kv, n, 6, seed=3)
    keep = torch.rand(2, 4, m, n, generator=generator) >= p
    key_mask = torch.zeros(2, n, dtype=torch.bool)
    key_mask[1, :2] = True
    with torch.no_grad():
        out, lse = attend(q, k, v, causal=causal, scale=scale, key_mask=key_mask, dropout_p=p, keep=keep)
    qd, kd, vd = (x.detach().requires_grad_() for x in (q, k, v))
    want = dropped_reference(qd, kd, vd, causal, scale, key_mask, keep, p)
    torch.testing.assert_close(out, want.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, reference(q, k, v, causal, scale, key_mask)[1], rtol=1e-10, atol=1e-10)
    grad_out = make(2, 4, m, 6, seed=4)
    got = attend_backward(grad_out, q, k, v, out, lse, causal=causal, scale=scale, key_mask=key_mask,
                          dropout_p=p, keep=keep)
    for a, b in zip(got, torch.autograd.grad(want, (qd, kd, vd), grad_out)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert {name for name, *_ in calls} == {"matmul"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dropout_p": 0.1}, "keep .* must be given with dropout_p=0.1"),
        ({"dropout_p": 1.0, "keep": torch.ones(1, 1, 4, 6, dtype=torch.bool)}, "dropout must be a probability"),
        ({"keep": torch.ones(1, 1, 4, 6)}, "keep must be None or a bool tensor broadcastable"),
        ({"mask": torch.ones(1, 3, 4, 6, dtype=torch.bool)}, r"mask must be None .* \(B, H, M, N\) = \(2, 2, 4, 6\)"),
        ({"mask": torch.ones(1, 1, 1, 4, 6, dtype=torch.bool)}, "mask must be None or a bool tensor"),
        ({"key_mask": torch.ones(2, 4, dtype=torch.bool)}, r"key_mask must be None or a \(B, N\) = \(2, 6\)"),
    ],
)
def test_bad_masks_are_refused_before_any_work(kwargs, message):
    q, k = make(2, 2, 4, 8), make(2, 2, 6, 8)
    with pytest.raises(ValueError, match=message):
        attend(q, k, k, causal=False, scale=None, **kwargs)
    with pytest.raises(ValueError, match=message):
        attend_backward(q, q, k, k, q, q[..., 0], causal=False, scale=None, **kwargs)


# ------------------------------------------------------------ flex
def test_flex_entry_forward_compiled_on_the_cpu(monkeypatch):
    """The flex backend through attend under torch.compile (one compile):
    GQA through enable_gqa, bottom-right causal with M < N, a value head_dim
    of its own, NaN and Inf in masked keys and values, a row with no key;
    and flex_attend with a score_mod (multiplicity 2 on even keys)."""
    key_mask = torch.rand(2, 37, generator=torch.Generator().manual_seed(5)) < 0.3
    key_mask[1, :33] = True  # batch 1: query 0 (position 32) sees only masked keys
    q, k, v = (x.float() for x in poisoned(2, 4, 2, 5, 37, 32, 16, key_mask, seed=3))
    calls = recording(monkeypatch)

    def twice(score, b, h, q_idx, kv_idx):  # even keys count twice: softmax(S + log W), W = 2 there
        return torch.where(kv_idx % 2 == 0, score + math.log(2.0), score)

    def run(q, k, v, key_mask):
        out, lse = attend(q, k, v, causal=True, scale=0.3, key_mask=key_mask, backend="flex")
        weighted, none = flex_attend(q, k, v, key_mask, causal=True, scale=0.3, score_mod=twice, return_lse=False)
        return out, lse, weighted, none

    out, lse, weighted, none = torch.compile(run, fullgraph=True)(q, k, v, key_mask)
    want, want_lse = reference(q, k, v, True, 0.3, key_mask)
    torch.testing.assert_close(out.double(), want, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(lse.double(), want_lse, rtol=2e-6, atol=2e-6)
    assert (out[1, :, 0] == 0).all() and (lse[1, :, 0] == EMPTY_LSE).all()
    assert {name for name, *_ in calls} == {"flex"}
    counts = torch.ones(4, 37, 37, dtype=torch.float64)
    counts[:, :, ::2] = 2.0
    want = dense_attention(*(x.transpose(1, 2) for x in (q, k, v)), weight=counts, is_causal=True,
                           key_padding_mask=key_mask, scale=0.3).transpose(1, 2)
    assert none is None
    torch.testing.assert_close(weighted.double(), want, rtol=2e-6, atol=2e-6)


def test_flex_backward_wiring_from_the_final_out_and_lse():
    """flex_attend_backward's pull-back through the merge weights, with an
    explicit differentiable part substituted for flex (no flex backward on
    the CPU): two key parts of one causal problem, against the reference."""
    scale, split = 0.37, 9
    key_mask = torch.rand(2, 25, generator=torch.Generator().manual_seed(2)) < 0.3
    q, k, v = make(2, 4, 7, 8, seed=1), make(2, 2, 25, 8, seed=2), make(2, 2, 25, 5, seed=3)
    out, lse = attend(q, k, v, causal=True, scale=scale, key_mask=key_mask)
    grad_out = make(2, 4, 7, 5, seed=4)

    def part(q, k, v, key_mask, *, causal, scale):
        return attend(q, k, v, causal=causal, scale=scale, key_mask=key_mask, backend="matmul")

    first = flex_attend_backward(grad_out, q, k[:, :, :split], v[:, :, :split], out, lse, key_mask[:, :split],
                                 causal=False, scale=scale, part=part)
    second = flex_attend_backward(grad_out, q, k[:, :, split:], v[:, :, split:], out, lse, key_mask[:, split:],
                                  causal=True, scale=scale, part=part)
    got = (first[0] + second[0], torch.cat([first[1], second[1]], 2), torch.cat([first[2], second[2]], 2))
    qd, kd, vd = (x.detach().requires_grad_() for x in (q, k, v))
    want = torch.autograd.grad(reference(qd, kd, vd, True, scale, key_mask)[0], (qd, kd, vd), grad_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_flex_backward_on_the_cpu_falls_back_to_a_kernel_with_one(monkeypatch):
    calls = recording(monkeypatch)
    q, k, v = make(1, 2, 6, 16), make(1, 2, 6, 16, seed=1), make(1, 2, 6, 16, seed=2)
    out, lse = attend(q, k, v, causal=True, scale=None, backend="matmul")
    attend_backward(out, q, k, v, out, lse, causal=True, scale=None, backend="flex")
    assert [name for name, *_ in calls] == ["matmul", "cpu_flash"]


# ------------------------------------------------------------ merge
def test_merge_of_two_key_halves_is_attention_over_all_keys():
    q, k, v = make(2, 3, 7, 8), make(2, 3, 20, 8, seed=1), make(2, 3, 20, 8, seed=2)
    with torch.no_grad():
        out, lse = attend(q, k[:, :, :9], v[:, :, :9], causal=False, scale=0.3)
        o, l = attend(q, k[:, :, 9:], v[:, :, 9:], causal=False, scale=0.3)
    merge_(out, lse, o, l)
    ref, ref_lse = reference(q, k, v, False, 0.3)
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
        (((1, 8, 4, 2), (1, 9, 2, 2), (1, 8, 2, 2)), "k and v must have one shape"),
        (((1, 8, 4, 6), (1, 9, 2, 6), (1, 9, 2, 3)), None),          # MLA: value head_dim of its own
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


def test_an_entry_point_without_a_value_head_dim_of_its_own_refuses_one():
    q, k, v = torch.zeros(1, 8, 4, 6), torch.zeros(1, 9, 2, 6), torch.zeros(1, 9, 2, 3)
    check_attention_inputs(q, k, v)
    with pytest.raises(ValueError, match="takes no value head_dim of its own"):
        check_attention_inputs(q, k, v, value_head_dim=False)
    check_attention_inputs(q, k, k, value_head_dim=False)


def test_key_padding_mask_is_over_the_keys():
    q, k = torch.zeros(2, 3, 2, 4), torch.zeros(2, 7, 2, 4)
    with pytest.raises(ValueError, match=r"\(batch, kv_len\) = \(2, 7\)"):
        check_attention_inputs(q, k, k, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool tensor"):
        check_attention_inputs(q, k, k, torch.zeros(2, 7))
