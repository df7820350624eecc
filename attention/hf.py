"""Hugging Face ``transformers`` (5.x) integration: ``attn_implementation="patternstore_dilated"``
and ``"patternstore_sparse"`` (docs/design.md section 7).

``register()`` adds two attention functions to ``transformers.AttentionInterface``
and one mask function per name to ``transformers.AttentionMaskInterface``.
Settings come from the model config attribute ``patternstore_attention`` (a
dict, saved with the model)::

    dilated: {"segment_lengths": [...], "dilation_rates": [...], "scheme": "longnet"}
    sparse:  {"kind": "bigbird", "block_size": 64, "seed": 0, **SparseSpec parameters}

Guarantees:
- transformers' layouts are taken as they come: query ``(batch, heads, q_len,
  head_dim)``, key/value ``(batch, kv_heads, kv_len, head_dim)`` with
  ``kv_heads`` dividing ``heads`` (grouped-query attention), the whole cache.
  They reach the attention modules as ``.transpose(1, 2)`` views and slices
  of the cache: no transposing copy, no repeated keys. The result is
  ``(batch, q_len, heads, head_dim)``.
- Queries may be fewer than keys (a decode step, chunked prefill): query row
  ``i`` is position ``kv_len - q_len + i`` (bottom-right aligned), so a cached
  step computes exactly the rows of the full-sequence forward.
- The mask function never builds a ``q_len x kv_len`` mask. It returns a
  ``(batch, 1, 1, filled)`` bool tensor, True = a real token, where ``filled``
  is how many cache rows hold tokens (a static cache is longer). As a 4-D
  tensor it passes through ``create_causal_mask`` and ``generate``'s mask
  preparation unchanged.
- Padding from the 2-D ``attention_mask``. Each batch row's pattern starts at
  its first real token (left padding, as ``generate`` pads), so a padded
  batch gives each sequence exactly what it gets alone. Cost: one module call
  per run of consecutive batch rows with the same amount of left padding
  (one call for an unpadded batch), each on views of its rows; padding after
  a row's first real token is passed on as ``key_padding_mask``.
- Unsupported arguments raise ``ValueError`` instead of being ignored:
  packed sequences (a mask function other than causal or bidirectional),
  sliding-window or chunked caches, ``sliding_window``, ``softcap``,
  attention sinks, ``position_bias``, ``output_attentions=True``, a 4-D mask
  of another shape, additive float masks.
- Attention modules are built once per (implementation, settings, store,
  scaling, dropout) and kept (the last ``MAX_MODULES``), so their plan and
  layout caches live across calls and layers.

``transformers`` is optional (``pip install patternstore[hf]``); ``import
attention`` never imports this module.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Mapping, NamedTuple, Optional

import torch
from torch import Tensor, nn

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        AttentionMaskInterface,
        bidirectional_mask_function,
        causal_mask_function,
    )
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "attention.hf needs transformers >= 5 (pip install 'patternstore[hf]')"
    ) from error

from patternstore.store import PatternStore

from .dilated import ImprovedDilatedAttention
from .kernels import check_dropout, check_softmax_scale
from .sparse import BlockSparseAttention

__all__ = [
    "DILATED",
    "SPARSE",
    "CONFIG_ATTRIBUTE",
    "register",
    "dilated_attention_forward",
    "sparse_attention_forward",
    "padding_mask",
]

DILATED = "patternstore_dilated"
SPARSE = "patternstore_sparse"
CONFIG_ATTRIBUTE = "patternstore_attention"

# Attention modules kept at once: one per distinct (settings, scaling,
# dropout) a process uses, usually one per model; the bound only stops a
# process that builds many differently configured models from growing.
MAX_MODULES = 32

_DILATED_KEYS = ("segment_lengths", "dilation_rates", "scheme")
_UNSUPPORTED = {
    "sliding_window": "sliding-window attention",
    "softcap": "soft-capping of attention scores",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "position_bias": "an additive position bias",
    "head_mask": "a head mask",
}

_store: Optional[PatternStore] = None
_modules: "OrderedDict[tuple, nn.Module]" = OrderedDict()
_modules_lock = threading.Lock()  # held only for dict operations, never while waiting on anything


# ------------------------------------------------------------------ register
def register(store: Optional[PatternStore] = None) -> None:
    """Register ``"patternstore_dilated"`` and ``"patternstore_sparse"``
    (attention and mask functions) with transformers. Patterns come from
    ``store`` (None: ``patternstore.default_store()``). Calling it again
    replaces the store; modules built for the old one are dropped."""
    global _store
    if store is not None and not isinstance(store, PatternStore):
        raise ValueError(f"store must be a PatternStore or None, got {type(store).__name__}")
    with _modules_lock:
        _store = store
        _modules.clear()
    AttentionInterface.register(DILATED, dilated_attention_forward)
    AttentionInterface.register(SPARSE, sparse_attention_forward)
    AttentionMaskInterface.register(DILATED, padding_mask)
    AttentionMaskInterface.register(SPARSE, padding_mask)


# ------------------------------------------------------------- mask function
class RowLayout(NamedTuple):
    """Where each batch row's tokens are: ``filled`` cache rows hold tokens;
    row b's first real token is at ``starts[b]`` (``filled`` if none), and
    ``holes[b]`` says whether padding follows it."""

    filled: int
    starts: tuple[int, ...]
    holes: tuple[bool, ...]


_LAYOUT_ATTRIBUTE = "_patternstore_row_layout"


def _row_layout_of(real: Tensor) -> RowLayout:
    """``real`` (batch, filled) bool, True = token: one host sync."""
    filled = real.shape[-1]
    count = real.sum(-1)
    first = torch.where(count > 0, real.to(torch.uint8).argmax(-1), filled)
    holes = count < filled - first
    starts, gaps = torch.stack((first, holes.to(first.dtype))).tolist()
    return RowLayout(filled, tuple(starts), tuple(bool(g) for g in gaps))


def padding_mask(
    batch_size: int,
    q_length: Optional[int] = None,
    kv_length: Optional[int] = None,
    q_offset: Any = 0,
    kv_offset: int = 0,
    mask_function: Callable = causal_mask_function,
    attention_mask: Optional[Tensor] = None,
    device: Any = "cpu",
    cache_position: Optional[Tensor] = None,
    **kwargs: Any,
) -> Tensor:
    """The ``AttentionMaskInterface`` function of both implementations:
    ``(batch, 1, 1, filled)`` bool, True = real token, ``filled = q_offset +
    q_length``. Older transformers pass ``cache_position`` instead of
    ``q_length`` and ``q_offset``; both are understood."""
    if cache_position is not None:
        q_length, q_offset = cache_position.shape[-1], cache_position[..., 0]
    if mask_function is not causal_mask_function and mask_function is not bidirectional_mask_function:
        raise ValueError(
            "patternstore attention supports plain causal or bidirectional masks with padding only; "
            "this model asked for another mask (packed sequences with restarting position_ids, "
            "block_sequence_ids, or an or/and mask function)"
        )
    if kv_offset:
        raise ValueError(
            f"patternstore attention needs the whole cache (kv_offset 0); got kv_offset={kv_offset} "
            "(a sliding-window or chunked cache)"
        )
    filled = int(q_offset) + int(q_length)  # a static cache's offset is a tensor: one sync
    if kv_length is not None and filled > kv_length:
        raise ValueError(f"q_offset + q_length = {filled} exceeds kv_length = {kv_length}")
    if attention_mask is None:
        real = torch.ones(batch_size, filled, dtype=torch.bool, device=device)
    else:
        real = _real_tokens(attention_mask, filled)
    mask = real[:, None, None, :]
    # Computed once per forward here instead of once per layer in the attention
    # function (which recomputes it if a copy of the mask lost the attribute).
    setattr(mask, _LAYOUT_ATTRIBUTE, _row_layout_of(real))
    return mask


def _real_tokens(attention_mask: Tensor, filled: int) -> Tensor:
    """A 2-D mask (1 / True = token) as (batch, filled) bool; columns past its
    end are the new tokens (real)."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be 2-D (batch, kv_len), got shape {tuple(attention_mask.shape)}")
    if attention_mask.dtype.is_floating_point:
        raise ValueError("attention_mask must be a 0/1 or bool padding mask, not an additive float mask")
    real = attention_mask[:, :filled].to(torch.bool)
    if real.shape[-1] < filled:
        real = torch.nn.functional.pad(real, (0, filled - real.shape[-1]), value=True)
    return real


def _row_layout(attention_mask: Optional[Tensor], batch: int, kv_len: int) -> tuple[RowLayout, Optional[Tensor]]:
    """(layout, real tokens (batch, filled) or None) from what the model passed."""
    if attention_mask is None:
        return RowLayout(kv_len, (0,) * batch, (False,) * batch), None
    if not isinstance(attention_mask, Tensor):
        raise ValueError(f"attention_mask must be a tensor or None, got {type(attention_mask).__name__}")
    if attention_mask.dim() == 4:
        if attention_mask.shape[1:3] != (1, 1) or attention_mask.dtype != torch.bool:
            raise ValueError(
                "patternstore attention takes padding from a 2-D attention_mask (register() installs the mask "
                f"function that passes it on); got a 4-D {attention_mask.dtype} mask of shape "
                f"{tuple(attention_mask.shape)}, which it cannot honour"
            )
        real = attention_mask[:, 0, 0, :]
    else:
        real = _real_tokens(attention_mask, attention_mask.shape[-1])
    if real.shape[0] not in (1, batch):
        raise ValueError(f"attention_mask has batch {real.shape[0]}, the query has batch {batch}")
    if real.shape[-1] > kv_len:
        raise ValueError(f"attention_mask covers {real.shape[-1]} keys, the cache holds {kv_len}")
    layout = getattr(attention_mask, _LAYOUT_ATTRIBUTE, None) or _row_layout_of(real)
    if len(layout.starts) != batch:  # a (1, ...) mask shared by the batch
        layout = RowLayout(layout.filled, layout.starts * batch, layout.holes * batch)
        real = real.expand(batch, -1)
    return layout, real


# ------------------------------------------------------- attention functions
def dilated_attention_forward(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
    dropout: float = 0.0, scaling: Optional[float] = None, **kwargs: Any,
) -> tuple[Tensor, None]:
    """``AttentionInterface`` function of ``"patternstore_dilated"``."""
    return _forward(DILATED, module, query, key, value, attention_mask, dropout, scaling, kwargs), None


def sparse_attention_forward(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
    dropout: float = 0.0, scaling: Optional[float] = None, **kwargs: Any,
) -> tuple[Tensor, None]:
    """``AttentionInterface`` function of ``"patternstore_sparse"``."""
    return _forward(SPARSE, module, query, key, value, attention_mask, dropout, scaling, kwargs), None


def _check_arguments(kwargs: Mapping[str, Any]) -> None:
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"patternstore attention does not support {what} ({name}={kwargs[name]!r})")
    if kwargs.get("output_attentions"):
        raise ValueError("patternstore attention never materializes attention weights: output_attentions=True")


def _forward(impl, module, query, key, value, attention_mask, dropout, scaling, kwargs) -> Tensor:
    _check_arguments(kwargs)
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a (batch, heads, seq, head_dim) tensor, got {getattr(x, 'shape', x)}")
    attention = _attention_module(impl, getattr(module, "config", None), scaling, dropout)
    is_causal = kwargs.get("is_causal")
    is_causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    batch, _, q_len, _ = query.shape
    layout, real = _row_layout(attention_mask, batch, key.shape[2])
    if layout.filled < q_len:
        raise ValueError(f"the mask covers {layout.filled} keys, fewer than the {q_len} queries")
    # (batch, seq, heads, head_dim) views: the cache's filled rows, untouched.
    q = query.transpose(1, 2)
    k = key[:, :, : layout.filled].transpose(1, 2)
    v = value[:, :, : layout.filled].transpose(1, 2)
    if not any(layout.starts) and not any(layout.holes):
        return attention(q, k, v, is_causal=is_causal)
    return _per_padding(attention, q, k, v, layout, real, is_causal)


def _per_padding(attention, q, k, v, layout: RowLayout, real: Tensor, is_causal: bool) -> Tensor:
    """Padded batches: each run of rows with one left-padding amount ``s``
    attends on its own, over keys ``s:`` and the queries at positions >= s, so
    its pattern starts at its first token. Padded query rows output 0."""
    batch, q_len, heads, _ = q.shape
    filled = layout.filled
    out = q.new_zeros(batch, q_len, heads, v.shape[-1])
    row = 0
    while row < batch:
        start, holes = layout.starts[row], layout.holes[row]
        end = row + 1
        # Rows with padding after their first token carry their own key mask; others run together.
        while not holes and end < batch and layout.starts[end] == start and not layout.holes[end]:
            end += 1
        first_query = max(0, start - (filled - q_len))
        if first_query < q_len:
            rows = slice(row, end)
            key_padding_mask = ~real[rows, start:] if holes else None
            out[rows, first_query:] = attention(
                q[rows, first_query:], k[rows, start:], v[rows, start:],
                is_causal=is_causal, key_padding_mask=key_padding_mask,
            )
        row = end
    return out


# ------------------------------------------------------------------ settings
def _attention_module(impl: str, config: Any, scaling: Optional[float], dropout: float) -> nn.Module:
    """The attention module for these settings, built on first use."""
    settings = getattr(config, CONFIG_ATTRIBUTE, None)
    if not isinstance(settings, Mapping):
        raise ValueError(
            f"attn_implementation={impl!r} needs the model config attribute {CONFIG_ATTRIBUTE!r}: a dict such as "
            + ('{"segment_lengths": [2048, 4096], "dilation_rates": [1, 2]}' if impl == DILATED
               else '{"kind": "bigbird", "block_size": 64, "attention": "unidirectional"}')
            + f"; got {settings!r}"
        )
    scaling, dropout = check_softmax_scale(scaling), check_dropout(dropout)  # transformers' scaling is our softmax_scale
    store = _store
    cache_key = (impl, _frozen(settings), id(store), scaling, dropout)
    with _modules_lock:
        attention = _modules.get(cache_key)
        if attention is not None:
            _modules.move_to_end(cache_key)
            return attention
    attention = _build(impl, dict(settings), scaling, dropout, store)
    with _modules_lock:
        attention = _modules.setdefault(cache_key, attention)  # a racing thread's module wins
        while len(_modules) > MAX_MODULES:
            _modules.popitem(last=False)
    return attention


def _frozen(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def _build(impl: str, settings: dict, scaling: Optional[float], dropout: float, store) -> nn.Module:
    where = f"config.{CONFIG_ATTRIBUTE} for attn_implementation={impl!r}"
    try:
        if impl == DILATED:
            unknown = sorted(set(settings) - set(_DILATED_KEYS))
            if unknown or "segment_lengths" not in settings or "dilation_rates" not in settings:
                raise ValueError(
                    f"needs 'segment_lengths' and 'dilation_rates' (optional 'scheme'), got keys {sorted(settings)}"
                )
            attention = ImprovedDilatedAttention(
                settings["segment_lengths"], settings["dilation_rates"], scheme=settings.get("scheme", "longnet"),
                softmax_scale=scaling, dropout=dropout, store=store,
            )
        else:
            if "kind" not in settings:
                raise ValueError(f"needs 'kind' (and optionally 'block_size', 'seed' and the kind's "
                                 f"SparseSpec parameters), got keys {sorted(settings)}")
            kind = settings.pop("kind")
            attention = BlockSparseAttention(kind, softmax_scale=scaling, dropout=dropout, store=store, **settings)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from error
    # transformers passes dropout 0 outside training: the module drops exactly when it was given a rate.
    return attention.train(dropout > 0)
