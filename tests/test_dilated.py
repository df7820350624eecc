"""DilatedAttention and ImprovedDilatedAttention against the naive dense
reference (attention/dense_reference.py): outputs and input gradients in float64,
both schemes, causal or not, awkward lengths and head counts, padding; the
fast path's other kernel and its chunking; dtypes; the store wiring; bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import attention.dilated.module as dilated
import attention.dilated.fast as dilated_kernels
import attention.dilated.plan as dilated_plan
import attention.dilated.reference as dilated_reference
import attention.kernels.attend as kernels
from attention import DilatedAttention, DilatedPlan, ImprovedDilatedAttention, dilated_attention
from cuda_emulation import emulated_cuda_ops, recording
from attention.dense_reference import dense_attention, dense_dilated_attention, multiplicity
from patternstore import DilatedSpec, PatternStore, generate

MODULES = [DilatedAttention, ImprovedDilatedAttention]

# (segment_lengths, dilation_rates, heads, seq_len), each awkward in its own way
CASES = [
    ((4, 8, 16), (1, 2, 4), 4, 37),  # length a multiple of no segment; last segment short in every branch
    ((5,), (3,), 2, 23),             # r > heads: offsets past the last head belong to no head
    ((6, 9), (2, 3), 5, 31),         # heads not divisible by r (groups of 3+2 and 2+2+1)
    ((8, 6), (1, 5), 3, 30),         # r > heads in one branch, and several tails
    ((64, 16), (2, 4), 4, 21),       # segment longer than the sequence: clipped to n
]


def qkv(b, n, h, d, dtype=torch.float64, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, h, d, generator=g, dtype=dtype).requires_grad_(requires_grad) for _ in range(3)]


def grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=g, dtype=out.dtype)
    return torch.autograd.grad(out, inputs, grad_out)


def assert_close(actual, expected, tol=1e-10):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert not actual.isnan().any()
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


# ------------------------------------------------------------ exactness
@pytest.mark.parametrize("module_class", MODULES)
@pytest.mark.parametrize("scheme", ["longnet", "grouped"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"w{c[0]}-r{c[1]}-h{c[2]}-n{c[3]}")
def test_outputs_and_gradients_match_dense_reference(module_class, scheme, is_causal, case):
    segments, rates, h, n = case
    if scheme == "grouped" and len(segments) > h:
        pytest.skip("grouped needs a head per branch")
    q, k, v = qkv(2, n, h, 3, requires_grad=True)
    module = module_class(segments, rates, scheme=scheme)
    out = module(q, k, v, is_causal=is_causal)
    expected = dense_dilated_attention(q, k, v, segments, rates, scheme=scheme, is_causal=is_causal)
    assert_close(out, expected)
    for got, want in zip(grads(out, (q, k, v)), grads(expected, (q, k, v))):
        assert_close(got, want)


@pytest.mark.parametrize("module_class", MODULES)
@pytest.mark.parametrize("is_causal", [False, True])
def test_key_padding_mask_matches_dense_reference(module_class, is_causal):
    segments, rates, h, n = (4, 8, 16), (1, 2, 4), 4, 37
    q, k, v = qkv(3, n, h, 3, requires_grad=True)
    pad = torch.rand(3, n, generator=torch.Generator().manual_seed(2)) < 0.4
    pad[1] = True                    # a batch row with every key padded: outputs 0
    pad[2, :5] = True                # causal: the first queries see no key
    out = module_class(segments, rates)(q, k, v, is_causal=is_causal, key_padding_mask=pad)
    expected = dense_dilated_attention(q, k, v, segments, rates, is_causal=is_causal, key_padding_mask=pad)
    assert_close(out, expected)
    assert out[1].abs().max() == 0
    for got, want in zip(grads(out, (q, k, v)), grads(expected, (q, k, v))):
        assert_close(got, want)


@settings(max_examples=30, deadline=None)
@given(
    branches=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 5)), min_size=1, max_size=3),
    h=st.integers(1, 6),
    n=st.integers(1, 40),
    b=st.integers(1, 3),
    is_causal=st.booleans(),
    grouped=st.booleans(),
)
def test_improved_equals_dense_reference_property(branches, h, n, b, is_causal, grouped):
    segments = tuple(w for w, _ in branches)
    rates = tuple(min(r, w) for w, r in branches)
    scheme = "grouped" if grouped and len(segments) <= h else "longnet"
    q, k, v = qkv(b, n, h, 2, seed=n)
    out = ImprovedDilatedAttention(segments, rates, scheme=scheme)(q, k, v, is_causal=is_causal)
    assert_close(out, dense_dilated_attention(q, k, v, segments, rates, scheme=scheme, is_causal=is_causal))


@pytest.mark.parametrize("is_causal", [False, True])
def test_improved_equals_plain_to_1e6(is_causal):
    segments, rates = (16, 32, 64), (1, 2, 4)
    q, k, v = qkv(2, 200, 8, 16, requires_grad=True)
    plain = DilatedAttention(segments, rates)(q, k, v, is_causal=is_causal)
    fast = ImprovedDilatedAttention(segments, rates)(q, k, v, is_causal=is_causal)
    assert_close(fast, plain, tol=1e-6)
    for got, want in zip(grads(fast, (q, k, v)), grads(plain, (q, k, v))):
        assert_close(got, want, tol=1e-6)


@pytest.mark.parametrize("module_class", MODULES)
@pytest.mark.parametrize("is_causal", [False, True])
def test_single_full_branch_is_dense_sdpa(module_class, is_causal):
    q, k, v = qkv(2, 50, 3, 8)
    out = module_class((64,), (1,))(q, k, v, is_causal=is_causal)
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=is_causal)
    assert_close(out, sdpa.transpose(1, 2))


@pytest.mark.parametrize("module_class", MODULES)
def test_gradcheck_tiny(module_class):
    q, k, v = qkv(1, 7, 3, 2, requires_grad=True)
    pad = torch.tensor([[False, True, False, False, True, True, False]])
    module = module_class((2, 4), (1, 2))
    # fast_mode: random directions instead of the full Jacobian (the full
    # gradients are compared with the dense reference above).
    assert torch.autograd.gradcheck(
        lambda q, k, v: module(q, k, v, is_causal=True, key_padding_mask=pad), (q, k, v), fast_mode=True
    )
    assert torch.autograd.gradcheck(lambda q, k, v: module(q, k, v), (q, k, v), fast_mode=True)


# ------------------------------------------------ fast path internals
def test_matmul_kernel_matches_dense_reference(monkeypatch):
    """The kernel other devices and dtypes take, exercised on CPU."""
    monkeypatch.setattr(kernels, "choose_kernel", lambda *args: "matmul")
    segments, rates, h, n = (4, 8, 16), (1, 2, 4), 4, 37
    q, k, v = qkv(2, n, h, 3, requires_grad=True)
    pad = torch.rand(2, n, generator=torch.Generator().manual_seed(3)) < 0.3
    pad[0, :6] = True
    for is_causal in (False, True):
        out = ImprovedDilatedAttention(segments, rates)(q, k, v, is_causal=is_causal, key_padding_mask=pad)
        expected = dense_dilated_attention(q, k, v, segments, rates, is_causal=is_causal, key_padding_mask=pad)
        assert_close(out, expected)
        for got, want in zip(grads(out, (q, k, v)), grads(expected, (q, k, v))):
            assert_close(got, want)


# (dtype, head_dim, masked) selecting each CUDA kernel (tests/test_kernels.py CUDA_BRANCHES).
CUDA_CHOICES = [(torch.bfloat16, 64, False), (torch.float16, 192, False), (torch.float32, 64, True),
                (torch.bfloat16, 64, True)]
# (batch, q_len, kv_len, kv_heads, causal): tails and GQA; decode rows; chunks across batch rows.
CUDA_SHAPES = [(2, 37, 37, 2, True), (1, 5, 70, 1, True), (3, 32, 32, 4, False)]


@pytest.mark.parametrize("dtype, head_dim, masked", CUDA_CHOICES)
@pytest.mark.parametrize("b, q_len, kv_len, h_kv, causal", CUDA_SHAPES)
def test_fast_path_runs_the_cuda_control_flow_on_meta_tensors(monkeypatch, dtype, head_dim, masked, b, q_len,
                                                              kv_len, h_kv, causal):
    """The dilated fast path's chunk views fed to the real fused CUDA ops'
    meta kernels (backend "cuda" on meta tensors): every call the kernel
    ``choose_kernel`` names, (B, H, M, d) rows with unit stride, M and N the
    piece's rows; out, lse and gradients of the right shapes and dtypes."""
    monkeypatch.setattr(dilated_kernels, "_MIN_CHUNK", 64)  # several chunks per piece
    calls = recording(monkeypatch)
    h = 4
    plan = DilatedPlan.from_pattern(generate(DilatedSpec((8, 16), (1, 2), h)))
    q = torch.empty(b, q_len, h, head_dim, dtype=dtype, device="meta")
    k, v = (torch.empty(b, kv_len, h_kv, head_dim, dtype=dtype, device="meta") for _ in range(2))
    pad = torch.zeros(b, kv_len, dtype=torch.bool, device="meta") if masked else None
    out, lse = dilated_kernels.forward_groups(q, k, v, pad, plan.groups, causal, 0.125, backend="cuda")
    assert out.shape == q.shape and out.dtype == dtype and out.device.type == "meta"
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    grads_ = [torch.zeros(x.shape, dtype=out.dtype, device="meta") for x in (q, k, v)]
    dilated_kernels.backward_groups(q, q, k, v, q, lse, pad, plan.groups, causal, 0.125, *grads_, backend="cuda")
    expected = kernels.choose_kernel("cuda", dtype, head_dim, masked)
    assert calls and {name for name, *_ in calls} == {expected}
    for _, _, cq, ck, cv in calls:
        assert cq.dim() == 4 and all(x.stride(-1) == 1 for x in (cq, ck, cv))
        assert cq.shape[-1] == head_dim and cq.shape[2] <= 16 and ck.shape[2] <= 16  # a piece's rows


@pytest.mark.parametrize("dtype, head_dim, masked", CUDA_CHOICES)
def test_fast_path_through_each_cuda_kernel_with_cpu_emulations(monkeypatch, dtype, head_dim, masked):
    """The whole module (forward and backward, causal, GQA, decode rows, key
    padding) with each CUDA kernel's code, its op replaced by a CPU emulation
    of the CUDA op's conventions (tests/cuda_emulation.py), against the
    float64 dense reference of the values it saw. Tolerances: the emulations
    compute in the input dtype: float32 1e-5; half types round inputs,
    probabilities and outputs (u = 2^-8 bf16, 2^-11 fp16), 4u relative."""
    choice = kernels.choose_kernel("cuda", dtype, head_dim, masked)
    monkeypatch.setattr(kernels, "_ops", emulated_cuda_ops())
    monkeypatch.setattr(kernels, "choose_kernel", lambda *args: choice)
    # The module chooses its kernel once per call and hands the name down: the CUDA entry takes CPU tensors here.
    monkeypatch.setitem(kernels.KERNELS, choice, kernels.KERNELS[choice]._replace(devices=("cuda", "cpu"),
                                                                                  backward_devices=("cuda", "cpu")))
    monkeypatch.setattr(dilated_kernels, "_MIN_CHUNK", 64)  # several chunks per piece
    u = {torch.float32: None, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    tolerance = 1e-5 if u is None else 4 * u
    segments, rates, h, h_kv, b, n = (8, 16), (1, 2), 4, 2, 2, 45
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(b, n, heads, head_dim, generator=generator, dtype=torch.float64).to(dtype)
               for heads in (h, h_kv, h_kv))
    pad = torch.zeros(b, n, dtype=torch.bool)
    if masked:
        pad[1, 30:] = True
    module = ImprovedDilatedAttention(segments, rates)
    for q_len, is_causal in ((n, True), (n, False), (3, True)):
        rows = q[:, n - q_len :].detach().requires_grad_()
        keys, values = k.detach().requires_grad_(), v.detach().requires_grad_()
        out = module(rows, keys, values, is_causal=is_causal, key_padding_mask=pad if masked else None)
        wide = [x.detach().double().requires_grad_() for x in (q, keys, values)]
        repeat = [x.repeat_interleave(h // h_kv, dim=2) for x in wide[1:]]
        full = dense_dilated_attention(wide[0], *repeat, segments, rates, is_causal=is_causal,
                                       key_padding_mask=pad if masked else None)
        want = full[:, n - q_len :]
        assert out.dtype == dtype
        error = float((out.detach().double() - want.detach()).norm() / want.detach().norm())
        assert error <= tolerance, f"{choice} output, q_len {q_len}: {error:.1e}"
        grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
        got = torch.autograd.grad(out, (rows, keys, values), grad_out.to(dtype))
        expected = torch.autograd.grad(want, wide, grad_out)
        expected = (expected[0][:, n - q_len :], *expected[1:])
        for name, a, e in zip("qkv", got, expected):
            error = float((a.double() - e).norm() / max(float(e.norm()), float(grad_out.norm())))
            assert error <= 2 * tolerance, f"{choice} grad {name}, q_len {q_len}: {error:.1e}"


@pytest.mark.parametrize("min_chunk", [1, 150])
@pytest.mark.parametrize("b, n", [(1, 37), (3, 37), (3, 32)])
def test_chunked_paths_match_dense_reference(monkeypatch, b, n, min_chunk):
    """Tiny chunks (one, or a few (batch, segment) pairs): chunks within a
    batch row (tail present), across batch rows (no tail), and the reference
    scores a segment at a time."""
    monkeypatch.setattr(dilated_kernels, "_MIN_CHUNK", min_chunk)
    monkeypatch.setattr(dilated_kernels, "_CHUNK_FRACTION", 1 << 30)
    monkeypatch.setattr(dilated_reference, "_REFERENCE_SCORES", 1)
    segments, rates = (4, 8, 16), (1, 2, 4)
    q, k, v = qkv(b, n, 4, 3, requires_grad=True)
    expected = dense_dilated_attention(q, k, v, segments, rates, is_causal=True)
    expected_grads = grads(expected, (q, k, v))
    for module_class in MODULES:
        out = module_class(segments, rates)(q, k, v, is_causal=True)
        assert_close(out, expected)
        for got, want in zip(grads(out, (q, k, v)), expected_grads):
            assert_close(got, want)


def test_strided_inputs_from_a_fused_projection():
    """q, k, v as interleaved views of one tensor (a fused qkv projection)."""
    qkv_all = torch.randn(2, 37, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv_all.unbind(2)
    out = ImprovedDilatedAttention((4, 8), (1, 2))(q, k, v)
    expected = dense_dilated_attention(q, k, v, (4, 8), (1, 2))
    assert_close(out, expected)
    (got,) = grads(out, (qkv_all,))
    (want,) = grads(expected, (qkv_all,))
    assert_close(got, want)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("module_class", MODULES)
def test_lower_precision_dtypes(module_class, dtype, tol):
    q, k, v = qkv(2, 45, 4, 16)
    low = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    out = module_class((8, 16), (1, 2))(*low, is_causal=True)
    assert out.dtype == dtype
    expected = dense_dilated_attention(*(x.detach().double() for x in low), (8, 16), (1, 2), is_causal=True)
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    for g in grads(out, low):
        assert g.dtype == dtype and torch.isfinite(g).all()


def test_dropout_trains_stochastically_and_evaluates_exactly():
    q, k, v = qkv(1, 32, 2, 4)
    segments, rates = (8, 16), (1, 2)
    modules = [cls(segments, rates, dropout=0.5) for cls in MODULES]
    outs = []
    for module in modules:
        torch.manual_seed(0)
        outs.append(module.train()(q, k, v))
    torch.testing.assert_close(outs[0], outs[1])  # Improved takes the reference path with dropout
    assert not torch.allclose(outs[0], dense_dilated_attention(q, k, v, segments, rates))
    for module in modules:
        assert_close(module.eval()(q, k, v), dense_dilated_attention(q, k, v, segments, rates))


# ----------------------------------------------------------------- plans
def selected_positions(g, n):
    """Positions of [0, n) group g selects, from docs/design.md's rule: s = min(w, n), p % s >= o, (p % s - o) % r == 0."""
    s = min(g.segment, n)
    return {p for p in range(n) if p % s >= g.offset and (p % s - g.offset) % g.rate == 0}


@pytest.mark.parametrize("scheme", ["longnet", "grouped"])
def test_pieces_select_exactly_the_rule_positions(scheme):
    """Every (q_len, kv_len): the pieces' query views are exactly the group's
    selected positions among the last q_len, and each piece's keys are the
    selected positions of the same segment (the query rows last)."""
    plan = DilatedPlan.from_pattern(generate(DilatedSpec((4, 8, 16, 12), (1, 2, 4, 3), 5, scheme)))
    for n in (1, 7, 12, 16, 53):
        pos = torch.arange(n)[None, :]
        for m in sorted({1, 2, 5, 11, n // 2 + 1, n} & set(range(1, n + 1))):
            for g in plan.groups:
                s = min(g.segment, n)
                selected = selected_positions(g, n)
                queries = []
                for piece in dilated_plan.pieces(g, m, n):
                    qv = dilated_plan.view(pos[:, n - m :], piece, True)[0]
                    kv = dilated_plan.view(pos, piece, False)[0]
                    for q_row, k_row in zip(qv.tolist(), kv.tolist()):
                        segment = {p for p in selected if p // s == q_row[0] // s}
                        assert k_row == sorted(segment) and q_row == k_row[len(k_row) - len(q_row):]
                        queries += q_row
                assert sorted(queries) == sorted(p for p in selected if p >= n - m)


def test_modules_fetch_one_plan_for_every_length(tmp_path):
    store = PatternStore(tmp_path / "store")
    module = ImprovedDilatedAttention((4, 8), (1, 2), store=store)
    for n in (20, 20, 20, 33, 33, 5):
        module(*qkv(1, n, 2, 3))
    stats = store.stats()
    assert stats["misses"] == 1 and stats["memory_hits"] == 0 and stats["disk_hits"] == 0
    assert store.contains(DilatedSpec((4, 8), (1, 2), 2))
    # A new module (as in a new process) reads the plan back instead of generating it.
    other = DilatedAttention((4, 8), (1, 2), store=PatternStore(tmp_path / "store"))
    other(*qkv(1, 20, 2, 3))
    assert other.store.stats()["disk_hits"] == 1 and other.store.stats()["generations"] == 0


def test_plan_cache_is_bounded():
    module = ImprovedDilatedAttention((4,), (1,))
    for h in range(1, dilated._PLANS_KEPT + 4):
        module(*qkv(1, 6, h, 2))
    assert len(module._plans) == dilated._PLANS_KEPT


def test_functional_api_checks_its_plan():
    q, k, v = qkv(1, 10, 2, 3)
    plan = DilatedPlan.from_pattern(generate(DilatedSpec((4,), (1,), 3)))
    with pytest.raises(ValueError, match="plan is for num_heads=3"):
        dilated_attention(q, k, v, plan)


# ------------------------------------------------------------- bad input
@pytest.mark.parametrize("module_class", MODULES)
@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: (torch.randn(2, 8, 4), torch.randn(2, 8, 4), torch.randn(2, 8, 4)), "q must have shape"),
        (lambda: (torch.randn(1, 8, 2, 4), torch.randn(1, 9, 2, 4), torch.randn(1, 8, 2, 4)), "k and v must have one shape"),
        (lambda: (torch.randn(1, 8, 2, 4), torch.randn(1, 8, 3, 4), torch.randn(1, 8, 2, 4)), "k and v must have one shape"),
        (lambda: (torch.randn(1, 9, 2, 4), torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 4)), "q_len must be <= kv_len"),
        (lambda: (torch.randn(1, 8, 3, 4), torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 4)), "multiple of the key/value heads"),
        (lambda: (torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 5), torch.randn(1, 8, 2, 5)), "same batch and head_dim"),
        (lambda: (torch.randn(1, 0, 2, 4),) * 3, "must not be empty"),
        (lambda: (torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 4).double(), torch.randn(1, 8, 2, 4)), "one dtype"),
        (lambda: (torch.ones(1, 8, 2, 4, dtype=torch.int64),) * 3, "floating-point"),
        (lambda: (torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 4, device="meta"), torch.randn(1, 8, 2, 4)), "one device"),
        (lambda: (torch.randn(1, 8, 2, 4), "k", torch.randn(1, 8, 2, 4)), "k must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_value_error(module_class, make, message):
    with pytest.raises(ValueError, match=message):
        module_class((4,), (1,))(*make())


@pytest.mark.parametrize("module_class", MODULES)
def test_bad_key_padding_mask(module_class):
    q, k, v = qkv(2, 8, 2, 4)
    module = module_class((4,), (1,))
    with pytest.raises(ValueError, match="bool tensor"):
        module(q, k, v, key_padding_mask=torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"shape \(batch, kv_len\) = \(2, 8\)"):
        module(q, k, v, key_padding_mask=torch.zeros(2, 9, dtype=torch.bool))


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        (((4, 8), (1,)), {}, ValueError, "same length"),
        (((4,), (8,)), {}, ValueError, "larger than its segment"),
        (((0,), (1,)), {}, ValueError, "segment_lengths"),
        (((4,), (1,)), {"scheme": "ring"}, ValueError, "scheme must be one of"),
        (((4,), (1,)), {"dropout": 1.0}, ValueError, "dropout"),
        (((4,), (1,)), {"softmax_scale": -1.0}, ValueError, "softmax_scale must be None or a finite number > 0"),
        (((4,), (1,)), {"softmax_scale": float("inf")}, ValueError, "softmax_scale must be None or a finite number > 0"),
        (((4,), (1,)), {"softmax_scale": True}, ValueError, "softmax_scale"),
        (((4,), (1,)), {"dropout": -0.1}, ValueError, r"dropout must be a probability in \[0, 1\)"),
        (((4,), (1,)), {"store": "/tmp"}, ValueError, "store must be a PatternStore"),
    ],
)
def test_bad_configuration(args, kwargs, error, message):
    for module_class in MODULES:
        with pytest.raises(error, match=message):
            module_class(*args, **kwargs)


def test_grouped_needs_a_head_per_branch():
    with pytest.raises(ValueError, match="num_heads >= number of branches"):
        ImprovedDilatedAttention((4, 8, 16), (1, 2, 4), scheme="grouped")(*qkv(1, 8, 2, 4))


# ------------------------------------------- generation: q shorter than k
DECODE_CASES = [((4, 8, 16), (1, 2, 4), 4, 37), ((6, 9), (2, 3), 5, 31), ((64, 16), (2, 4), 4, 21)]


@pytest.mark.parametrize("module_class", MODULES)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"w{c[0]}-r{c[1]}-h{c[2]}-n{c[3]}")
def test_queries_shorter_than_keys_are_the_last_rows_of_the_full_forward(module_class, is_causal, case):
    """q of the last q_len positions against the whole k, v: exactly those
    rows of the full forward (the dense reference), padding included, and
    the gradients of those rows."""
    segments, rates, h, n = case
    q, k, v = qkv(2, n, h, 3, requires_grad=True)
    pad = torch.zeros(2, n, dtype=torch.bool)
    pad[1, ::3] = True
    module = module_class(segments, rates)
    for q_len in (1, 2, 5, n - 1):
        full = dense_dilated_attention(q, k, v, segments, rates, is_causal=is_causal, key_padding_mask=pad)
        rows = q[:, n - q_len :]
        out = module(rows, k, v, is_causal=is_causal, key_padding_mask=pad)
        assert_close(out, full[:, n - q_len :])
        for got, want in zip(grads(out, (q, k, v)), grads(full[:, n - q_len :], (q, k, v))):
            assert_close(got, want)


def test_a_decode_step_reads_only_the_keys_its_row_attends(monkeypatch):
    """Cost proportional to the keys a row attends: every kernel call of a
    one-row step gets at most w_i / r_i keys, never the cache."""
    shapes = []
    real_attend = dilated_kernels.attend

    def counting(q, k, v, **kwargs):
        shapes.append((q.shape[-2], k.shape[-2]))
        return real_attend(q, k, v, **kwargs)

    monkeypatch.setattr(dilated_kernels, "attend", counting)
    segments, rates, n = (64, 128, 256), (1, 2, 4), 1000
    q, k, v = qkv(1, n, 4, 8)
    ImprovedDilatedAttention(segments, rates)(q[:, -1:], k, v, is_causal=True)
    assert shapes and all(m == 1 and keys <= max(w // r for w, r in zip(segments, rates)) for m, keys in shapes)


@pytest.mark.parametrize("module_class", MODULES)
@pytest.mark.parametrize("h, h_kv, rates", [(4, 2, (1, 2)), (6, 2, (4, 3)), (6, 3, (1, 4)), (4, 1, (2, 3))])
def test_grouped_query_attention_equals_repeated_keys(module_class, h, h_kv, rates):
    """k, v with fewer heads (query head j reads key/value head j // (h / h_kv)),
    head groups cut across key/value heads included: equals the same keys
    repeated, outputs and gradients, full and decode rows, causal."""
    segments, n = (8, 12), 29
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, n, h, 3, dtype=torch.float64, generator=g, requires_grad=True)
    k, v = (torch.randn(2, n, h_kv, 3, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    module = module_class(segments, rates)
    for q_len in (n, 3):
        rows = q[:, n - q_len :]
        out = module(rows, k, v, is_causal=True)
        repeat = h // h_kv
        expected = dense_dilated_attention(
            q, k.repeat_interleave(repeat, 2), v.repeat_interleave(repeat, 2), segments, rates, is_causal=True
        )[:, n - q_len :]
        assert_close(out, expected)
        for got, want in zip(grads(out, (q, k, v)), grads(expected, (q, k, v))):
            assert_close(got, want)


def strided_layouts(x):
    """The same (b, n, h, d) values in every stride pattern (head_dim included)."""
    b, n, h, d = x.shape
    wide = torch.zeros(2 * b, 2 * n, 2 * h, 2 * d, dtype=x.dtype)
    wide[::2, ::2, ::2, ::2] = x
    return {
        "every-dim-strided": wide[::2, ::2, ::2, ::2],
        "head-dim-strided": torch.stack([x, x], -1)[..., 0],
        "permuted-bdnh": x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1),
        "sequence-last": x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
        "bhnd": x.transpose(1, 2).contiguous().transpose(1, 2),
    }


@pytest.mark.parametrize("module_class", MODULES)
@pytest.mark.parametrize("layout", ["every-dim-strided", "head-dim-strided", "permuted-bdnh", "sequence-last", "bhnd"])
def test_every_stride_pattern_equals_contiguous(module_class, layout):
    """Issue 10: a last dim that is not contiguous gave wrong numbers (and a
    permuted (b, d, n, h) tensor NaN); every layout equals the reference."""
    q, k, v = qkv(2, 37, 4, 6)
    strided = [strided_layouts(x)[layout] for x in (q, k, v)]
    leaves = [x.detach().requires_grad_() for x in strided]
    out = module_class((4, 8, 16), (1, 2, 4))(*leaves, is_causal=True)
    expected_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    expected = dense_dilated_attention(*expected_leaves, (4, 8, 16), (1, 2, 4), is_causal=True)
    assert_close(out, expected)
    for got, want in zip(grads(out, leaves), grads(expected, expected_leaves)):
        assert_close(got, want)


def test_a_nan_in_a_future_key_leaves_earlier_queries_finite():
    q, k, v = qkv(1, 32, 2, 8)
    k[:, 20] = float("nan")
    for module_class in MODULES:
        out = module_class((8, 16), (1, 2))(q, k, v, is_causal=True)
        assert torch.isfinite(out[:, :20]).all()


# --------------------------------------------------- program transforms
@pytest.mark.parametrize("module_class", MODULES)
def test_pickle_and_deepcopy_rebuild_plans_lazily(module_class):
    import copy
    import pickle

    module = module_class((4, 8), (1, 2), softmax_scale=0.4)
    q, k, v = qkv(1, 19, 2, 3)
    expected = module(q, k, v, is_causal=True)
    for clone in (pickle.loads(pickle.dumps(module)), copy.deepcopy(module)):
        assert len(clone._plans) == 0 and clone.softmax_scale == 0.4
        assert_close(clone(q, k, v, is_causal=True), expected)
    assert len(module._plans) == 1


def test_torch_func_grad_and_vjp():
    module = ImprovedDilatedAttention((4, 8), (1, 2))
    q, k, v = qkv(1, 19, 2, 3)
    module(q, k, v)  # warm: a cold store under a torch.func transform is the store's part (issue 10)
    got = torch.func.grad(lambda q, k, v: module(q, k, v, is_causal=True).square().sum(), argnums=(0, 1, 2))(q, k, v)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    want = torch.autograd.grad(module(*leaves, is_causal=True).square().sum(), leaves)
    for a, b in zip(got, want):
        assert_close(a, b)


def test_double_backward_is_a_clear_error_on_the_fast_path_and_works_on_the_plain_one():
    q, k, v = qkv(1, 12, 2, 3, requires_grad=True)
    out = ImprovedDilatedAttention((4,), (1,))(q, k, v)
    (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward .* not supported; DilatedAttention"):
        dq.sum().backward()
    out = DilatedAttention((4,), (1,))(q, k, v)
    (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    (dqq,) = torch.autograd.grad(dq.square().sum(), q)
    assert torch.isfinite(dqq).all() and dqq.abs().sum() > 0


@pytest.mark.parametrize("module_class", MODULES)
def test_torch_jit_script_names_torch_compile(module_class):
    with pytest.raises(RuntimeError, match=r"torch.jit.script.*use torch.compile"):
        torch.jit.script(module_class((4,), (1,)))


@pytest.mark.parametrize("module_class", MODULES)
def test_inference_mode_and_no_grad(module_class):
    module = module_class((4, 8), (1, 2))
    q, k, v = qkv(1, 19, 2, 3)
    expected = dense_dilated_attention(q, k, v, (4, 8), (1, 2), is_causal=True)
    module(q, k, v)  # warm: the store's first take under inference mode is the store's part (issue 10)
    with torch.inference_mode():
        assert_close(module(q, k, v, is_causal=True), expected)
    with torch.no_grad():
        assert_close(module(q, k, v, is_causal=True), expected)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_is_causal_must_be_a_bool(value):
    q, k, v = qkv(1, 8, 2, 3)
    for module_class in MODULES:
        with pytest.raises(ValueError, match="is_causal must be True or False"):
            module_class((4,), (1,))(q, k, v, is_causal=value)


# --------------------------------------------------- torch.func transforms
def _dense(segments, rates, is_causal):
    return lambda q, k, v, pad=None: dense_dilated_attention(q, k, v, segments, rates, is_causal=is_causal,
                                                             key_padding_mask=pad)


@pytest.mark.parametrize("module_class", MODULES)
def test_vmap_equals_the_reference_per_sample(module_class):
    """``vmap`` over a leading dim of q, k, v and the padding mask (the ops'
    rule folds it into the batch), and over q alone (k, v shared)."""
    segments, rates = (4, 8), (1, 2)
    module = module_class(segments, rates)
    q, k, v = (torch.randn(3, 2, 13, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
               for i in range(3))
    pad = torch.zeros(3, 2, 13, dtype=torch.bool)
    pad[1, 0, -4:] = True
    pad[2, 1, :3] = True
    dense = _dense(segments, rates, True)
    got = torch.func.vmap(lambda q, k, v, p: module(q, k, v, is_causal=True, key_padding_mask=p))(q, k, v, pad)
    assert_close(got, torch.stack([dense(*xs) for xs in zip(q, k, v, pad)]))
    got = torch.func.vmap(lambda q: module(q, k[0], v[0], is_causal=True))(q)
    assert_close(got, torch.stack([dense(x, k[0], v[0]) for x in q]))


@pytest.mark.parametrize("module_class", MODULES)
def test_per_sample_gradients_with_vmap_of_grad(module_class):
    """``vmap(grad)``: each sample's gradients of its own loss, q, k and v,
    equal the dense reference's, sample by sample."""
    segments, rates = (4, 8), (1, 2)
    module = module_class(segments, rates)
    q, k, v, weight = (torch.randn(4, 11, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
                       for i in range(4))

    def loss(q, k, v, w, attend):  # one sample: (n, h, d)
        return (attend(q[None], k[None], v[None])[0] * w).sum()

    fast = torch.func.vmap(torch.func.grad(
        lambda *xs: loss(*xs, lambda q, k, v: module(q, k, v, is_causal=True)), argnums=(0, 1, 2)))(q, k, v, weight)
    for i in range(4):
        leaves = [x[i].clone().requires_grad_() for x in (q, k, v)]
        want = torch.autograd.grad(loss(*leaves, weight[i], _dense(segments, rates, True)), leaves)
        for got, expected in zip(fast, want):
            assert_close(got[i], expected)


@pytest.mark.parametrize("module_class", MODULES)
def test_jacrev_equals_the_reference_jacobian(module_class):
    segments, rates = (4,), (2,)
    module = module_class(segments, rates)
    q, k, v = qkv(1, 6, 2, 2)
    for argnum in (0, 2):
        got = torch.func.jacrev(lambda *xs: module(*xs, is_causal=True), argnums=argnum)(q, k, v)
        want = torch.autograd.functional.jacobian(lambda *xs: _dense(segments, rates, True)(*xs), (q, k, v))[argnum]
        assert_close(got, want)


def test_vmap_of_grad_through_the_multihead_layers():
    """Per-sample parameter gradients (``functional_call``) of both multi-head presets equal
    a loop of autograd over the samples."""
    from attention import ImprovedMultiheadDilatedAttention, MultiheadDilatedAttention

    for cls in (MultiheadDilatedAttention, ImprovedMultiheadDilatedAttention):
        torch.manual_seed(0)
        layer = cls(8, 2, (4, 8), (1, 2), dtype=torch.float64)
        params = {name: p.detach() for name, p in layer.named_parameters()}
        x = torch.randn(3, 10, 8, dtype=torch.float64)

        def loss(params, sample):
            out, _ = torch.func.functional_call(layer, params, (sample[None],), {"is_causal": True})
            return out.square().sum()

        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
        for i in range(3):
            layer.zero_grad()
            layer(x[i : i + 1], is_causal=True)[0].square().sum().backward()
            for name, p in layer.named_parameters():
                assert_close(per_sample[name][i], p.grad)


# --------------------------------------------------- value head_dim (MLA)
@pytest.mark.parametrize("module_class", MODULES)
@pytest.mark.parametrize("is_causal", [False, True])
def test_value_head_dim_differs_from_the_query_key_head_dim(module_class, is_causal):
    """Multi-head latent attention's shapes (DeepSeek-V2: qk 192, v 128, here
    6 and 4) with GQA, padding and decode rows: outputs (b, q_len, h, d_v) and
    gradients equal the dense reference's."""
    segments, rates, n = (4, 8, 16), (1, 2, 4), 29
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, n, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, n, 2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, n, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    pad = torch.zeros(2, n, dtype=torch.bool)
    pad[1, -6:] = True
    module = module_class(segments, rates)
    for q_len in (n, 3):
        rows = q[:, n - q_len :]
        out = module(rows, k, v, is_causal=is_causal, key_padding_mask=pad)
        m = multiplicity(n, 4, segments, rates, "longnet", is_causal)
        expected = dense_attention(rows, k, v, weight=m, is_causal=is_causal, key_padding_mask=pad)
        assert out.shape == (2, q_len, 4, 4)
        assert_close(out, expected)
        for got, want in zip(grads(out, (q, k, v)), grads(expected, (q, k, v))):
            assert_close(got, want)


# --------------------------------------------------- public geometry
@pytest.mark.parametrize("scheme", ["longnet", "grouped"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"w{c[0]}-r{c[1]}-h{c[2]}-n{c[3]}")
def test_computed_pairs_count_the_rule_pairs_of_the_last_rows(scheme, case):
    """``computed_pairs`` (what tools count as useful work) is the number of
    (head, query, key) pairs the design's rule selects, summed over branches,
    for the last q_len rows; the module's public ``plan`` is the one it runs."""
    segments, rates, h, n = case
    if scheme == "grouped" and len(segments) > h:
        pytest.skip("grouped needs a head per branch")
    module = ImprovedDilatedAttention(segments, rates, scheme=scheme)
    plan = module.plan(h)
    assert plan == DilatedPlan.from_pattern(generate(DilatedSpec(segments, rates, h, scheme)))
    m = multiplicity(n, h, segments, rates, scheme, is_causal=False)
    for q_len in (n, 1, n // 3):
        assert dilated_plan.computed_pairs(plan, q_len, n) == int(m[:, n - q_len :].sum())
        assert len(plan.pieces(q_len, n)) == sum(len(dilated_plan.pieces(g, q_len, n)) for g in plan.groups)


def test_implementation_is_an_option_and_the_improved_class_its_preset():
    q, k, v = qkv(2, 19, 2, 3)
    fast = DilatedAttention((4, 8), (1, 2), implementation="fast")
    preset = ImprovedDilatedAttention((4, 8), (1, 2))
    assert fast.implementation == preset.implementation == "fast"
    assert DilatedAttention((4, 8), (1, 2)).implementation == "reference"
    assert_close(fast(q, k, v, is_causal=True), preset(q, k, v, is_causal=True), tol=0)
    assert repr(fast).endswith("implementation='fast')") and "implementation" not in repr(preset)
    with pytest.raises(ValueError, match="implementation must be one of 'reference', 'fast', 'flex', 'auto'; got 'fused'"):
        DilatedAttention((4,), (1,), implementation="fused")


@pytest.mark.parametrize("module_class", MODULES)
@pytest.mark.parametrize("is_causal", [False, True])
def test_a_nan_or_inf_in_a_padded_key_or_value_changes_nothing(module_class, is_causal):
    """Padded keys are removed, not added as a bias: NaN and Inf in their
    keys and values leave every output and gradient what the dense reference
    gives without them (q, k, v (1, 16, 2, 8), the last 3 keys padded)."""
    q, k, v = qkv(1, 16, 2, 8)
    pad = torch.zeros(1, 16, dtype=torch.bool)
    pad[:, -3:] = True
    k[:, -1], k[:, -2], v[:, -1], v[:, -3] = float("nan"), float("inf"), float("nan"), float("-inf")
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = module_class((8, 16), (1, 2))(*leaves, is_causal=is_causal, key_padding_mask=pad)
    clean = [q.clone().requires_grad_()] + [x.masked_fill(pad[..., None, None], 0.0).requires_grad_() for x in (k, v)]
    expected = dense_dilated_attention(*clean, (8, 16), (1, 2), is_causal=is_causal, key_padding_mask=pad)
    assert_close(out, expected)
    for got, want in zip(grads(out, leaves), grads(expected, clean)):
        assert_close(got, want)
