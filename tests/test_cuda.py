"""Every attention module on a CUDA device against float64 dense references
(issue 12, section 5): outputs and gradients in bfloat16, float16 and
float32, causal and key padding, grouped-query attention, lengths that are
not multiples of any segment or block, decode rows (fewer queries than
keys, bottom-right aligned: query row i is position kv_len - q_len + i,
docs/design.md section 7), the compile contract (docs/design.md section 4),
CUDA graphs (mode="reduce-overhead": bare modules, decode steps, and a
transformer block around each multi-head layer, in inference and training)
and Hugging Face ``generate`` with a static cache, compiled as transformers
compiles it.

Marked ``cuda`` and skipped without a device. ``PATTERNSTORE_TEST_DEVICE=cpu``
runs the same checks (those that do not need CUDA itself) on the CPU: a dry
run of this file's own logic where no GPU is lent.

References: ``dense_reference.dense_dilated_attention`` (from the design's
definition alone) and ``sparse_reference`` below (from the stored CSR layout),
both float64 on the CPU, fed the very values the device saw (inputs rounded to
the tested dtype, then widened). Grouped-query heads are repeated in the
reference (query head j reads key head j // (h / h_kv)); decode rows are the
last rows of the full-length reference.

Error measure: ||got - ref|| / ||ref|| over the whole tensor (RELATIVE_ERROR),
and every output finite; rows with no key at all must be exactly 0.

Order: the block-sparse correctness tests come last (each new dtype and mask
compiles flex_attention's forward and backward), so a run cut short by a time
limit (tools/gpu_check.sh) loses the fewest checks.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from attention import (
    BlockSparseAttention,
    DilatedAttention,
    ImprovedDilatedAttention,
    ImprovedMultiheadDilatedAttention,
    MultiheadBlockSparseAttention,
    MultiheadDilatedAttention,
)
from attention.kernels.attend import attend as kernels
from attention.dense_reference import block_pairs, dense_attention, dense_dilated_attention
from device_checks import (DEVICE, GRADIENT_FACTOR, HAVE_CUDA, RELATIVE_ERROR, assert_close, compile_dtype,
                           device_tensor, widened)
from patternstore import SparseSpec, generate

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        DEVICE.type == "cuda" and not HAVE_CUDA,
        reason="needs a CUDA device (PATTERNSTORE_TEST_DEVICE=cpu runs the device-independent checks on the CPU)",
    ),
]
needs_cuda = pytest.mark.skipif(
    not (DEVICE.type == "cuda" and HAVE_CUDA), reason="CUDA graphs and the CUDA kernel choice need a CUDA device"
)

# Multi-head layers add four rounded stages (input projection, attention,
# LayerNorm, output projection) around the attention.
MULTIHEAD_FACTOR = 2.0
DTYPES = [torch.bfloat16, torch.float16, torch.float32]

SEGMENTS, RATES = (32, 64, 128), (1, 2, 4)
HEADS, HEAD_DIM = 4, 64


# ------------------------------------------------------------------ helpers


def padding_mask(batch: int, kv_len: int) -> Tensor:
    """Right padding: row 0 unpadded, row 1 padded after its first third, so
    late queries whose pattern reaches only padded keys have no key at all
    (they must output exactly 0)."""
    mask = torch.zeros(batch, kv_len, dtype=torch.bool)
    if batch > 1:
        mask[1, max(1, kv_len // 3):] = True
    return mask


def with_decode_rows(q: Tensor, kv_len: int) -> Tensor:
    """q (b, m, h, d) as the last m rows of a kv_len-row query (zero filler
    above: those rows are computed and dropped, they touch nothing else)."""
    filler = q.new_zeros(q.shape[0], kv_len - q.shape[1], *q.shape[2:])
    return torch.cat([filler, q], dim=1)


def repeat_kv(x: Tensor, heads: int) -> Tensor:
    return x.repeat_interleave(heads // x.shape[2], dim=2)


def dilated_reference(q, k, v, *, causal, pad, segments=SEGMENTS, rates=RATES) -> Tensor:
    kv_len, q_len = k.shape[1], q.shape[1]
    h = q.shape[2]
    out = dense_dilated_attention(
        with_decode_rows(q, kv_len), repeat_kv(k, h), repeat_kv(v, h), segments, rates,
        is_causal=causal, key_padding_mask=pad,
    )
    return out[:, kv_len - q_len:]


def sparse_reference(q, k, v, spec: SparseSpec, *, causal, pad) -> Tensor:
    """``dense_attention`` over the layout's ``block_pairs`` (the CSR read
    back), with ``causal``; decode rows are the last rows."""
    pattern = generate(spec)
    pairs = block_pairs(pattern["kv_num_blocks"], pattern["kv_indices"], k.shape[1], spec.block_size)
    return dense_attention(q, k, v, weight=pairs, is_causal=causal, key_padding_mask=pad)


def check_module(module: nn.Module, reference, *, dtype, batch, q_len, kv_len, heads, kv_heads, causal,
                 padded, seed, factor: float = 1.0, head_dim: int = HEAD_DIM, v_head_dim: int = HEAD_DIM) -> None:
    """module(q, k, v) on DEVICE in ``dtype`` against ``reference`` (float64
    CPU): output, dead rows exactly 0, and the gradients of q, k and v."""
    generator = torch.Generator().manual_seed(seed)
    q = device_tensor(batch, q_len, heads, head_dim, dtype=dtype, generator=generator)
    k = device_tensor(batch, kv_len, kv_heads, head_dim, dtype=dtype, generator=generator)
    v = device_tensor(batch, kv_len, kv_heads, v_head_dim, dtype=dtype, generator=generator)
    pad = padding_mask(batch, kv_len) if padded else None
    out = module(q, k, v, is_causal=causal, key_padding_mask=None if pad is None else pad.to(DEVICE))
    assert out.dtype == dtype and out.device.type == DEVICE.type
    q64, k64, v64 = (widened(x) for x in (q, k, v))
    want = reference(q64, k64, v64, causal=causal, pad=pad)
    tolerance = RELATIVE_ERROR[dtype] * factor
    assert_close(out, want, tolerance, "output")
    dead = want.detach().abs().sum(-1) == 0  # rows with no key
    assert (out.detach().cpu()[dead] == 0).all(), "a row with no key must output exactly 0"
    grad_out = device_tensor(*out.shape, dtype=dtype, generator=generator, grad=False)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = torch.autograd.grad(want, (q64, k64, v64), widened(grad_out))
    # dq and dk are sums of terms dS_it k_t (and dS_it q_i) with |dS_it| <=
    # P_it |dO_i . v_t - delta_i|, about ||dO_i|| for unit-normal inputs
    # (scale * ||k_t|| is about 1); the kernels round dS to the input dtype, so
    # their error is u-relative to those TERMS, which cancel where a row's keys
    # are alike: a one-key row has dq = dk = 0 exactly, and a row of two or
    # three keys (segments [1, 2], kv_len 2, bf16) had ||dq|| = 0.35 against
    # ||dO|| = 11 and an error of 0.012 = u/3 * ||dO|| (float32: 1e-6
    # relative, so not a wrong gradient). The error is therefore measured
    # against max(||want||, ||dO||).
    floor = float(grad_out.detach().double().norm())
    for name, a, b in zip("qkv", got, expected):
        assert_close(a, b, tolerance * GRADIENT_FACTOR, f"grad {name}", floor)


# ------------------------------------------------------------- dilated
# (batch, q_len, kv_len, kv_heads, causal, padded): whole segments; not a
# multiple of any segment (GQA); shorter than every segment (padding);
# multi-query causal padded; a longer one with many segments; decode rows.
DILATED_CASES = {
    "whole-segments": (2, 256, 256, 4, False, False),
    "tail-gqa-causal": (2, 300, 300, 2, True, False),
    "short-padded": (2, 77, 77, 4, False, True),
    "mqa-causal-padded": (2, 531, 531, 1, True, True),
    "long": (1, 2053, 2053, 4, False, False),
    "decode-one-row": (2, 1, 300, 2, True, False),
    "decode-rows-padded": (2, 7, 531, 4, False, True),
    "decode-rows-causal-padded": (2, 5, 1000, 1, True, True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DILATED_CASES)
def test_improved_dilated_attention_matches_reference(case, dtype):
    batch, q_len, kv_len, kv_heads, causal, padded = DILATED_CASES[case]
    check_module(ImprovedDilatedAttention(SEGMENTS, RATES), dilated_reference, dtype=dtype, batch=batch,
                 q_len=q_len, kv_len=kv_len, heads=HEADS, kv_heads=kv_heads, causal=causal, padded=padded, seed=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["tail-gqa-causal", "short-padded", "decode-rows-causal-padded"])
def test_dilated_attention_matches_reference(case, dtype):
    batch, q_len, kv_len, kv_heads, causal, padded = DILATED_CASES[case]
    check_module(DilatedAttention(SEGMENTS, RATES), dilated_reference, dtype=dtype, batch=batch, q_len=q_len,
                 kv_len=kv_len, heads=HEADS, kv_heads=kv_heads, causal=causal, padded=padded, seed=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("implementation", ["fast", "reference"])
@pytest.mark.parametrize("case", ["tail-gqa-causal", "decode-rows-causal-padded"])
def test_dilated_value_head_dim_differs_from_query_key(case, implementation, dtype):
    """Multi-head latent attention's shapes (DeepSeek-V2: qk 192, v 128; here
    96 and 64, the same ratio) through both implementations."""
    batch, q_len, kv_len, kv_heads, causal, padded = DILATED_CASES[case]
    check_module(DilatedAttention(SEGMENTS, RATES, implementation=implementation), dilated_reference, dtype=dtype,
                 batch=batch, q_len=q_len, kv_len=kv_len, heads=HEADS, kv_heads=kv_heads, causal=causal,
                 padded=padded, seed=6, head_dim=96, v_head_dim=64)


@needs_cuda
@pytest.mark.parametrize("case, dtype", [
    ("tail-gqa-causal", torch.bfloat16), ("mqa-causal-padded", torch.bfloat16), ("short-padded", torch.float16),
    ("long", torch.float32), ("mqa-causal-padded", torch.float32), ("decode-rows-causal-padded", torch.bfloat16),
], ids=str)
def test_flex_dilated_attention_matches_reference(case, dtype):
    """The fused FlexAttention path (one compiled flex call over the residue
    order; decode rows take the per-branch path), outputs and the gradients
    of q, k and v (flex's backward) against the float64 reference, within
    check_module's tolerances: RELATIVE_ERROR[dtype], times GRADIENT_FACTOR
    for the gradients. Every dtype; causal, padding, GQA and MQA and lengths
    that are no multiple of a segment or of the flex block in bf16 and fp32
    (float32's 1e-4 bound also fails a TF32 or a wrong GQA sum of dk, dv).
    Flex compiles a backward on CUDA only, so this runs on a device."""
    batch, q_len, kv_len, kv_heads, causal, padded = DILATED_CASES[case]
    check_module(DilatedAttention(SEGMENTS, RATES, implementation="flex"), dilated_reference, dtype=dtype,
                 batch=batch, q_len=q_len, kv_len=kv_len, heads=HEADS, kv_heads=kv_heads, causal=causal,
                 padded=padded, seed=7)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_dilated_attention_property(data):
    """Any branches, head counts (GQA included), lengths and decode rows, bf16:
    ImprovedDilatedAttention equals the reference."""
    k = data.draw(st.integers(1, 3), label="branches")
    segments = data.draw(st.lists(st.integers(1, 160), min_size=k, max_size=k), label="segments")
    rates = [data.draw(st.integers(1, min(w, 6)), label="rate") for w in segments]
    heads = data.draw(st.sampled_from([1, 2, 4, 8]), label="heads")
    kv_heads = data.draw(st.sampled_from([h for h in (1, 2, 4, 8) if heads % h == 0]), label="kv_heads")
    kv_len = data.draw(st.integers(1, 420), label="kv_len")
    q_len = data.draw(st.sampled_from(sorted({kv_len, 1, max(1, kv_len // 3)})), label="q_len")
    causal, padded = data.draw(st.booleans(), label="causal"), data.draw(st.booleans(), label="padded")

    def reference(q, k, v, *, causal, pad):
        return dilated_reference(q, k, v, causal=causal, pad=pad, segments=segments, rates=rates)

    check_module(ImprovedDilatedAttention(segments, rates), reference, dtype=torch.bfloat16, batch=2, q_len=q_len,
                 kv_len=kv_len, heads=heads, kv_heads=kv_heads, causal=causal, padded=padded, seed=kv_len)


def test_large_segments_and_head_dim_128():
    """The benchmark's shape family at a small length: segments 2048..16384
    and rates 1..8 on 16 heads of 128 (every branch clipped to the length,
    with a tail), bf16."""
    segments, rates = (2048, 4096, 8192, 16384), (1, 2, 4, 8)
    generator = torch.Generator().manual_seed(3)
    n, h = 2100, 16
    q, k, v = (torch.randn(1, n, h, 128, generator=generator, dtype=torch.float64).to(DEVICE, torch.bfloat16)
               for _ in range(3))
    out = ImprovedDilatedAttention(segments, rates)(q, k, v, is_causal=True)
    want = dense_dilated_attention(*(widened(x) for x in (q, k, v)), segments, rates, is_causal=True)
    assert_close(out, want, RELATIVE_ERROR[torch.bfloat16], "output")


# ------------------------------------------------------------ dispatch
@needs_cuda
@pytest.mark.parametrize(
    "dtype,head_dim,padded",
    [(torch.bfloat16, 64, False), (torch.float16, 128, False), (torch.bfloat16, 256, False),
     (torch.float32, 64, False), (torch.bfloat16, 64, True)],
    ids=["bf16-d64", "fp16-d128", "bf16-d256", "fp32", "bf16-masked"],
)
def test_dispatch_runs_the_kernel_it_chooses(monkeypatch, dtype, head_dim, padded):
    """Half types without a mask take the preferred half kernel (cuDNN up to
    CUDNN_MAX_HEAD_DIM, flash above), float32 the efficient kernel, masked
    half types the efficient kernel on float32 copies, and a dilated module's
    forward and backward call that kernel and no other."""
    expected = ("cuda_efficient" if dtype == torch.float32 else "cuda_efficient_float32" if padded
                else kernels.PREFERENCES["cuda"][0] if head_dim <= kernels.CUDNN_MAX_HEAD_DIM else "cuda_flash")
    assert kernels.choose_kernel("cuda", dtype, head_dim, padded) == expected
    calls = []
    for name, kernel in list(kernels.KERNELS.items()):
        def forward(*args, _name=name, _kernel=kernel):
            calls.append((_name, "forward"))
            return _kernel.forward(*args)

        def backward(*args, _name=name, _kernel=kernel):
            calls.append((_name, "backward"))
            return _kernel.backward(*args)
        monkeypatch.setitem(kernels.KERNELS, name, kernel._replace(forward=forward, backward=backward))
    generator = torch.Generator().manual_seed(8)
    q, k, v = (device_tensor(2, 300, HEADS, head_dim, dtype=dtype, generator=generator) for _ in range(3))
    pad = padding_mask(2, 300).to(DEVICE) if padded else None
    out = ImprovedDilatedAttention(SEGMENTS, RATES)(q, k, v, is_causal=True, key_padding_mask=pad)
    out.float().sum().backward()
    assert {name for name, _ in calls} == {expected}, calls
    assert {step for _, step in calls} == {"forward", "backward"}


@needs_cuda
@pytest.mark.parametrize("half_kernel", ["cuda_flash", "cuda_cudnn"])
@pytest.mark.parametrize("case", ["tail-gqa-causal", "decode-rows-causal-padded"])
def test_both_fused_half_kernels_match_reference(monkeypatch, half_kernel, case):
    """The default half kernel was chosen by speed; both must be exact, so a
    device where the other wins can switch (bf16; GQA; decode rows; no
    padding: a mask takes the efficient kernel)."""
    order = kernels.PREFERENCES["cuda"]
    monkeypatch.setitem(kernels.PREFERENCES, "cuda", (half_kernel, *(name for name in order if name != half_kernel)))
    batch, q_len, kv_len, kv_heads, causal, padded = DILATED_CASES[case]
    check_module(ImprovedDilatedAttention(SEGMENTS, RATES), dilated_reference, dtype=torch.bfloat16, batch=batch,
                 q_len=q_len, kv_len=kv_len, heads=HEADS, kv_heads=kv_heads, causal=causal, padded=False, seed=9)


def embed_inputs(batch: int, n: int, embed: int, dtype, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return device_tensor(batch, n, embed, dtype=dtype, generator=generator)


class ReferenceAttention(nn.Module):
    """A multi-head layer's attention replaced by a float64 reference."""

    def __init__(self, reference) -> None:
        super().__init__()
        self.reference = reference

    def forward(self, q, k, v, is_causal=False, key_padding_mask=None):
        return self.reference(q, k, v, causal=is_causal, pad=key_padding_mask)


def check_multihead(layer: nn.Module, reference, *, dtype, n: int, causal: bool, padded: bool, seed: int) -> None:
    """The layer on DEVICE in ``dtype`` against the same weights in float64
    on the CPU with the attention replaced by ``reference``: output and the
    gradients of the input and of every parameter."""
    expected_layer = copy.deepcopy(layer).to("cpu", torch.float64)
    expected_layer.attention = ReferenceAttention(reference)
    layer = layer.to(DEVICE, dtype)
    generator = torch.Generator().manual_seed(seed)
    x = device_tensor(2, n, layer.embed_dim, dtype=dtype, generator=generator)
    pad = padding_mask(2, n) if padded else None
    out, _ = layer(x, key_padding_mask=None if pad is None else pad.to(DEVICE), is_causal=causal)
    x64 = widened(x)
    want, _ = expected_layer(x64, key_padding_mask=pad, is_causal=causal)
    tolerance = RELATIVE_ERROR[dtype] * MULTIHEAD_FACTOR
    assert_close(out, want, tolerance, "output")
    grad_out = device_tensor(*out.shape, dtype=dtype, generator=generator, grad=False)
    names = [name for name, _ in layer.named_parameters()]
    got = torch.autograd.grad(out, [x, *layer.parameters()], grad_out)
    expected = torch.autograd.grad(want, [x64, *expected_layer.parameters()], widened(grad_out))
    for name, a, b in zip(["input", *names], got, expected):
        if b.norm() < 1e-9:
            # The key projection's bias: softmax is invariant to the per-row
            # constant it adds, so its exact gradient is 0 and the device's is
            # rounding noise with no scale to compare with (finiteness is checked).
            assert torch.isfinite(a).all(), f"grad {name}: non-finite values"
            continue
        assert_close(a, b, tolerance * GRADIENT_FACTOR, f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cls", [ImprovedMultiheadDilatedAttention, MultiheadDilatedAttention], ids=lambda c: c.__name__)
def test_multihead_dilated_matches_reference(cls, dtype):
    torch.manual_seed(4)
    layer = cls(HEADS * HEAD_DIM, HEADS, SEGMENTS, RATES)
    check_multihead(layer, dilated_reference, dtype=dtype, n=300, causal=True, padded=True, seed=4)


# ------------------------------------------------------------- compile
class Block(nn.Module):
    """A pre-norm transformer block around a multi-head attention layer."""

    def __init__(self, attention: nn.Module, embed: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(embed), nn.LayerNorm(embed)
        self.attention = attention
        self.mlp = nn.Sequential(nn.Linear(embed, 4 * embed), nn.GELU(), nn.Linear(4 * embed, embed))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x), is_causal=True)[0]
        return x + self.mlp(self.norm2(x))




def check_compiled(model: nn.Module, make_inputs, **kwargs) -> None:
    """Cold start with fullgraph=True; compiled == eager (output and input
    gradients); then three calls at the same shape with recompiles made errors."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    inputs = make_inputs(0)
    out = compiled(*inputs, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    expected = model(*inputs, **kwargs)
    expected = expected[0] if isinstance(expected, tuple) else expected
    tolerance = RELATIVE_ERROR[out.dtype]
    assert_close(out, expected, tolerance, "compiled output")
    got = torch.autograd.grad(out.float().square().sum(), inputs)
    want = torch.autograd.grad(expected.float().square().sum(), inputs)
    for a, b in zip(got, want):
        assert_close(a, b, tolerance * GRADIENT_FACTOR, "compiled gradient")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(1, 4):
            out = compiled(*make_inputs(seed), **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            out.float().sum().backward()


def head_inputs(n: int, kv_heads: int = HEADS):
    def make(seed: int):
        generator = torch.Generator().manual_seed(100 + seed)
        q = device_tensor(2, n, HEADS, HEAD_DIM, dtype=compile_dtype(), generator=generator)
        return [q] + [device_tensor(2, n, kv_heads, HEAD_DIM, dtype=compile_dtype(), generator=generator)
                      for _ in range(2)]
    return make


def embedded_inputs(n: int, embed: int):
    def make(seed: int):
        return [embed_inputs(2, n, embed, compile_dtype(), 200 + seed)]
    return make


def test_compiled_improved_dilated_attention():
    check_compiled(ImprovedDilatedAttention(SEGMENTS, RATES), head_inputs(300, kv_heads=2), is_causal=True)


def test_compiled_block_sparse_attention():
    check_compiled(BlockSparseAttention("bigbird", block_size=64), head_inputs(640))


@pytest.mark.parametrize("kind", ["dilated", "sparse"])
def test_compiled_transformer_block(kind):
    embed = HEADS * HEAD_DIM
    if kind == "dilated":
        attention = ImprovedMultiheadDilatedAttention(embed, HEADS, SEGMENTS, RATES)
    else:
        attention = MultiheadBlockSparseAttention(embed, HEADS, "local", block_size=64)
    torch.manual_seed(7)
    block = Block(attention, embed).to(DEVICE, compile_dtype())
    check_compiled(block, embedded_inputs(320, embed))


@contextlib.contextmanager
def counted_cuda_graphs():
    """{"captures": n, "replays": m}: calls of ``torch.cuda.CUDAGraph``'s
    ``capture_begin`` and ``replay`` (what cudagraph trees record and run)
    while open. A run with no skip but no replay either used no CUDA graph
    (cudagraph trees run each new shape eagerly first), so the checks count
    replays. Captures include the tree manager's one empty graph."""
    counts = {"captures": 0, "replays": 0}
    graph = torch.cuda.CUDAGraph
    capture_begin, replay = graph.capture_begin, graph.replay

    def counted_capture_begin(self, *args, **kwargs):
        counts["captures"] += 1
        return capture_begin(self, *args, **kwargs)

    def counted_replay(self, *args, **kwargs):
        counts["replays"] += 1
        return replay(self, *args, **kwargs)

    graph.capture_begin, graph.replay = counted_capture_begin, counted_replay
    try:
        yield counts
    finally:
        graph.capture_begin, graph.replay = capture_begin, replay


def check_cuda_graphs(model: nn.Module, make_inputs, training: bool, factor: float = 1.0, **kwargs) -> None:
    """mode="reduce-overhead", fullgraph=True, four calls (warm-up, record,
    two replays), each with ``torch.compiler.cudagraph_mark_step_begin()``
    and its results cloned before the next: every call equals eager (output
    within RELATIVE_ERROR x ``factor``; in training the input gradients
    within GRADIENT_FACTOR times that); no cudagraph skip; no recompile after
    the first call; and the graphs were replayed (at least once per graph in
    each of the last two calls: forward, and backward in training)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with counted_cuda_graphs() as graphs:
        for seed in range(4):
            inputs = make_inputs(seed)
            with torch._dynamo.config.patch(error_on_recompile=seed > 0), torch.set_grad_enabled(training):
                torch.compiler.cudagraph_mark_step_begin()
                out = compiled(*inputs, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                got_out = out.detach().clone()
                if training:
                    got_grads = [g.clone() for g in torch.autograd.grad(out.float().square().sum(), inputs)]
            with torch.set_grad_enabled(training):
                expected = model(*inputs, **kwargs)
                expected = expected[0] if isinstance(expected, tuple) else expected
            tolerance = RELATIVE_ERROR[expected.dtype] * factor
            assert_close(got_out, expected, tolerance, f"call {seed}: output")
            if training:
                want = torch.autograd.grad(expected.float().square().sum(), inputs)
                for a, b in zip(got_grads, want):
                    assert_close(a, b, tolerance * GRADIENT_FACTOR, f"call {seed}: gradient")
    skips = counters["inductor"]["cudagraph_skips"]
    assert skips == 0, f"CUDA graphs were skipped {skips} time(s) (see the log for the reason)"
    minimum = 2 * (2 if training else 1)
    assert graphs["replays"] >= minimum, f"CUDA graphs replayed {graphs['replays']} time(s), expected >= {minimum}"


@needs_cuda
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_cuda_graphs_dilated(training):
    check_cuda_graphs(ImprovedDilatedAttention(SEGMENTS, RATES), head_inputs(300), training)


@needs_cuda
def test_cuda_graphs_block_sparse():
    """Whether flex_attention on a stored BlockMask can be captured (issue 12
    section 4 asks to say which): inference."""
    check_cuda_graphs(BlockSparseAttention("local", block_size=64), head_inputs(640), training=False)


def decode_inputs(kv_len: int, kv_heads: int):
    """One query row (batch 2) against ``kv_len`` keys: a decode step."""
    def make(seed: int):
        generator = torch.Generator().manual_seed(300 + seed)
        q = device_tensor(2, 1, HEADS, HEAD_DIM, dtype=compile_dtype(), generator=generator, grad=False)
        return [q] + [device_tensor(2, kv_len, kv_heads, HEAD_DIM, dtype=compile_dtype(), generator=generator,
                                    grad=False) for _ in range(2)]
    return make


DECODE_MODULES = {
    # The fast path's strided views (GQA); the block-sparse gather path
    # (q_len < kv_len: the tiles, row groups held by the graph as constants).
    "dilated": (lambda: ImprovedDilatedAttention(SEGMENTS, RATES), 300, 2),
    "block-sparse": (lambda: BlockSparseAttention("local", block_size=64, attention="unidirectional"), 640, 4),
}


@needs_cuda
@pytest.mark.parametrize("kind", DECODE_MODULES)
def test_cuda_graphs_decode_step(kind):
    """A decode step (one query row against a fixed-length cache) is
    captured and replayed: no host read inside the graph (the dilated plan
    and the sparse layout with its row groups are trace-time constants)."""
    make_module, kv_len, kv_heads = DECODE_MODULES[kind]
    check_cuda_graphs(make_module(), decode_inputs(kv_len, kv_heads), training=False, is_causal=True)


BLOCK_ATTENTIONS = {
    "dilated-fast": lambda embed: ImprovedMultiheadDilatedAttention(embed, HEADS, SEGMENTS, RATES),
    "dilated-flex": lambda embed: MultiheadDilatedAttention(embed, HEADS, SEGMENTS, RATES, implementation="flex"),
    "block-sparse": lambda embed: MultiheadBlockSparseAttention(embed, HEADS, "local", block_size=64),
}


@needs_cuda
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("kind", BLOCK_ATTENTIONS)
def test_cuda_graphs_transformer_block(kind, training):
    """``Block`` (pre-norm, causal) around each multi-head layer under
    mode="reduce-overhead": the fast dilated kernels, the fused flex dilated
    path (one flex call, its BlockMask a trace-time constant; flex has a
    backward on CUDA) and block-sparse (flex on the stored layout), in
    inference and training, checked by ``check_cuda_graphs`` within
    MULTIHEAD_FACTOR of the dtype's bound (LayerNorms, projections and the
    MLP round around the attention, differently fused compiled and eager)."""
    embed = HEADS * HEAD_DIM
    torch.manual_seed(7)
    block = Block(BLOCK_ATTENTIONS[kind](embed), embed).to(DEVICE, compile_dtype())
    check_cuda_graphs(block, embedded_inputs(320, embed), training, factor=MULTIHEAD_FACTOR)


# ------------------------------------------------ Hugging Face generate
HF_PATTERNS = {
    "dilated": ("patternstore_dilated", {"segment_lengths": [4, 8], "dilation_rates": [1, 2]}),
    "sparse": ("patternstore_sparse", {"kind": "bigbird", "block_size": 4, "num_random_blocks": 1,
                                       "num_sliding_window_blocks": 3, "num_global_blocks": 1,
                                       "attention": "unidirectional"}),
}
HF_VOCAB, HF_PROMPT, HF_NEW_TOKENS = 96, 13, 6
@pytest.mark.parametrize("pattern", sorted(HF_PATTERNS))
def test_hf_generate_with_a_static_cache_compiled_equals_eager(pattern):
    """transformers' own fast decoding path: ``generate(...,
    cache_implementation="static")`` compiles the decode steps' forward
    (``get_compiled_call``) with CompileConfig's defaults (inductor,
    mode="reduce-overhead"; on the CPU dry run aot_eager, which checks the
    same trace without code generation) and fullgraph=True. A tiny float32
    Llama (2 layers, GQA 4/2, a left-padded batch of 2) with each registered
    implementation: the tokens equal the uncompiled generate's (the same
    model, ``disable_compile=True``) and every step's logits are within
    RELATIVE_ERROR[float32]; one decode graph for every step (a static
    cache's mask keeps one shape, attention.hf.padding); on CUDA no cudagraph
    skip and the decode steps replay CUDA graphs (the op's decode step reads
    nothing on the host, attention.hf.decode)."""
    pytest.importorskip("transformers")
    import attention.hf.registration as hf
    from torch._dynamo.utils import counters
    from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM

    hf.register()
    impl, settings = HF_PATTERNS[pattern]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=HF_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=None, eos_token_id=None,
        attn_implementation=impl, patternstore_attention=settings,
    )
    model = LlamaForCausalLM(config).to(DEVICE).eval()
    ids = torch.randint(1, HF_VOCAB, (2, HF_PROMPT), generator=torch.Generator().manual_seed(12))
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0  # row 1 left-padded, as generate pads
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    options = dict(attention_mask=mask, max_new_tokens=HF_NEW_TOKENS, min_new_tokens=HF_NEW_TOKENS,
                   do_sample=False, cache_implementation="static", return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        want = model.generate(ids, disable_compile=True, **options)
    if DEVICE.type == "cuda":
        compile_config = CompileConfig(fullgraph=True)
    else:
        compile_config = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
        compile_config._compile_all_devices = True  # generate compiles on CUDA only unless told
    torch._dynamo.reset()
    counters.clear()
    with counted_cuda_graphs() as graphs, torch.no_grad():
        got = model.generate(ids, compile_config=compile_config, **options)
    assert torch.equal(got.sequences, want.sequences), f"{got.sequences.tolist()} != {want.sequences.tolist()}"
    assert len(got.logits) == len(want.logits) == HF_NEW_TOKENS
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        assert_close(a, b, RELATIVE_ERROR[torch.float32], f"step {step} logits")
    compiled_graphs = counters["stats"]["unique_graphs"]
    assert compiled_graphs == 1, f"{compiled_graphs} graphs compiled for {HF_NEW_TOKENS - 1} decode steps"
    skips = counters["inductor"]["cudagraph_skips"]
    if DEVICE.type == "cuda":
        assert skips == 0, f"CUDA graphs were skipped {skips} time(s) (see the log for the reason)"
        assert graphs["replays"] >= 2, f"{graphs['replays']} CUDA graph replays in {HF_NEW_TOKENS - 1} decode steps"


# --------------------------------------------------------- block-sparse
# (kind, params, block_size, batch, q_len, kv_len, kv_heads, is_causal, padded)
SPARSE_CASES = {
    "bigbird-tail-padded": ("bigbird", {}, 64, 2, 1000, 1000, 4, False, True),
    "local-causal": ("local", {}, 64, 2, 640, 640, 4, False, False),
    "bslongformer-gqa-causal": ("bslongformer", {"global_block_indices": (0, 3)}, 128, 1, 700, 700, 2, True, False),
    "bigbird-per-head": ("bigbird", {"different_layout_per_head": True}, 64, 2, 333, 333, 4, False, False),
    "local-decode-rows": ("local", {}, 64, 2, 3, 700, 4, False, True),
}


def sparse_module_case(case: str, dtype: torch.dtype, seed: int) -> None:
    kind, params, block_size, batch, q_len, kv_len, kv_heads, causal, padded = SPARSE_CASES[case]
    module = BlockSparseAttention(kind, block_size=block_size, **params)
    spec = SparseSpec(kind, seq_len=kv_len, block_size=block_size, num_heads=HEADS, **params)
    unidirectional = spec.params["attention"] == "unidirectional"

    def reference(q, k, v, *, causal, pad):
        return sparse_reference(q, k, v, spec, causal=causal or unidirectional, pad=pad)

    check_module(module, reference, dtype=dtype, batch=batch, q_len=q_len, kv_len=kv_len, heads=HEADS,
                 kv_heads=kv_heads, causal=causal, padded=padded, seed=seed)


# Every case in bf16 (the training dtype); fp16 and fp32 on one each: every
# new (dtype, mask) compiles flex_attention's forward and backward, seconds
# apiece on a fresh machine.
SPARSE_RUNS = [(case, torch.bfloat16) for case in SPARSE_CASES] + [
    ("local-causal", torch.float16), ("bigbird-tail-padded", torch.float32),
]


@pytest.mark.parametrize("case,dtype", SPARSE_RUNS, ids=[f"{c}-{d}" for c, d in SPARSE_RUNS])
def test_block_sparse_attention_matches_reference(case, dtype):
    sparse_module_case(case, dtype, seed=5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_multihead_block_sparse_matches_reference(dtype):
    torch.manual_seed(6)
    layer = MultiheadBlockSparseAttention(HEADS * HEAD_DIM, HEADS, "bigbird", block_size=64)
    spec = SparseSpec("bigbird", seq_len=500, block_size=64, num_heads=HEADS)

    def reference(q, k, v, *, causal, pad):
        return sparse_reference(q, k, v, spec, causal=causal, pad=pad)

    check_multihead(layer, reference, dtype=dtype, n=500, causal=False, padded=True, seed=6)
