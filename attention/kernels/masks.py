"""The exclusions and dropout factors of one ``attention.kernels.attend``
call: their validation (``check_call``), their combination into one bool
exclusion, their restriction to a key range or a GQA head residue, the rows
they leave without a key, and the zeroing of masked keys' k and v rows.

Guarantees: ``check_call`` raises ValueError naming the argument before any
work and reads shapes only (no device sync); masks stay in their own
broadcastable shapes (views), except that ``combined_mask`` materializes the
broadcast of ``mask`` with the ``(B, 1, 1, N)`` key mask when both are given.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from attention.checks import check_dropout
from attention.kernels.softmax_parts import accumulate_dtype

__all__ = ["AttendCall", "check_call", "combined_mask", "dead_rows", "head_residue", "key_range", "zero_masked_keys"]


class AttendCall(NamedTuple):
    """One attend call's checked exclusions and dropout factors."""

    key_mask: Optional[Tensor]  # (B, N) bool
    mask: Optional[Tensor]      # 4-d bool, broadcastable to (B, H, M, N)
    factors: Optional[Tensor]   # 4-d keep / (1 - p), broadcastable to (B, H, M, N)


def check_call(q: Tensor, k: Tensor, v: Tensor, key_mask, mask, dropout_p, keep) -> AttendCall:
    """ValueError naming the argument unless the masks fit (B, H, M, N) and
    ``keep`` comes with ``dropout_p``; shapes only, no device sync."""
    b, h, m, _ = q.shape
    n = k.shape[2]
    full = (b, h, m, n)
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree on (B, H_kv, N); got {tuple(k.shape)}, {tuple(v.shape)}")
    if key_mask is not None and (not isinstance(key_mask, Tensor) or key_mask.dtype != torch.bool
                                 or tuple(key_mask.shape) != (b, n)):
        raise ValueError(f"key_mask must be None or a (B, N) = {(b, n)} bool tensor, True = masked")
    shaped = []
    for name, x in (("mask", mask), ("keep", keep)):
        if x is not None:
            fits = (isinstance(x, Tensor) and x.dtype == torch.bool and x.dim() <= 4
                    and all(a in (1, f) for a, f in zip(reversed(x.shape), reversed(full))))
            if not fits:
                raise ValueError(f"{name} must be None or a bool tensor broadcastable to (B, H, M, N) = {full}")
            x = x.reshape((1,) * (4 - x.dim()) + tuple(x.shape))
        shaped.append(x)
    mask, keep = shaped
    dropout_p = check_dropout(dropout_p)
    if dropout_p > 0 and keep is None:
        raise ValueError(f"keep (the dropout keep mask) must be given with dropout_p={dropout_p}")
    factors = None if keep is None else keep.to(accumulate_dtype(q.dtype)) / (1.0 - dropout_p)
    return AttendCall(key_mask, mask, factors)


def zero_masked_keys(k: Tensor, v: Tensor, key_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """k and v with the rows of masked keys set to 0, so that a NaN or Inf
    there cannot meet a 0 probability (an additive -inf mask plus a NaN
    score is NaN; 0 * NaN is NaN in p @ v). Two masked_fill ops per call,
    O(N (d + d_v)) elements per key/value head, against the kernel's
    O(M N (d + d_v)) per query head."""
    if key_mask is None:
        return k, v
    rows = key_mask[:, None, :, None]
    return k.masked_fill(rows, 0.0), v.masked_fill(rows, 0.0)


def combined_mask(call: AttendCall) -> Optional[Tensor]:
    """The key mask and ``mask`` as one bool exclusion, broadcastable to (B, H, M, N)."""
    keys = None if call.key_mask is None else call.key_mask[:, None, None, :]
    if call.mask is None:
        return keys
    return call.mask if keys is None else call.mask | keys


def key_range(x: Optional[Tensor], keys: slice) -> Optional[Tensor]:
    """A broadcastable (.., N) tensor restricted to a key range."""
    return x if x is None or x.shape[-1] == 1 else x[..., keys]


def head_residue(x: Optional[Tensor], r: int, rep: int) -> Optional[Tensor]:
    """A broadcastable (B, H, ..) tensor at query heads r, r + rep, ..."""
    return x if x is None or x.shape[1] == 1 else x[:, r::rep]


def dead_rows(masked: Optional[Tensor], m: int, n: int, causal: bool) -> Optional[Tensor]:
    """(B', H', M) True where a query has no live key (None: no exclusion,
    every row has one); causal rows bottom-right aligned (row i sees keys
    [0, N - M + i])."""
    if masked is None:
        return None
    if masked.shape[1] == masked.shape[2] == 1:  # one exclusion per key: no (M, N) matrix
        keys = masked[:, 0, 0]
        if causal:
            return ((~keys).cumsum(-1) == 0)[:, None, n - m:]
        return keys.all(-1)[:, None, None]
    live = ~masked
    if causal:
        live = live & torch.ones(m, n, dtype=torch.bool, device=masked.device).tril(n - m)
    return ~live.any(-1)
