"""FlexAttention (``torch.nn.attention.flex_attention``) as a backend of the
kernel layer: ``flex_attend(q, k, v, key_mask)`` -> ``(out, lse)``.

Shapes: q ``(B, H, M, d)``, k ``(B, H_kv, N, d)``, v ``(B, H_kv, N, d_v)``,
``H % H_kv == 0`` (GQA through flex's ``enable_gqa``: keys and values are
never repeated); ``key_mask`` None or ``(B, N)`` bool, True = masked;
``causal`` bottom-right (query row ``i`` is position ``N - M + i``). Out
``(B, H, M, d_v)`` in q's dtype, lse ``(B, H, M)`` float32, natural log; a
row with no key gets out 0 and lse ``EMPTY_LSE``.

Guarantees and limits:
- Masked keys leave through the mask_mod (their scores are filled, never
  added to), and their k and v rows are zeroed first, so a NaN or Inf in a
  masked key or value changes nothing.
- Outside a compiled region flex runs compiled (``compiled_flex``, the
  package's one compiled ``flex_attention``: eager flex materializes the
  scores); inside one, dynamo traces it into the caller's graph.
- On the CPU, torch 2.13's compiled flex computes no lse ("torch.compile on
  CPU only supports inference and `return_lse` is not supported yet") and
  has no backward, so the lse there is one explicit log-sum-exp over the
  masked scores (a (B, H, M, N) matrix: a check of exactness, not a fast
  path) and ``block_mask``/``score_mod`` are taken only with
  ``return_lse=False``.
- ``softcap`` c caps the scaled scores, ``c * tanh(s / c)``, through a
  score_mod (the CPU's explicit lse caps them too).
- Without a ``block_mask``, one is built per call by ``create_block_mask``,
  which evaluates the mask_mod at M * N points: callers with a stored
  layout pass their own.
- ``flex_attend_backward`` is exact given the FINAL out and lse of the rows
  (several parts merged by lse): it recomputes this part's (o, l) under
  autograd and pulls back ``dO`` through the merge's weights (one extra flex
  forward per backward call). It needs flex's backward: CUDA only.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from attention.kernels.softmax_parts import EMPTY_LSE, accumulate_dtype
from attention.kernels.sinks import soft_cap

__all__ = ["FLEX_MIN_BLOCK", "FLEX_DEFAULT_TILE", "compiled_flex", "flex_attend", "flex_attend_backward", "flex_tiles"]

# The smallest block any flex caller here uses, and what block sizes must be
# a multiple of: torch 2.13's CPU flex returns NaN for 8-token blocks; 16 is
# exact (docs/design.md, known torch limits).
FLEX_MIN_BLOCK = 16
# The largest Triton tile flex_attention picks by itself (BLOCK_M of the
# forward on an H100, torch 2.11).
FLEX_DEFAULT_TILE = 128


def flex_tiles(block_size: int) -> dict[str, int]:
    """``kernel_options`` of flex_attention whose tiles divide ``block_size``
    (a multiple of FLEX_MIN_BLOCK): none for blocks that are multiples of
    FLEX_DEFAULT_TILE, else every forward and backward tile set to the largest
    power of two dividing the block (compiled flex on an H100 refuses tiles
    that do not divide the blocks)."""
    tile = block_size & -block_size  # the largest power of two dividing it
    if tile >= FLEX_DEFAULT_TILE:
        return {}
    return {name: tile for name in ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")}


@functools.cache
def _compiled_flex(device_type: str) -> Callable:
    # The package's ONE compiled flex_attention. Flex runs only compiled
    # (eager flex materializes the n x n scores). On the CPU the shapes are
    # static, a graph per length: torch 2.13's C++ flex kernel fails to build
    # for some dilated plans at a dynamic length (docs/design.md, known torch
    # limits); elsewhere torch's default (static, then dynamic).
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, fullgraph=True, dynamic=False if device_type == "cpu" else None)


def compiled_flex(device_type: str) -> Callable:
    """flex_attention itself inside a caller's compiled region (dynamo traces
    it into that graph), else the process's one compiled flex_attention for
    ``device_type``. Every flex call of the package goes through here."""
    if torch.compiler.is_compiling():
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention
    return _compiled_flex(device_type)


def _mask_mod(key_mask: Optional[Tensor], causal: bool, offset: int) -> Optional[Callable]:
    """The mask_mod of a key mask and bottom-right causality (None: every pair)."""
    if key_mask is None and not causal:
        return None

    def mask_mod(b, h, q_idx, kv_idx):
        live = kv_idx <= q_idx + offset if causal else torch.ones_like(kv_idx, dtype=torch.bool)
        return live if key_mask is None else live & ~key_mask[b, kv_idx]

    return mask_mod


def _softcap_mod(softcap: float) -> Callable:
    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / softcap) * softcap

    return score_mod


def _explicit_lse(q: Tensor, k: Tensor, scale: float, key_mask: Optional[Tensor], causal: bool,
                  softcap: Optional[float] = None) -> Tensor:
    """(B, H, M) float32 log-sum-exp of the masked (capped) scores; query heads grouped over kv heads."""
    b, h, m, d = q.shape
    h_kv, n = k.shape[1], k.shape[2]
    acc = accumulate_dtype(q.dtype)
    s = soft_cap(q.reshape(b, h_kv, h // h_kv, m, d).to(acc) @ k.to(acc)[:, :, None].transpose(-1, -2) * scale,
                 softcap)
    excluded = torch.zeros(m, n, dtype=torch.bool, device=q.device)
    if causal:
        excluded = torch.ones(m, n, dtype=torch.bool, device=q.device).triu(n - m + 1)
    if key_mask is not None:
        excluded = excluded | key_mask[:, None, None, None, :]
    lse = s.masked_fill(excluded, float("-inf")).logsumexp(-1).reshape(b, h, m)
    return lse.float()


def flex_attend(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor] = None, *, causal: bool = False,
    scale: Optional[float] = None, block_mask=None, score_mod: Optional[Callable] = None, return_lse: bool = True,
    softcap: Optional[float] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Attention through one flex_attention call -> ``(out, lse)`` (see the
    module docstring). ``block_mask``: a caller's own BlockMask of (M, N),
    which then carries every exclusion (``key_mask`` and ``causal`` must be
    unset); ``score_mod``: flex's, applied to the scaled scores;
    ``return_lse=False``: lse None (on the CPU the only way to take a
    block_mask or score_mod). ``softcap``: None or c > 0 (not with a score_mod)."""
    m, n = q.shape[2], k.shape[2]
    if softcap is not None:
        if score_mod is not None:
            raise ValueError("flex_attend: give softcap or a score_mod, not both")
        score_mod = _softcap_mod(softcap)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if block_mask is not None and (key_mask is not None or causal):
        raise ValueError("flex_attend: give key_mask/causal or a block_mask that carries them, not both")
    if q.device.type == "cpu" and return_lse and (block_mask is not None or (score_mod is not None and softcap is None)):
        raise ValueError("flex_attend: on the CPU the lse is explicit: with a block_mask or score_mod pass "
                         "return_lse=False")
    if key_mask is not None:
        k = k.masked_fill(key_mask[:, None, :, None], 0.0)
        v = v.masked_fill(key_mask[:, None, :, None], 0.0)
    if block_mask is None:
        mask_mod = _mask_mod(key_mask, causal, n - m)
        if mask_mod is not None:
            from torch.nn.attention.flex_attention import create_block_mask

            block_mask = create_block_mask(mask_mod, q.shape[0], None, m, n, device=q.device)
    gqa = q.shape[1] != k.shape[1]
    if q.device.type == "cpu" or not return_lse:
        out = compiled_flex(q.device.type)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=gqa)
        if not return_lse:
            return out, None
        lse = _explicit_lse(q, k, scale, key_mask, causal, softcap)
    else:
        from torch.nn.attention.flex_attention import AuxRequest

        out, aux = compiled_flex(q.device.type)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                           return_aux=AuxRequest(lse=True))
        lse = aux.lse.float()
    # flex's own out is 0 on a row with no key; no op follows it inside this
    # function, because torch 2.13's CPU flex template refuses a fused
    # epilogue ("Unsupported for `epilogue_nodes` in CppFlexAttentionTemplate").
    return out, lse.masked_fill(torch.isneginf(lse), EMPTY_LSE)


def flex_attend_backward(
    d_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, key_mask: Optional[Tensor] = None,
    *, causal: bool = False, scale: Optional[float] = None, part: Callable = flex_attend,
    softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of these keys' part given the rows' FINAL ``out`` and
    ``lse``: the part's ``(o, l)`` enter the final output with weight ``w =
    exp(l - lse)``, so ``dL/do = w dO`` and ``dL/dl = w rowsum(dO (o -
    out))``. ``part``: the differentiable ``(out, lse)`` function of this
    part (flex_attend; tests substitute an explicit one on the CPU)."""
    with torch.enable_grad():
        inputs = [x.detach().requires_grad_() for x in (q, k, v)]
        o, l = part(*inputs, key_mask, causal=causal, scale=scale, **({} if softcap is None else {"softcap": softcap}))
        wide = torch.promote_types(l.dtype, accumulate_dtype(q.dtype))
        weight = (l.to(wide) - lse.to(wide)).exp()
        d_o = (weight[..., None] * d_out.to(wide)).to(o.dtype)
        d_l = weight * (d_out.to(wide) * (o.to(wide) - out.to(wide))).sum(-1)
        return torch.autograd.grad((o, l), inputs, (d_o, d_l.to(l.dtype)))
