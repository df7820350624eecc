"""The one validation of each concept every attention entry point shares.

Guarantees: each ``check_*`` raises ValueError naming the field and what is
allowed, before any work, and returns the checked value; every module and
functional entry point calls these, so a mistake gets one message. Only
shapes, dtypes and devices are read: nothing is synchronized with a device.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from patternstore.fields import as_int

__all__ = [
    "check_attention_inputs",
    "check_count",
    "check_dropout",
    "check_is_causal",
    "check_sinks",
    "check_softcap",
    "check_softmax_scale",
    "default_scale",
]


def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None, *,
                           value_head_dim: bool = True) -> None:
    """ValueError naming the field unless q is ``(batch, q_len, heads,
    head_dim)``, k ``(batch, kv_len, kv_heads, head_dim)`` and v ``(batch,
    kv_len, kv_heads, value_head_dim)`` (the value head_dim may differ from
    q/k's, as in multi-head latent attention, unless ``value_head_dim`` is
    False: for an entry point that does not compute that) with ``kv_len >=
    q_len`` and ``heads % kv_heads == 0``, all floating, one dtype and
    device, nothing empty but the batch; ``key_padding_mask`` None or ``(batch, kv_len)``
    bool (True = padding) on that device."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, seq, heads, head_dim), got shape {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"k and v must have one shape (batch, kv_len, kv_heads) before their head_dims (which may differ); "
            f"got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not value_head_dim and k.shape[-1] != v.shape[-1]:
        raise ValueError(
            f"k and v must have one shape (batch, kv_len, kv_heads, head_dim) here: this attention takes no value "
            f"head_dim of its own; got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, q_len, h, d = q.shape
    kb, kv_len, h_kv, kd = k.shape
    if (b, d) != (kb, kd):
        raise ValueError(
            f"q and k must have the same batch and head_dim; got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if 0 in q.shape[1:] or 0 in k.shape[1:] or 0 in v.shape[1:]:
        raise ValueError(
            f"q, k and v must not be empty but for the batch (an empty batch gives an empty output), got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}"
        )
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


def check_count(name: str, value: object, minimum: int = 1, maximum: Optional[int] = None) -> int:
    """An int (``patternstore.fields.as_int``: numpy's integers too, never a
    bool) in ``[minimum, maximum]``, as a Python int; ValueError naming it."""
    number = as_int(value)
    if number is None or number < minimum or (maximum is not None and number > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an int {allowed}, got {value!r}")
    return number


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_softmax_scale(softmax_scale: object) -> Optional[float]:
    """None (1/sqrt(head_dim)) or a finite number > 0, as a float."""
    if softmax_scale is None:
        return None
    if not (_is_real(softmax_scale) and math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be None or a finite number > 0, got {softmax_scale!r}")
    return float(softmax_scale)


def check_softcap(softcap: object) -> Optional[float]:
    """None (no cap) or a finite number > 0, as a float: scores become
    ``softcap * tanh(scores / softcap)`` (Gemma 2's ``attn_logit_softcapping``)."""
    if softcap is None:
        return None
    if not (_is_real(softcap) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    return float(softcap)


def check_sinks(sinks: object, q: Tensor) -> Optional[Tensor]:
    """None or one floating sink logit per query head of ``q`` ``(batch,
    q_len, heads, head_dim)``: a ``(heads,)`` tensor on q's device (gpt-oss's
    ``s_aux``); shapes, dtypes and devices only."""
    if sinks is None:
        return None
    heads = q.shape[2]
    if not isinstance(sinks, Tensor) or not sinks.dtype.is_floating_point or tuple(sinks.shape) != (heads,):
        raise ValueError(f"sinks must be None or a floating ({heads},) tensor (one logit per query head), got "
                         f"{getattr(sinks, 'dtype', type(sinks).__name__)} {tuple(getattr(sinks, 'shape', ()))}")
    if sinks.device != q.device:
        raise ValueError(f"sinks is on {sinks.device}, q on {q.device}")
    return sinks


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
