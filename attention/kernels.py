"""The kernel layer every attention module shares (docs/design.md
section 5).

Guarantees:
- ``check_attention_inputs``, ``check_softmax_scale``, ``check_dropout`` and
  ``check_is_causal`` are the ONE validation of those concepts: every module
  and functional entry point calls them, so a mistake gets one message
  (ValueError naming the field and the allowed values) before any work.
- ``attend(q, k, v, causal=, scale=, key_mask=)`` on ``(B, H, M, d)`` query
  and ``(B, H_kv, N, d)`` key/value views, ``M <= N``, ``H % H_kv == 0``
  (query head ``j`` reads key/value head ``j // (H / H_kv)``), returns
  ``(out, lse)``: ``out (B, H, M, d)`` in q's dtype or its accumulate dtype,
  ``lse`` natural log, ``lse_dtype(q.dtype)``, exactly ``(B, H, M)``. A row
  with no key gets out 0 and lse ``EMPTY_LSE``. Causal with ``M < N`` is
  BOTTOM-RIGHT aligned: query row ``i`` is position ``N - M + i``.
- ``attend_backward`` returns ``(dq, dk, dv)`` given the FINAL ``out`` and
  ``lse`` of the rows (which may merge several calls): with
  ``P = exp(S - lse)``, ``dS = P * (dO v^T - rowsum(dO * out))``; that is
  the exact gradient of one softmax over every key the rows attend, across
  calls.
- Inputs may have any strides: a tensor whose last dimension is not
  contiguous is copied (the fused kernels read rows with a unit stride and
  return wrong numbers otherwise, issue 10); everything else is passed as a
  view.

Dispatch (``choose_kernel``) is by device TYPE, dtype, head_dim and whether a
key mask is given; the device type may be given explicitly (``backend=``) so
that the CUDA branches run in CI on ``meta`` tensors (the fused CUDA ops have
meta kernels). ``KERNELS`` maps each choice to its forward and backward.

NaN: a NaN in a future KEY never reaches an earlier query (its score is
masked to -inf before the exponential). A NaN in a future VALUE does, in the
fused kernels as in ``F.scaled_dot_product_attention``: a masked probability
is 0 and ``0 * NaN`` is NaN in the tile product of a causal diagonal block.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

__all__ = [
    "EMPTY_LSE",
    "KERNELS",
    "CUDA_HALF_KERNEL",
    "CUDNN_MAX_HEAD_DIM",
    "FLASH_MAX_HEAD_DIM",
    "accumulate_dtype",
    "attend",
    "attend_backward",
    "check_attention_inputs",
    "check_dropout",
    "check_is_causal",
    "check_softmax_scale",
    "choose_kernel",
    "default_scale",
    "lse_dtype",
    "merge_",
]

# The log-sum-exp of a row with no key: finite, so merges need no NaN guards
# (logaddexp(E, E) rounds to E, and a part with lse E gets weight 0 beside any
# real one), and exp(S - E) is still 0 for the -inf scores of such a row in a
# backward.
EMPTY_LSE = -1e30
_NEG_INF = float("-inf")

_HALF = (torch.float16, torch.bfloat16)


# -------------------------------------------------------------- validation
def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None) -> None:
    """ValueError naming the field unless q is ``(batch, q_len, heads,
    head_dim)``, k and v ``(batch, kv_len, kv_heads, head_dim)`` with
    ``kv_len >= q_len`` and ``heads % kv_heads == 0``, all floating, one dtype
    and device, nothing empty; ``key_padding_mask`` None or ``(batch,
    kv_len)`` bool (True = padding) on that device."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, seq, heads, head_dim), got shape {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape (batch, kv_len, kv_heads, head_dim); got {tuple(k.shape)}, {tuple(v.shape)}")
    b, q_len, h, d = q.shape
    kb, kv_len, h_kv, kd = k.shape
    if (b, d) != (kb, kd):
        raise ValueError(
            f"q and k must have the same batch and head_dim; got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if q.numel() == 0 or k.numel() == 0:
        raise ValueError(f"q, k and v must not be empty, got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    if q_len > kv_len:
        raise ValueError(f"q_len must be <= kv_len (queries are the last q_len positions); got q_len={q_len}, kv_len={kv_len}")
    if h % h_kv:
        raise ValueError(f"the number of query heads must be a multiple of the key/value heads (GQA); got heads={h}, kv_heads={h_kv}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise ValueError("key_padding_mask must be a bool tensor (True = padding)")
        if tuple(key_padding_mask.shape) != (b, kv_len):
            raise ValueError(
                f"key_padding_mask must have shape (batch, kv_len) = {(b, kv_len)}, got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q on {q.device}")


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_softmax_scale(softmax_scale: object) -> Optional[float]:
    """None (1/sqrt(head_dim)) or a finite number > 0, as a float."""
    if softmax_scale is None:
        return None
    if not (_is_real(softmax_scale) and math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be None or a finite number > 0, got {softmax_scale!r}")
    return float(softmax_scale)


def check_dropout(dropout: object) -> float:
    """A probability in [0, 1), as a float."""
    if not (_is_real(dropout) and 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    return float(dropout)


def check_is_causal(is_causal: object) -> bool:
    """True or False: a truthy string or number is a mistake, not a flag."""
    if not isinstance(is_causal, bool):
        raise ValueError(f"is_causal must be True or False, got {is_causal!r}")
    return is_causal


def default_scale(q: Tensor, softmax_scale: Optional[float]) -> float:
    """``softmax_scale``, or ``1 / sqrt(head_dim)`` of q when it is None."""
    return 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)


# --------------------------------------------------------------- dtypes
# Two rules. Explicit arithmetic (the matmul kernel, the block-sparse gather
# tiles, the plain reference) computes in ``accumulate_dtype``: float32 for
# half types. Merged outputs and gradient sums that live as long as a whole
# call (the dilated fast path's output, dq, dk, dv) are held in the INPUT
# dtype: each fused kernel rounds its part to that dtype anyway, a merge
# computes its lerp in float32 and rounds once, so k parts cost k roundings
# instead of one (bf16, 4 branches: about 2x the error of one dense kernel,
# within tests/test_cuda.py's 2.5u bound), while a float32 output plus the
# final cast made the forward's peak 3.0x the output (H100 and CPU alike:
# tools/bench_gpu.py, tools/bench_memory.py; target 1.5x). The
# log-sum-exps stay float32 (``lse_dtype``).
def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The compute dtype of explicit arithmetic: float32 for half types, else the dtype itself."""
    return torch.float32 if dtype in _HALF else dtype


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """Log-sum-exps: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_(out: Tensor, lse: Tensor, o: Tensor, l: Tensor) -> None:
    """Fold one part's ``(o, l)`` into the running ``(out, lse)`` of the same
    rows over a disjoint key set, in place:
    ``out <- out * exp(lse - new) + o * exp(l - new)``, ``new = logaddexp(lse, l)``.
    The two weights sum to 1, so that is one lerp with weight
    ``exp(l - new) = sigmoid(l - lse)``: one pass over the output and three
    small ops. Rows empty in both stay at EMPTY_LSE (finite: no NaN)."""
    weight = (l - lse).sigmoid_().unsqueeze(-1)
    torch.logaddexp(lse, l, out=lse)
    out.lerp_(o.to(out.dtype), weight.to(out.dtype))


# --------------------------------------------------------------- kernels
class Kernel(NamedTuple):
    """One fused (or explicit) attention kernel. ``forward(q, k, v, causal,
    scale, bias) -> (out, lse (B, H, M))`` and ``backward(do, q, k, v, out,
    lse, causal, scale, bias) -> (dq, dk, dv)``, called only with square
    causal or non-causal problems (the layer above splits bottom-right
    causal ones); ``bias`` is None or an additive (B, 1, 1, N) float mask."""

    name: str
    forward: Callable[..., tuple[Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]
    native_gqa: bool   # takes k/v with fewer heads than q (else: one call per head residue)
    takes_mask: bool   # takes an additive key mask (else never chosen with one)


def _scores(q: Tensor, k: Tensor, scale: float, causal: bool, bias: Optional[Tensor]) -> Tensor:
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        m = s.shape[-1]
        s = s.masked_fill(torch.ones(m, m, dtype=torch.bool, device=s.device).triu(1), _NEG_INF)
    if bias is not None:
        s = s + bias
    return s


def _matmul_forward(q, k, v, causal, scale, bias):
    acc = accumulate_dtype(q.dtype)
    q, k, v = (x.to(acc) for x in (q, k, v))
    s = _scores(q, k, scale, causal, None if bias is None else bias.to(acc))
    peak = s.amax(-1, keepdim=True)
    peak = peak.masked_fill(peak == _NEG_INF, 0.0)
    e = (s - peak).exp()
    total = e.sum(-1, keepdim=True)
    out = (e @ v) / total.clamp_min(torch.finfo(total.dtype).tiny)
    lse = torch.where(total > 0, total.log() + peak, EMPTY_LSE).squeeze(-1)
    return out, lse


def _matmul_backward(do, q, k, v, out, lse, causal, scale, bias):
    acc = accumulate_dtype(q.dtype)
    do, q, k, v, out = (x.to(acc) for x in (do, q, k, v, out))
    p = (_scores(q, k, scale, causal, None if bias is None else bias.to(acc)) - lse.to(acc).unsqueeze(-1)).exp()
    ds = p * (do @ v.transpose(-1, -2) - (do * out).sum(-1, keepdim=True))
    return ds @ k * scale, ds.transpose(-1, -2) @ q * scale, p.transpose(-1, -2) @ do


def _cpu_flash_forward(q, k, v, causal, scale, bias):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)


def _cpu_flash_backward(do, q, k, v, out, lse, causal, scale, bias):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, out, lse, 0.0, causal, attn_mask=bias, scale=scale
    )


# The fused CUDA ops, looked up here at call time: tests substitute CPU
# emulations of their conventions to run the CUDA control flow numerically.
_ops = torch.ops.aten


def _rng_placeholders(q: Tensor) -> tuple[Tensor, Tensor]:
    # dropout_p is 0: the backward kernels read no random state.
    return torch.empty((), dtype=torch.int64, device=q.device), torch.empty((), dtype=torch.int64, device=q.device)


def _cuda_flash_forward(q, k, v, causal, scale, bias):
    out, lse, *_ = _ops._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return out, lse


def _cuda_flash_backward(do, q, k, v, out, lse, causal, scale, bias):
    seed, offset = _rng_placeholders(q)
    return _ops._scaled_dot_product_flash_attention_backward(
        do, q, k, v, out, lse.contiguous(), None, None, q.shape[2], k.shape[2], 0.0, causal, seed, offset, scale=scale
    )


def _cuda_cudnn_forward(q, k, v, causal, scale, bias):
    out, lse, *_ = _ops._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    return out, lse.reshape(q.shape[:3])  # cuDNN returns (B, H, M, 1)


# The efficient kernel pads its log-sum-exp to a multiple of this many rows on CUDA.
EFFICIENT_LSE_ROWS = 32


def _efficient_bias(bias: Optional[Tensor], q: Tensor, k: Tensor) -> Optional[Tensor]:
    """The (B, 1, 1, N) key mask as the efficient kernel reads a bias: (B, H,
    M, N), broadcast by strides, its rows 16-byte aligned."""
    if bias is None:
        return None
    b, n = bias.shape[0], bias.shape[-1]
    align = 16 // bias.element_size()
    storage = bias.new_zeros(b, -(-n // align) * align)
    storage[:, :n] = bias.reshape(b, n)
    return storage[:, :n].view(b, 1, 1, n).expand(b, q.shape[1], q.shape[2], n)


def _cuda_efficient_forward(q, k, v, causal, scale, bias):
    out, lse, *_ = _ops._scaled_dot_product_efficient_attention(
        q, k, v, _efficient_bias(bias, q, k), True, 0.0, causal, scale=scale
    )
    return out, lse[:, :, : q.shape[2]]  # padded to a multiple of EFFICIENT_LSE_ROWS


def _cuda_efficient_backward(do, q, k, v, out, lse, causal, scale, bias):
    b, h, m = lse.shape
    padded = lse.new_zeros(b, h, -(-m // EFFICIENT_LSE_ROWS) * EFFICIENT_LSE_ROWS)
    padded[:, :, :m] = lse
    seed, offset = _rng_placeholders(q)
    dq, dk, dv, _ = _ops._scaled_dot_product_efficient_attention_backward(
        do, q, k, v, _efficient_bias(bias, q, k), out, padded, seed, offset, 0.0,
        [True, True, True, False], causal, scale=scale,
    )
    return dq, dk, dv


def _cuda_efficient_float32_forward(q, k, v, causal, scale, bias):
    wide = accumulate_dtype(q.dtype)  # half types -> float32
    return _cuda_efficient_forward(
        q.to(wide), k.to(wide), v.to(wide), causal, scale, None if bias is None else bias.to(wide)
    )


def _cuda_efficient_float32_backward(do, q, k, v, out, lse, causal, scale, bias):
    wide = accumulate_dtype(q.dtype)
    grads = _cuda_efficient_backward(
        *(x.to(wide) for x in (do, q, k, v, out)), lse, causal, scale, None if bias is None else bias.to(wide)
    )
    return tuple(grad.to(q.dtype) for grad in grads)


KERNELS: dict[str, Kernel] = {
    # CPU flash takes k/v with fewer heads (checked for forward and backward
    # against repeated keys in tests/test_kernels.py) and an additive mask.
    "cpu_flash": Kernel("cpu_flash", _cpu_flash_forward, _cpu_flash_backward, True, True),
    # Flash and cuDNN take k/v with fewer heads (forward and backward checked
    # on an H100, torch 2.11); the efficient kernel refuses them.
    "cuda_flash": Kernel("cuda_flash", _cuda_flash_forward, _cuda_flash_backward, True, False),
    # cuDNN forward, FlashAttention-2 backward: cuDNN's backward crashed the
    # process (SIGSEGV) on a case of the hypothesis test of tests/test_cuda.py
    # in the first device run (H100, torch 2.11); the flash backward computes
    # the same gradient from the final out and lse (natural log, (B, H, M)
    # float32, the convention both kernels share).
    "cuda_cudnn": Kernel("cuda_cudnn", _cuda_cudnn_forward, _cuda_flash_backward, True, False),
    "cuda_efficient": Kernel("cuda_efficient", _cuda_efficient_forward, _cuda_efficient_backward, False, True),
    # Half types with a key mask (or head_dim > 256): the efficient kernel on
    # float32 copies. In half types its backward returned dq 16-82% away from
    # the float64 reference wherever a key mask was given (every padded dilated
    # case of tests/test_cuda.py, bf16 and fp16, second device run: H100, torch
    # 2.11), while the same calls in float32 passed.
    "cuda_efficient_float32": Kernel(
        "cuda_efficient_float32", _cuda_efficient_float32_forward, _cuda_efficient_float32_backward, False, True
    ),
    "matmul": Kernel("matmul", _matmul_forward, _matmul_backward, False, True),
}

# CUDA, half types, no mask: cuDNN attention for head_dim <= CUDNN_MAX_HEAD_DIM,
# else FlashAttention-2 up to FLASH_MAX_HEAD_DIM. Measured on one H100 (torch
# 2.11, cu130), bf16, batch 1, 16 heads, forward / backward ms, flash vs cuDNN:
# d=64: 4K 0.24/0.67 vs 0.15/0.40, 16K 3.58/9.45 vs 2.23/5.60;
# d=128: 4K 0.41/1.26 vs 0.22/0.66, 16K 6.10/17.6 vs 3.24/9.91 (causal alike):
# cuDNN is 1.6-1.9x faster.
CUDA_HALF_KERNEL = "cuda_cudnn"
CUDNN_MAX_HEAD_DIM = 128
FLASH_MAX_HEAD_DIM = 256
_CPU_FLASH_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def choose_kernel(device_type: str, dtype: torch.dtype, head_dim: int, has_mask: bool) -> str:
    """The name (a key of ``KERNELS``) of the kernel for these inputs."""
    if device_type == "cpu":
        # ATen's fused CPU flash kernel: returns the lse, takes masks, all float dtypes.
        return "cpu_flash" if dtype in _CPU_FLASH_DTYPES else "matmul"
    if device_type == "cuda":
        # Both fused CUDA kernels need head_dim a multiple of 8 (SDPA pads it; we do not copy).
        if head_dim % 8 == 0:
            if dtype in _HALF and not has_mask:
                if head_dim <= CUDNN_MAX_HEAD_DIM:
                    return CUDA_HALF_KERNEL
                if head_dim <= FLASH_MAX_HEAD_DIM:
                    return "cuda_flash"
            # float32, masks, head_dim > 256: memory-efficient attention (returns
            # the lse), in float32 for half types (see KERNELS).
            if dtype == torch.float32:
                return "cuda_efficient"
            if dtype in _HALF:
                return "cuda_efficient_float32"
    return "matmul"


# ------------------------------------------------------------------ attend
def _unit_stride_rows(x: Tensor) -> Tensor:
    """x itself when its last dimension is contiguous, else a copy that is."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _bias(key_mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    if key_mask is None:
        return None
    return torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device).masked_fill_(key_mask, _NEG_INF)[:, None, None, :]


def _dead_rows(key_mask: Tensor, m: int, causal: bool) -> Tensor:
    """(B, 1, M or 1) True where a query has no unpadded key; causal rows
    bottom-right aligned (row i sees keys [0, N - M + i])."""
    if causal:
        return ((~key_mask).cumsum(-1) == 0)[:, None, key_mask.shape[-1] - m :]
    return key_mask.all(-1)[:, None, None]


def _forward_heads(kernel: Kernel, q, k, v, causal, scale, key_mask) -> tuple[Tensor, Tensor]:
    """One kernel call (or one per GQA head residue), dead rows fixed; square or non-causal."""
    bias = _bias(key_mask, q.dtype)
    rep = q.shape[1] // k.shape[1]
    if rep == 1 or kernel.native_gqa:
        out, lse = kernel.forward(q, k, v, causal, scale, bias)
    else:
        # Query heads r, r + rep, ... read key/value heads 0, 1, ...: a strided
        # view of q per residue r, no repeated keys.
        out = q.new_empty(q.shape)
        lse = q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype))
        for r in range(rep):
            o, l = kernel.forward(q[:, r::rep], k, v, causal, scale, bias)
            out[:, r::rep] = o
            lse[:, r::rep] = l
    lse = lse.to(lse_dtype(q.dtype))
    if key_mask is not None:
        dead = _dead_rows(key_mask, q.shape[2], causal)
        lse = lse.masked_fill(dead, EMPTY_LSE)
        out = out.masked_fill(dead.unsqueeze(-1), 0.0)
    return out, lse


def _backward_heads(kernel: Kernel, do, q, k, v, out, lse, causal, scale, key_mask):
    bias = _bias(key_mask, q.dtype)
    rep = q.shape[1] // k.shape[1]
    if rep == 1 or kernel.native_gqa:
        return kernel.backward(do, q, k, v, out, lse, causal, scale, bias)
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=accumulate_dtype(k.dtype), device=k.device)
    dv = torch.zeros(v.shape, dtype=accumulate_dtype(v.dtype), device=v.device)
    for r in range(rep):
        heads = slice(r, None, rep)
        gq, gk, gv = kernel.backward(do[:, heads], q[:, heads], k, v, out[:, heads], lse[:, heads], causal, scale, bias)
        dq[:, heads] = gq
        dk += gk
        dv += gv
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _parts(q: Tensor, k: Tensor, causal: bool) -> tuple[tuple[slice, bool], ...]:
    """Key ranges and causal flags of the kernel calls for one attend.

    The fused kernels' causal flag is TOP-LEFT aligned when M < N for CPU
    flash, cuDNN and the efficient kernel (CUDA flash is bottom-right; checked
    on an H100, torch 2.11), so a bottom-right causal problem
    is split: the keys before the queries' first position, which every query
    sees (non-causal), and the last M keys (square causal); the two merge by
    lse. One query row sees every key: no causal part at all."""
    m, n = q.shape[2], k.shape[2]
    if not causal or m == 1:
        return ((slice(0, n), False),)
    if m == n:
        return ((slice(0, n), True),)
    return ((slice(0, n - m), False), (slice(n - m, n), True))


def _kernel_for(q: Tensor, key_mask: Optional[Tensor], backend: Optional[str]) -> Kernel:
    device_type = q.device.type if backend is None else backend
    return KERNELS[choose_kernel(device_type, q.dtype, q.shape[-1], key_mask is not None)]


def attend(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: Optional[float],
    key_mask: Optional[Tensor] = None, backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """Attention of ``(B, H, M, d)`` queries over ``(B, H_kv, N, d)`` keys and
    values -> ``(out, lse (B, H, M))`` (see the module docstring).
    ``scale``: the softmax scale, None for ``1 / sqrt(d)``. ``key_mask``: None
    or ``(B, N)`` bool, True = padding. ``backend``: the device type to
    dispatch for (default: q's), e.g. "cuda" on meta tensors."""
    scale = default_scale(q, scale)
    kernel = _kernel_for(q, key_mask, backend)
    q, k, v = (_unit_stride_rows(x) for x in (q, k, v))
    out = lse = None
    for keys, part_causal in _parts(q, k, causal):
        mask = None if key_mask is None else key_mask[:, keys]
        o, l = _forward_heads(kernel, q, k[:, :, keys], v[:, :, keys], part_causal, scale, mask)
        if out is None:
            out, lse = o, l
        else:
            out = out.to(accumulate_dtype(q.dtype))
            merge_(out, lse, o, l)
    return out, lse


def attend_backward(
    d_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *, causal: bool,
    scale: Optional[float], key_mask: Optional[Tensor] = None, backend: Optional[str] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)`` of ``attend``'s rows given their FINAL
    ``out`` and ``lse`` (shapes and ``scale`` as ``attend``; out and d_out in
    q's dtype)."""
    scale = default_scale(q, scale)
    kernel = _kernel_for(q, key_mask, backend)
    d_out, q, k, v, out = (_unit_stride_rows(x) for x in (d_out, q, k, v, out))
    parts = _parts(q, k, causal)
    dq, dks, dvs = None, [], []
    for keys, part_causal in parts:
        mask = None if key_mask is None else key_mask[:, keys]
        gq, gk, gv = _backward_heads(kernel, d_out, q, k[:, :, keys], v[:, :, keys], out, lse, part_causal, scale, mask)
        dq = gq if dq is None else dq + gq
        dks.append(gk)
        dvs.append(gv)
    if len(parts) == 1:
        return dq, dks[0], dvs[0]
    return dq, torch.cat(dks, dim=2), torch.cat(dvs, dim=2)
