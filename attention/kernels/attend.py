"""The kernel layer every attention module shares (docs/design.md section 5).

Guarantees:
- ``attend(q, k, v, causal=, scale=, key_mask=, mask=, dropout_p=, keep=,
  backend=)`` on ``(B, H, M, d)`` queries, ``(B, H_kv, N, d)`` keys and
  ``(B, H_kv, N, d_v)`` values, ``M <= N``, ``H % H_kv == 0`` (query head
  ``j`` reads key/value head ``j // (H / H_kv)``), returns ``(out, lse)``:
  ``out (B, H, M, d_v)`` in q's dtype or its accumulate dtype, ``lse``
  natural log, ``lse_dtype(q.dtype)``, exactly ``(B, H, M)``. A row with no
  key gets out 0 and lse ``EMPTY_LSE``. Causal with ``M < N`` is
  BOTTOM-RIGHT aligned: query row ``i`` is position ``N - M + i``.
- Masks exclude, never add: ``key_mask`` ``(B, N)`` and ``mask`` (bool
  broadcastable to ``(B, H, M, N)``), True = excluded, are combined with
  causality and FILLED out of the scores. Keys excluded by ``key_mask`` have
  their k and v rows zeroed before any kernel, so a NaN or Inf in them never
  changes an output or a gradient, whichever kernel runs.
- ``attend_backward`` returns ``(dq, dk, dv)`` given the FINAL ``out`` and
  ``lse`` of the rows (which may merge several calls): with
  ``P = exp(S - lse)``, ``dS = P * (dO v^T - rowsum(dO * out))``; that is
  the exact gradient of one softmax over every key the rows attend, across
  calls.
- Dropout: ``keep`` (bool broadcastable to ``(B, H, M, N)``) multiplies the
  probabilities after the softmax by ``keep / (1 - dropout_p)``; the lse is
  the undropped one. Only kernels whose entry says ``dropout`` take it.
- ``softcap`` c: each scaled score s becomes ``c * tanh(s / c)`` (``attention.kernels.sinks``)
  in a kernel whose entry says ``softcap`` (matmul; flex by a score_mod).
- Inputs may have any strides: a tensor whose last dimension is not
  contiguous is copied (the fused kernels read rows with a unit stride and
  return wrong numbers otherwise); everything else is passed as a view.

Limits on non-finite values (as ``F.scaled_dot_product_attention``): a NaN
in a key excluded by causality or ``mask`` never reaches the forward (its
score is filled before the exponential), but a NaN VALUE of such a key does
(its probability is 0 and ``0 * NaN`` is NaN in the tile product), and in
the backward ``dq = dS k`` meets the NaN key. Only ``key_mask`` zeroes rows.

Dispatch: ``KERNELS`` holds one ``Kernel`` per backend, each declaring what
it takes; ``choose_kernel`` walks ``PREFERENCES[device type]`` (a caller's
preferred kernel first) and returns the first entry that takes the call,
``matmul`` (takes everything) last. ``backend=`` is a device type (so that
the CUDA branches run in CI on ``meta`` tensors: the fused CUDA ops have meta
kernels) or a kernel name, preferred over the device's order. A new backend
is one entry plus its forward and backward.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from attention.kernels.masks import AttendCall, check_call, combined_mask, dead_rows, head_residue, key_range, zero_masked_keys
from attention.checks import check_attention_inputs, check_dropout, check_is_causal, check_softcap, check_softmax_scale, default_scale
from attention.kernels.flex import flex_attend, flex_attend_backward
from attention.kernels.matmul import matmul_backward, matmul_forward
from attention.kernels.softmax_parts import EMPTY_LSE, accumulate_dtype, lse_dtype, merge_

__all__ = ["KERNELS", "PREFERENCES", "Kernel", "attend", "attend_backward", "choose_kernel", "resolve_kernel"]

_NEG_INF = float("-inf")
_HALF = (torch.float16, torch.bfloat16)
_ANY = "*"


# ---------------------------------------------------------------- the table
class Kernel(NamedTuple):
    """One attention backend and what it takes.

    ``forward(q, k, v, causal, scale, masked, keep) -> (out, lse (B, H, M))``
    and ``backward(do, q, k, v, out, lse, causal, scale, masked, keep) ->
    (dq, dk, dv)``: ``masked`` None or bool broadcastable to ``(B, H, M, N)``,
    True = excluded (the key mask and ``mask`` combined); ``keep`` None or
    the dropout factors ``keep / (1 - p)``. ``causal`` with ``M < N`` reaches
    only an entry with ``bottom_right_causal``; the others get square or
    non-causal problems (the layer splits the rest)."""

    name: str
    forward: Callable[..., tuple[Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]
    devices: tuple[str, ...]           # device types it runs on ("*": any)
    backward_devices: tuple[str, ...]  # device types its backward runs on
    dtypes: tuple[torch.dtype, ...]    # () = every floating dtype
    head_dims: tuple[int, int, int]    # (least, most, multiple of), for d and d_v alike
    native_gqa: bool                   # takes fewer k/v heads than q (else one call per head residue)
    takes_mask: bool                   # takes a key mask
    takes_structural_mask: bool        # takes ``mask`` (per query and key)
    fills_mask: bool                   # fills excluded scores (else adds -inf: see _finite_keys_or_matmul)
    value_head_dim: bool               # takes d_v != d
    dropout: bool                      # takes a keep mask
    bottom_right_causal: bool          # takes causal with M < N in one call
    zero_empty_rows: bool              # returns out 0, lse EMPTY_LSE for rows with no key itself
    softcap: bool                      # takes a soft-cap (a trailing softcap= argument of forward and backward)

    def takes(self, device_type: str, dtype: torch.dtype, head_dim: int, value_head_dim: int, has_mask: bool,
              structural_mask: bool, dropout: bool, backward: bool, softcap: bool = False) -> bool:
        """Whether this kernel computes such a call."""
        devices = self.backward_devices if backward else self.devices
        least, most, multiple = self.head_dims
        return (
            (_ANY in devices or device_type in devices)
            and (not self.dtypes or dtype in self.dtypes)
            and all(least <= d <= most and d % multiple == 0 for d in (head_dim, value_head_dim))
            and (self.value_head_dim or value_head_dim == head_dim)
            and (self.takes_mask or not has_mask)
            and (self.takes_structural_mask or not structural_mask)
            and (self.dropout or not dropout)
            and (self.softcap or not softcap)
        )


def _additive(masked: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """The exclusions as the additive float mask the fused kernels read."""
    if masked is None:
        return None
    return torch.zeros(masked.shape, dtype=dtype, device=masked.device).masked_fill_(masked, _NEG_INF)


def _cpu_flash_forward(q, k, v, causal, scale, masked, keep):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=_additive(masked, q.dtype), scale=scale
    )


def _cpu_flash_backward(do, q, k, v, out, lse, causal, scale, masked, keep):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, out, lse, 0.0, causal, attn_mask=_additive(masked, q.dtype), scale=scale
    )


# The fused CUDA ops, looked up here at call time: tests substitute CPU
# emulations of their conventions to run the CUDA control flow numerically.
_ops = torch.ops.aten


def _rng_placeholders(q: Tensor) -> tuple[Tensor, Tensor]:
    # dropout_p is 0: the backward kernels read no random state.
    return torch.empty((), dtype=torch.int64, device=q.device), torch.empty((), dtype=torch.int64, device=q.device)


def _cuda_flash_forward(q, k, v, causal, scale, masked, keep):
    out, lse, *_ = _ops._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return out, lse


def _cuda_flash_backward(do, q, k, v, out, lse, causal, scale, masked, keep):
    seed, offset = _rng_placeholders(q)
    return _ops._scaled_dot_product_flash_attention_backward(
        do, q, k, v, out, lse.contiguous(), None, None, q.shape[2], k.shape[2], 0.0, causal, seed, offset, scale=scale
    )


def _cuda_cudnn_forward(q, k, v, causal, scale, masked, keep):
    out, lse, *_ = _ops._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    return out, lse.reshape(q.shape[:3])  # cuDNN returns (B, H, M, 1)


# The efficient kernel pads its log-sum-exp to a multiple of this many rows on CUDA.
EFFICIENT_LSE_ROWS = 32


def _efficient_bias(masked: Optional[Tensor], q: Tensor) -> Optional[Tensor]:
    """The (B, 1, 1, N) key exclusions as the efficient kernel reads a bias:
    (B, H, M, N) in q's dtype, broadcast by strides, its rows 16-byte aligned."""
    if masked is None:
        return None
    b, n = masked.shape[0], masked.shape[-1]
    align = 16 // q.element_size()
    storage = q.new_zeros(b, -(-n // align) * align)
    storage[:, :n].masked_fill_(masked.reshape(b, n), _NEG_INF)
    return storage[:, :n].view(b, 1, 1, n).expand(b, q.shape[1], q.shape[2], n)


def _cuda_efficient_forward(q, k, v, causal, scale, masked, keep):
    out, lse, *_ = _ops._scaled_dot_product_efficient_attention(
        q, k, v, _efficient_bias(masked, q), True, 0.0, causal, scale=scale
    )
    return out, lse[:, :, : q.shape[2]]  # padded to a multiple of EFFICIENT_LSE_ROWS


def _cuda_efficient_backward(do, q, k, v, out, lse, causal, scale, masked, keep):
    b, h, m = lse.shape
    padded = lse.new_zeros(b, h, -(-m // EFFICIENT_LSE_ROWS) * EFFICIENT_LSE_ROWS)
    padded[:, :, :m] = lse
    seed, offset = _rng_placeholders(q)
    dq, dk, dv, _ = _ops._scaled_dot_product_efficient_attention_backward(
        do, q, k, v, _efficient_bias(masked, q), out, padded, seed, offset, 0.0,
        [True, True, True, False], causal, scale=scale,
    )
    return dq, dk, dv


def _cuda_efficient_float32_forward(q, k, v, causal, scale, masked, keep):
    wide = accumulate_dtype(q.dtype)  # half types -> float32
    return _cuda_efficient_forward(q.to(wide), k.to(wide), v.to(wide), causal, scale, masked, keep)


def _cuda_efficient_float32_backward(do, q, k, v, out, lse, causal, scale, masked, keep):
    wide = accumulate_dtype(q.dtype)
    grads = _cuda_efficient_backward(*(x.to(wide) for x in (do, q, k, v, out)), lse, causal, scale, masked, keep)
    return tuple(grad.to(x.dtype) for grad, x in zip(grads, (q, k, v)))


def _flex_forward(q, k, v, causal, scale, masked, keep, softcap=None):
    key_mask = None if masked is None else masked[:, 0, 0, :]  # (B, 1, 1, N): the entry takes no structural mask
    return flex_attend(q, k, v, key_mask, causal=causal, scale=scale, softcap=softcap)


def _flex_backward(do, q, k, v, out, lse, causal, scale, masked, keep, softcap=None):
    key_mask = None if masked is None else masked[:, 0, 0, :]
    return flex_attend_backward(do, q, k, v, out, lse, key_mask, causal=causal, scale=scale, softcap=softcap)


_CPU_FLASH_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_ALL_HEAD_DIMS = (1, 1 << 30, 1)
CUDNN_MAX_HEAD_DIM = 128
FLASH_MAX_HEAD_DIM = 256


def _entry(name, forward, backward, devices, *, backward_devices=None, dtypes=(), head_dims=_ALL_HEAD_DIMS,
           native_gqa=False, takes_mask=False, takes_structural_mask=False, fills_mask=True,
           value_head_dim=False, dropout=False, bottom_right_causal=False, zero_empty_rows=False,
           softcap=False) -> Kernel:
    return Kernel(name, forward, backward, devices, devices if backward_devices is None else backward_devices,
                  dtypes, head_dims, native_gqa, takes_mask, takes_structural_mask, fills_mask, value_head_dim,
                  dropout, bottom_right_causal, zero_empty_rows, softcap)


KERNELS: dict[str, Kernel] = {
    # CPU flash takes k/v with fewer heads (checked for forward and backward
    # against repeated keys in tests/test_kernels.py) and an additive mask
    # (exact for the key mask: those keys' rows are zeroed first), refuses a
    # value head_dim other than q/k's ("Q/K/V should have the same head
    # size", torch 2.13).
    "cpu_flash": _entry("cpu_flash", _cpu_flash_forward, _cpu_flash_backward, ("cpu",), dtypes=_CPU_FLASH_DTYPES,
                        native_gqa=True, takes_mask=True, takes_structural_mask=True, fills_mask=False),
    # Flash and cuDNN take k/v with fewer heads (forward and backward checked
    # on an H100, torch 2.11); the efficient kernel refuses them. Flash needs
    # one head_dim for q, k and v (its meta kernel returns out with q's).
    "cuda_flash": _entry("cuda_flash", _cuda_flash_forward, _cuda_flash_backward, ("cuda",), dtypes=_HALF,
                         head_dims=(8, FLASH_MAX_HEAD_DIM, 8), native_gqa=True),
    # cuDNN forward, FlashAttention-2 backward: cuDNN's backward crashed the
    # process (SIGSEGV) on a case of the hypothesis test of tests/test_cuda.py
    # (H100, torch 2.11); the flash backward computes the same gradient from
    # the final out and lse (natural log, (B, H, M) float32, the convention
    # both kernels share). That backward needs d_v == d, so the entry does.
    "cuda_cudnn": _entry("cuda_cudnn", _cuda_cudnn_forward, _cuda_flash_backward, ("cuda",), dtypes=_HALF,
                         head_dims=(8, CUDNN_MAX_HEAD_DIM, 8), native_gqa=True),
    # The memory-efficient kernel takes an additive key mask, any head_dim
    # that is a multiple of 8 and a value head_dim of its own (its meta
    # kernels return out and dv with v's); float32 only: see the next entry.
    "cuda_efficient": _entry("cuda_efficient", _cuda_efficient_forward, _cuda_efficient_backward, ("cuda",),
                             dtypes=(torch.float32,), head_dims=(8, 1 << 30, 8), takes_mask=True,
                             fills_mask=False, value_head_dim=True),
    # Half types with a key mask, head_dim > 256 or d_v != d: the efficient
    # kernel on float32 copies. In half types its backward returned dq 16-82%
    # away from the float64 reference wherever a key mask was given (every
    # padded dilated case of tests/test_cuda.py, bf16 and fp16, H100, torch
    # 2.11), while the same calls in float32 passed.
    "cuda_efficient_float32": _entry(
        "cuda_efficient_float32", _cuda_efficient_float32_forward, _cuda_efficient_float32_backward, ("cuda",),
        dtypes=_HALF, head_dims=(8, 1 << 30, 8), takes_mask=True, fills_mask=False, value_head_dim=True,
    ),
    # FlexAttention: forward on the CPU (compiled; no backward there in torch
    # 2.13), forward and backward on CUDA; head_dim >= 16 (flex's Triton
    # kernels refuse less). In no device's order: it compiles on first use,
    # so it runs when named (backend="flex") or called (flex_attend).
    "flex": _entry("flex", _flex_forward, _flex_backward, ("cpu", "cuda"), backward_devices=("cuda",),
                   dtypes=(torch.float32, torch.bfloat16, torch.float16), head_dims=(16, 256, 1), native_gqa=True,
                   takes_mask=True, value_head_dim=True, bottom_right_causal=True, zero_empty_rows=True, softcap=True),
    "matmul": _entry("matmul", matmul_forward, matmul_backward, (_ANY,), takes_mask=True,
                     takes_structural_mask=True, value_head_dim=True, dropout=True, bottom_right_causal=True,
                     zero_empty_rows=True, softcap=True),
}

# Each device type's kernels, best first; ``matmul`` (takes everything) ends
# every walk. CUDA, half types: cuDNN for head_dim <= CUDNN_MAX_HEAD_DIM, else
# FlashAttention-2: cuDNN measured 1.6-1.9x faster on an H100 (docs/bench.md,
# GPU, "Kernel choice"). A caller prefers another entry by naming it
# (``backend="cuda_flash"``).
PREFERENCES: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu_flash",),
    "cuda": ("cuda_cudnn", "cuda_flash", "cuda_efficient", "cuda_efficient_float32"),
}


def choose_kernel(device_type: str, dtype: torch.dtype, head_dim: int, has_mask: bool = False,
                  value_head_dim: Optional[int] = None, structural_mask: bool = False, dropout: bool = False,
                  backward: bool = False, prefer: Optional[str] = None, softcap: bool = False) -> str:
    """The name (a key of ``KERNELS``) of the first kernel of ``prefer``,
    then ``PREFERENCES[device_type]``, then ``matmul``, that takes the call:
    ``has_mask`` a key mask, ``value_head_dim`` v's head_dim (None: q's),
    ``structural_mask`` a ``mask``, ``dropout`` a keep mask, ``backward``
    its backward, ``softcap`` a soft-cap."""
    if prefer is not None and prefer not in KERNELS:
        raise ValueError(f"prefer must be None or one of {sorted(KERNELS)}; got {prefer!r}")
    value_head_dim = head_dim if value_head_dim is None else value_head_dim
    order = ((prefer,) if prefer is not None else ()) + PREFERENCES.get(device_type, ()) + ("matmul",)
    for name in order:
        if KERNELS[name].takes(device_type, dtype, head_dim, value_head_dim, has_mask, structural_mask, dropout,
                               backward, softcap):
            return name
    raise ValueError(f"no kernel of KERNELS takes this call on {device_type!r}: matmul must end every order")


# ------------------------------------------------------------------ attend
def _kernel_for(q: Tensor, v: Tensor, call: AttendCall, backend: Optional[str], backward: bool,
                softcap: Optional[float]) -> Kernel:
    """The table's kernel for this call; ``backend``: None, a device type or a kernel name (preferred)."""
    device_type, prefer = q.device.type, None
    if backend in KERNELS:
        devices = KERNELS[backend].devices
        prefer = backend
        if _ANY not in devices and device_type not in devices:
            if device_type != "meta":
                raise ValueError(f"backend {backend!r} runs on {devices} tensors; q is on {device_type}")
            device_type = devices[0]  # a CUDA kernel's name on meta tensors: the CUDA walk
    elif backend is not None:
        try:
            device_type = torch.device(backend).type
        except (RuntimeError, TypeError):
            raise ValueError(f"backend must be None, a device type or one of {sorted(KERNELS)}; got {backend!r}") from None
    name = choose_kernel(device_type, q.dtype, q.shape[-1], call.key_mask is not None, v.shape[-1],
                         call.mask is not None, call.factors is not None, backward, prefer, softcap is not None)
    return KERNELS[name]


def resolve_kernel(q: Tensor, v: Tensor, key_mask: Optional[Tensor], *, backward: bool,
                   backend: Optional[str] = None, softcap: Optional[float] = None) -> str:
    """The name of the kernel ``attend`` (``backward``: ``attend_backward``)
    takes for calls of this kind: q's device, dtype and head_dim, v's
    head_dim, a key mask or not, ``softcap``, no structural mask, no dropout. A caller
    that makes many such calls (a dilated plan's chunks) chooses once and
    hands the name down as their ``backend``."""
    return _kernel_for(q, v, AttendCall(key_mask, None, None), backend, backward, softcap).name


def _finite_keys_or_matmul(kernel: Kernel, k: Tensor, call: AttendCall) -> Kernel:
    """A kernel that ADDS ``mask`` as -inf turns a NaN or Inf key it
    excludes for some query into a NaN score for that query; such calls go
    to matmul, which fills. One sum over k (a NaN or Inf makes it
    non-finite; an overflow only sends a finite call down the exact explicit
    path): 1/M of the call's score work, and one host sync, which is why no
    CUDA entry takes ``mask``."""
    if call.mask is None or kernel.fills_mask or bool(torch.isfinite(k.sum())):
        return kernel
    return KERNELS["matmul"]


def _unit_stride_rows(x: Tensor) -> Tensor:
    """x itself when its last dimension is contiguous, else a copy that is."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _parts(kernel: Kernel, m: int, n: int, causal: bool) -> tuple[tuple[slice, bool], ...]:
    """Key ranges and causal flags of the kernel calls for one attend.

    The fused kernels' causal flag is TOP-LEFT aligned when M < N for CPU
    flash, cuDNN and the efficient kernel (CUDA flash is bottom-right; checked
    on an H100, torch 2.11), so for an entry without ``bottom_right_causal``
    a bottom-right causal problem is split: the keys before the queries'
    first position, which every query sees (non-causal), and the last M keys
    (square causal); the two merge by lse. One query row sees every key: no
    causal part at all."""
    if not causal or m == 1:
        return ((slice(0, n), False),)
    if m == n or kernel.bottom_right_causal:
        return ((slice(0, n), True),)
    return ((slice(0, n - m), False), (slice(n - m, n), True))


def _capped(softcap: Optional[float]) -> dict:  # only a kernel that takes a soft-cap gets one
    return {} if softcap is None else {"softcap": softcap}


def _forward_heads(kernel: Kernel, q, k, v, causal, scale, masked, factors, softcap) -> tuple[Tensor, Tensor]:
    """One kernel call (or one per GQA head residue), dead rows fixed."""
    rep = q.shape[1] // k.shape[1]
    if rep == 1 or kernel.native_gqa:
        out, lse = kernel.forward(q, k, v, causal, scale, masked, factors, **_capped(softcap))
    else:
        # Query heads r, r + rep, ... read key/value heads 0, 1, ...: a strided
        # view of q per residue r, no repeated keys.
        out = q.new_empty((*q.shape[:3], v.shape[-1]))
        lse = q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype))
        for r in range(rep):
            o, l = kernel.forward(q[:, r::rep], k, v, causal, scale, head_residue(masked, r, rep),
                                  head_residue(factors, r, rep), **_capped(softcap))
            out[:, r::rep] = o
            lse[:, r::rep] = l
    lse = lse.to(lse_dtype(q.dtype))
    dead = None if kernel.zero_empty_rows else dead_rows(masked, q.shape[2], k.shape[2], causal)
    if dead is not None:
        lse = lse.masked_fill(dead, EMPTY_LSE)
        out = out.masked_fill(dead.unsqueeze(-1), 0.0)
    return out, lse


def _backward_heads(kernel: Kernel, do, q, k, v, out, lse, causal, scale, masked, factors, softcap):
    rep = q.shape[1] // k.shape[1]
    if rep == 1 or kernel.native_gqa:
        return kernel.backward(do, q, k, v, out, lse, causal, scale, masked, factors, **_capped(softcap))
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=accumulate_dtype(k.dtype), device=k.device)
    dv = torch.zeros(v.shape, dtype=accumulate_dtype(v.dtype), device=v.device)
    for r in range(rep):
        heads = slice(r, None, rep)
        gq, gk, gv = kernel.backward(do[:, heads], q[:, heads], k, v, out[:, heads], lse[:, heads], causal, scale,
                                     head_residue(masked, r, rep), head_residue(factors, r, rep), **_capped(softcap))
        dq[:, heads] = gq
        dk += gk
        dv += gv
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def attend(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: Optional[float],
    key_mask: Optional[Tensor] = None, mask: Optional[Tensor] = None, dropout_p: float = 0.0,
    keep: Optional[Tensor] = None, backend: Optional[str] = None, softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    """Attention of ``(B, H, M, d)`` queries over ``(B, H_kv, N, d)`` keys and
    ``(B, H_kv, N, d_v)`` values -> ``(out (B, H, M, d_v), lse (B, H, M))``
    (see the module docstring). ``scale``: the softmax scale, None for ``1 /
    sqrt(d)``. ``key_mask``: None or ``(B, N)`` bool, True = masked.
    ``mask``: None or bool broadcastable to ``(B, H, M, N)``, True = masked.
    ``keep``: the dropout keep mask (bool, as ``mask``), scaled by ``1 / (1 -
    dropout_p)``. ``backend``: None (q's device type), a device type ("cuda"
    on meta tensors) or a kernel name of ``KERNELS``, preferred where it
    takes the call. ``softcap``: None or c > 0 (scores ``c * tanh(s / c)``)."""
    scale = default_scale(q, scale)
    call, softcap = check_call(q, k, v, key_mask, mask, dropout_p, keep), check_softcap(softcap)
    kernel = _kernel_for(q, v, call, backend, False, softcap)
    q, k, v = (_unit_stride_rows(x) for x in (q, k, v))
    k, v = zero_masked_keys(k, v, call.key_mask)
    kernel = _finite_keys_or_matmul(kernel, k, call)
    masked, n = combined_mask(call), k.shape[2]
    out = lse = None
    for keys, part_causal in _parts(kernel, q.shape[2], n, causal):
        o, l = _forward_heads(kernel, q, k[:, :, keys], v[:, :, keys], part_causal, scale, key_range(masked, keys),
                              key_range(call.factors, keys), softcap)
        if out is None:
            out, lse = o, l
        else:
            out = out.to(accumulate_dtype(q.dtype))
            merge_(out, lse, o, l)
    return out, lse


def attend_backward(
    d_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *, causal: bool,
    scale: Optional[float], key_mask: Optional[Tensor] = None, mask: Optional[Tensor] = None,
    dropout_p: float = 0.0, keep: Optional[Tensor] = None, backend: Optional[str] = None,
    softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)`` of ``attend``'s rows given their FINAL
    ``out`` (the dropped output with ``keep``) and ``lse`` (arguments as
    ``attend``'s; out and d_out ``(B, H, M, d_v)`` in q's dtype)."""
    scale = default_scale(q, scale)
    call, softcap = check_call(q, k, v, key_mask, mask, dropout_p, keep), check_softcap(softcap)
    kernel = _kernel_for(q, v, call, backend, True, softcap)
    d_out, q, k, v, out = (_unit_stride_rows(x) for x in (d_out, q, k, v, out))
    k, v = zero_masked_keys(k, v, call.key_mask)
    kernel = _finite_keys_or_matmul(kernel, k, call)
    masked = combined_mask(call)
    parts = _parts(kernel, q.shape[2], k.shape[2], causal)
    dq, dks, dvs = None, [], []
    for keys, part_causal in parts:
        gq, gk, gv = _backward_heads(kernel, d_out, q, k[:, :, keys], v[:, :, keys], out, lse, part_causal, scale,
                                     key_range(masked, keys), key_range(call.factors, keys), softcap)
        dq = gq if dq is None else dq + gq
        dks.append(gk)
        dvs.append(gv)
    if len(parts) == 1:
        return dq, dks[0], dvs[0]
    return dq, torch.cat(dks, dim=2), torch.cat(dvs, dim=2)
