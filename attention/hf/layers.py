"""Layer types for the Hugging Face integration (``attention.hf``): which
attention each layer of a mixed model runs, and the exact dense path that
sliding-window layers take (docs/design.md section 7).

Models such as Gemma 2/3, gpt-oss, Cohere 2 and Qwen2 with
``use_sliding_window`` declare a type per layer (``config.layer_types``:
``"full_attention"`` or ``"sliding_attention"``); Mistral with a
``sliding_window`` makes every layer sliding. transformers passes
``sliding_window=w`` to a sliding layer's attention function and builds its
mask with ``create_sliding_window_causal_mask`` (which gives the mask
function ``local_size=w``), so both the mask function and the attention
function know the layer type of the call.

``patternstore_attention`` is either one implementation's settings (they
apply to the full-attention layers; sliding layers take ``"dense"``) or a
mapping by layer type::

    {"full_attention": {...settings...} or "dense", "sliding_attention": "dense"}

(a missing type is ``"dense"``). ``"dense"``: exact attention under the
model's own mask for that layer type, made by transformers' ``sdpa_mask``
(its window, its sliding-window cache's offset, its padding), so a sliding
layer computes exactly its window with the model's semantics, whatever its
cache (dynamic, sliding, static, hybrid). A dilated or sparse pattern is no
window: ``"sliding_attention"`` takes ``"dense"`` only.

The dense path is the kernel layer's ``attend`` with the mask as its
structural mask (cost as SDPA with a boolean mask: ``q_len x kv_len``
scores, the mask itself that size), soft-capping by a kernel that takes it
and sinks merged by the log-sum-exp (``attention.kernels.sinks``), as the opaque op
``attention::hf_dense`` with an exact backward from the final out and lse.
Limits: no attention dropout (refused, naming the field).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor

from transformers.masking_utils import sdpa_mask

from attention.kernels.attend import attend, attend_backward
from attention.kernels.softmax_parts import lse_dtype
from attention.kernels.sinks import apply_sinks, sinks_grad

__all__ = ["CONFIG_ATTRIBUTE", "LAYER_TYPES", "DENSE", "layer_entry", "call_layer_type", "mask_layer_type",
           "dense_mask", "dense_attention"]

CONFIG_ATTRIBUTE = "patternstore_attention"  # the model config attribute that holds the settings
FULL, SLIDING = "full_attention", "sliding_attention"
LAYER_TYPES = (FULL, SLIDING)
DENSE = "dense"

Entry = Union[Mapping, str]


def call_layer_type(kwargs: Mapping[str, Any]) -> str:
    """The layer type of an attention call: sliding when transformers passes a window."""
    return SLIDING if kwargs.get("sliding_window") is not None else FULL


def mask_layer_type(kwargs: Mapping[str, Any]) -> str:
    """The layer type a mask is built for: sliding when transformers passes ``local_size``."""
    return SLIDING if kwargs.get("local_size") is not None else FULL


def layer_entry(settings: Any, layer_type: str, attribute: str) -> Entry:
    """What a layer of ``layer_type`` runs under the ``patternstore_attention``
    value ``settings`` (module docstring): one implementation's settings (a
    Mapping) or ``DENSE``. ``attribute`` names the config field in errors."""
    if not isinstance(settings, Mapping):
        raise ValueError(f"config.{attribute} must be a dict (an implementation's settings, or a mapping "
                         f"{{'full_attention': settings or 'dense', 'sliding_attention': 'dense'}}); got {settings!r}")
    typed = [key for key in settings if key in LAYER_TYPES]
    if not typed:
        return settings if layer_type == FULL else DENSE
    others = sorted(str(key) for key in settings if key not in LAYER_TYPES)
    if others:
        raise ValueError(f"config.{attribute} mixes layer types {typed} with other keys {others}; a mapping by "
                         f"layer type takes only the keys {list(LAYER_TYPES)}")
    for kind, entry in settings.items():
        if kind == SLIDING and entry != DENSE:
            raise ValueError(f"config.{attribute}[{SLIDING!r}] must be {DENSE!r} (a sliding-window layer computes "
                             f"exactly its window); got {entry!r}")
        if entry != DENSE and not isinstance(entry, Mapping):
            raise ValueError(f"config.{attribute}[{kind!r}] must be an implementation's settings (a dict) or "
                             f"{DENSE!r}; got {entry!r}")
    return settings.get(layer_type, DENSE)


def dense_mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any, kv_offset: int, mask_function,
               attention_mask: Optional[Tensor], device: Any, **kwargs: Any) -> Tensor:
    """The model's own mask for a dense layer: ``(batch, 1, q_len, kv_len)``
    bool, True = attend (transformers' ``sdpa_mask``, always materialized)."""
    kwargs.pop("allow_is_causal_skip", None)
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_causal_skip=False, device=device, **kwargs)


# ------------------------------------------------------------------ the op
def _dense(query: Tensor, key: Tensor, value: Tensor, excluded: Optional[Tensor], causal: bool, scale: float,
           softcap: Optional[float], sinks: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """-> (out (B, M, H, d_v) in q's dtype, lse (B, M, H)), sinks merged in."""
    out, lse = attend(query, key, value, causal=causal, scale=scale, mask=excluded, softcap=softcap)
    out, lse = out.to(query.dtype).transpose(1, 2), lse.transpose(1, 2)
    if sinks is not None:
        out, lse = apply_sinks(out, lse, sinks)
    return out.contiguous(), lse.contiguous()


@torch.library.custom_op("attention::hf_dense", mutates_args=())
def _dense_op(query: Tensor, key: Tensor, value: Tensor, excluded: Optional[Tensor], causal: bool, scale: float,
              softcap: Optional[float], sinks: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """A dense layer: ``(B, H, M, d)`` query, ``(B, H_kv, N, d / d_v)`` key
    and value, ``excluded`` bool broadcastable to ``(B, H, M, N)`` (True =
    excluded) -> ``(out (B, M, H, d_v), lse (B, M, H))``."""
    return _dense(query, key, value, excluded, causal, scale, softcap, sinks)


@_dense_op.register_fake
def _(query, key, value, excluded, causal, scale, softcap, sinks):
    b, h, m, _ = query.shape
    return query.new_empty(b, m, h, value.shape[-1]), query.new_empty(b, m, h, dtype=lse_dtype(query.dtype))


@torch.library.custom_op("attention::hf_dense_backward", mutates_args=())
def _dense_backward_op(grad: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
                       excluded: Optional[Tensor], causal: bool, scale: float,
                       softcap: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    """Exact ``(dq, dk, dv)`` from the final out and lse (sinks included), contiguous."""
    grads = attend_backward(grad.transpose(1, 2), query, key, value, out.transpose(1, 2), lse.transpose(1, 2),
                            causal=causal, scale=scale, mask=excluded, softcap=softcap)
    return tuple(g.contiguous() for g in grads)


@_dense_backward_op.register_fake
def _(grad, query, key, value, out, lse, excluded, causal, scale, softcap):
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (query, key, value))


def _setup(ctx, inputs, output) -> None:
    query, key, value, excluded, ctx.causal, ctx.scale, ctx.softcap, sinks = inputs
    ctx.save_for_backward(query, key, value, excluded, sinks, *output)


def _backward(ctx, grad: Tensor, grad_lse: Optional[Tensor]):
    query, key, value, excluded, sinks, out, lse = ctx.saved_tensors
    dq, dk, dv = _dense_backward_op(grad, query, key, value, out, lse, excluded, ctx.causal, ctx.scale, ctx.softcap)
    d_sinks = sinks_grad(grad, out, lse, sinks) if sinks is not None and ctx.needs_input_grad[7] else None
    return dq, dk, dv, None, None, None, None, d_sinks


_dense_op.register_autograd(_backward, setup_context=_setup)


def dense_attention(query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor], *, scale: float,
                    is_causal: bool, softcap: Optional[float], sinks: Optional[Tensor], dropout: float) -> Tensor:
    """A dense layer over transformers' layouts -> ``(B, M, H, d_v)``. The
    mask: ``dense_mask``'s form, or None for plain (bottom-right) causal
    attention when ``is_causal``."""
    if dropout > 0:
        raise ValueError(f"patternstore attention's dense layers (sliding-window layers, or a 'dense' layer type) "
                         f"run without attention dropout; got dropout={dropout} (set the config's "
                         f"attention_dropout to 0)")
    if attention_mask is not None:
        b, m, n = query.shape[0], query.shape[2], key.shape[2]
        shaped = attention_mask.dim() == 4 and attention_mask.shape[0] in (1, b) and attention_mask.shape[1:] == (1, m, n)
        if attention_mask.dtype != torch.bool or not shaped:
            raise ValueError(f"a dense layer takes the model's boolean (batch, 1, q_len, kv_len) = ({b}, 1, {m}, {n}) "
                             f"mask (register() installs the mask function that makes it); got a "
                             f"{attention_mask.dtype} mask of shape {tuple(attention_mask.shape)}")
    excluded = None if attention_mask is None else ~attention_mask
    causal = attention_mask is None and is_causal
    out, _ = _dense_op(query, key, value, excluded, causal, scale, softcap, sinks)
    return out
