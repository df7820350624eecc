"""Hugging Face ``transformers`` (5.x) integration: ``attn_implementation="patternstore_dilated"``
and ``"patternstore_sparse"`` (docs/design.md section 7).

``register()`` adds two attention functions to ``transformers.AttentionInterface``
and one mask function per name to ``transformers.AttentionMaskInterface``.
Settings come from the model config attribute ``patternstore_attention`` (a
dict, saved with the model)::

    dilated: {"segment_lengths": [...], "dilation_rates": [...], "scheme": "longnet"}
    sparse:  {"kind": "bigbird", "block_size": 64, "seed": 0, **SparseSpec parameters}

or a mapping by layer type, ``{"full_attention": settings or "dense",
"sliding_attention": "dense"}`` (``attention.hf.layers``): the settings run
the full-attention layers; sliding-window layers (Gemma 2/3, Mistral,
Qwen2 with ``use_sliding_window``, gpt-oss, Cohere 2) compute exactly their
window under the model's own mask.

Guarantees:
- transformers' layouts are taken as they come: query ``(batch, heads, q_len,
  head_dim)``, key/value ``(batch, kv_heads, kv_len, head_dim)`` with
  ``kv_heads`` dividing ``heads`` (grouped-query attention), the whole cache.
  They reach the attention modules as ``.transpose(1, 2)`` views and slices
  of the cache: no transposing copy, no repeated keys. The result is
  ``(batch, q_len, heads, head_dim_v)``; the value head_dim may differ from
  the query/key one (multi-head latent attention) where the module takes it.
- Queries may be fewer than keys (a decode step, chunked prefill): query row
  ``i`` is position ``kv_len - q_len + i`` (bottom-right aligned), so a cached
  step computes exactly the rows of the full-sequence forward.
- Padding from the 2-D ``attention_mask`` (``attention.hf.padding``): each
  batch row's pattern starts at its first real token, so a padded batch
  gives each sequence exactly what it gets alone; never a ``q_len x kv_len``
  mask in a dilated or block-sparse layer (a dense layer takes the model's).
- ``torch.compile(model, fullgraph=True)`` and ``torch.export``: a layer is
  one opaque custom op (``attention.hf.traced``). Modules are built at
  trace time, and a dilated plan (length-free) is looked up then too; the
  graph holds no lock, store
  lookup or module construction, and depends on shapes only, so a new
  padding pattern or static-cache step does not recompile, and with
  ``dynamic=True`` (with or without ``fullgraph``) one graph serves every
  length. Training (inputs or sinks that require grad): the op keeps its output and
  log-sum-exp and its backward starts from them (``attention.hf.training``),
  no second forward. Limits: a sparse
  layout depends on the length, so the module looks up each new length on
  the op's first run at it (then from its cache), as in eager use; a
  prefill or training call given a mask syncs with the host once per layer
  (the row layout), so it cannot be captured in a CUDA graph (a static-cache
  decode step reads nothing on the host and can: ``attention.hf.decode``);
  attention dropout is refused under compile.
- Saved models keep their attention: the first eager forward records
  ``config.attn_implementation``, which ``save_pretrained`` writes and a plain
  ``from_pretrained`` restores (after ``register()``). A config that carries
  ``patternstore_attention`` but runs another implementation warns once.
- ``softcap`` (Gemma 2's ``attn_logit_softcapping``) and attention sinks
  (gpt-oss's ``s_aux``) are computed exactly in every layer, eager, compiled
  or exported: the modules' ``softcap`` and ``sinks``
  (``attention.kernels.sinks``); a traced full-attention layer hands its
  sinks to its op, and a training step gets their gradient.
- Packed batches (``DataCollatorWithFlattening``): ``attention.hf.packed``.
- Unsupported arguments raise ``ValueError`` instead of being ignored: a
  mask function other than causal, bidirectional or packed,
  layer types other than full and sliding attention, a sliding-window or
  chunked cache on a full-attention layer, ``sinks`` under another name
  than ``s_aux``, ``position_bias``, ``output_attentions=True``, a 4-D mask
  of another shape, additive float masks.
- Attention modules are built once per (implementation, settings, store,
  scaling, dropout) and kept (the last ``MAX_MODULES``), so their plan and
  layout caches live across calls and layers.

``transformers`` is optional (``pip install patternstore[hf]``); ``import
attention`` never imports this module.
"""

from __future__ import annotations

import functools
import operator
import warnings
import weakref
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import has_static_value

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "attention.hf needs transformers >= 5 (pip install 'patternstore[hf]')"
    ) from error

from patternstore.store import PatternStore

from attention.hf.modules import DILATED, SPARSE, attention_module, frozen, use_store
from attention.hf.padding import attend_padded, check_config, check_mask, padding_mask
from attention.checks import check_dropout, check_sinks, check_softcap, check_softmax_scale
from attention.hf.packed import attend_packed, dense_documents, packed_documents
from attention.hf.layers import CONFIG_ATTRIBUTE, DENSE, FULL, call_layer_type, dense_attention, layer_entry
from attention.hf.traced import op_modules, traced_capturable, traced_module_key

__all__ = [
    "register",
    "dilated_attention_forward",
    "sparse_attention_forward",
    "implementation_for",
]

_UNSUPPORTED = {
    "sinks": "attention sinks named 'sinks' (transformers passes them as s_aux)",
    "position_bias": "an additive position bias",
    "head_mask": "a head mask",
}


# ------------------------------------------------------------------ register
def register(store: Optional[PatternStore] = None) -> None:
    """Register ``"patternstore_dilated"`` and ``"patternstore_sparse"``
    (attention and mask functions) with transformers. Patterns come from
    ``store`` (None: ``patternstore.default_store()``). Calling it again
    replaces the store; modules built for the old one are dropped.

    It also wraps the mask functions of the implementations registered
    before it (sdpa, eager, flash, flex) so that a model whose config carries
    ``patternstore_attention`` but runs one of them warns once, at its first
    forward, naming the ``attn_implementation`` that restores its attention."""
    if store is not None and not isinstance(store, PatternStore):
        raise ValueError(f"store must be a PatternStore or None, got {type(store).__name__}")
    use_store(store)
    op_modules.clear()
    AttentionInterface.register(DILATED, dilated_attention_forward)
    AttentionInterface.register(SPARSE, sparse_attention_forward)
    AttentionMaskInterface.register(DILATED, padding_mask)
    AttentionMaskInterface.register(SPARSE, padding_mask)
    masks = AttentionMaskInterface()
    for name in masks.valid_keys():
        if name not in (DILATED, SPARSE) and not hasattr(masks[name], _WRAPPED):
            AttentionMaskInterface.register(name, _warning_when_settings_unused(masks[name]))


# ------------------------------------------------- persistence and checks
# transformers does not save the attention implementation (config.to_dict
# drops ``_attn_implementation_internal``), but a config.json key
# ``attn_implementation`` is restored by a plain ``from_pretrained``: the
# config's __init__ takes it as the ``attn_implementation`` argument. So the
# first eager call of a layer records it as that instance attribute, which
# ``save_pretrained`` writes. Limits: a model saved before its first eager
# forward (built, or loaded, and saved at once; or run only compiled) does
# not carry it, and the warning below names the argument on reload; one
# switched with ``set_attn_implementation`` after a forward carries what it
# last ran through this module.
_WRAPPED = "_patternstore_wrapped"
# The configs warned about, by id: weak values, so a dead config's id (which
# Python reuses) never silences the warning for a new config.
_warned: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()


def _remember_implementation(config: Any, impl: str) -> None:
    if config is not None and getattr(config, "__dict__", {}).get("attn_implementation") != impl:
        config.attn_implementation = impl


def implementation_for(settings: Any) -> Optional[str]:
    """The implementation ``patternstore_attention`` settings are written for
    (dilated settings name segment lengths, sparse ones a kind; a mapping by
    layer type, those of its full-attention layers), or None."""
    if isinstance(settings, Mapping) and isinstance(settings.get(FULL), Mapping):
        settings = settings[FULL]
    if isinstance(settings, Mapping):
        if "segment_lengths" in settings:
            return DILATED
        if "kind" in settings:
            return SPARSE
    return None


def _warning_when_settings_unused(mask_function: Callable) -> Callable:
    @functools.wraps(mask_function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        config = kwargs.get("config")
        if config is not None and not torch.compiler.is_compiling() and _warned.get(id(config)) is not config:
            wanted = implementation_for(getattr(config, CONFIG_ATTRIBUTE, None))
            if wanted is not None and getattr(config, "_attn_implementation", None) not in (DILATED, SPARSE):
                _warned[id(config)] = config
                warnings.warn(
                    f"this model's config carries {CONFIG_ATTRIBUTE} but runs "
                    f"attn_implementation={config._attn_implementation!r}, not patternstore attention; "
                    f"load it with from_pretrained(..., attn_implementation={wanted!r}) (after "
                    f"attention.hf.register()) to restore it",
                    UserWarning, stacklevel=2,
                )
        return mask_function(*args, **kwargs)

    setattr(checked, _WRAPPED, True)
    return checked


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
    config = getattr(module, "config", None)
    _check_arguments(kwargs)
    check_config(config)
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a (batch, heads, seq, head_dim) tensor, got {getattr(x, 'shape', x)}")
    entry = layer_entry(_settings(impl, config), call_layer_type(kwargs), CONFIG_ATTRIBUTE)
    # transformers' scaling is our softmax_scale
    scaling, dropout = check_softmax_scale(_value_of(scaling)), check_dropout(_value_of(dropout))
    softcap, sinks = check_softcap(kwargs.get("softcap")), check_sinks(kwargs.get("s_aux"), query.transpose(1, 2))
    is_causal = kwargs.get("is_causal")
    is_causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    if entry == DENSE:
        if not torch.compiler.is_compiling():
            _remember_implementation(config, impl)
        attention_mask = dense_documents(impl, attention_mask, kwargs, query, key, is_causal)
        return dense_attention(query, key, value, attention_mask, scale=scaling if scaling is not None else
                               query.shape[-1] ** -0.5, is_causal=is_causal, softcap=softcap, sinks=sinks,
                               dropout=dropout)
    check_mask(attention_mask)
    settings, documents = entry, packed_documents(impl, attention_mask, kwargs, query, key)  # None unless packed
    if torch.compiler.is_compiling():
        if dropout > 0:
            raise ValueError(
                f"attn_implementation={impl!r} under torch.compile runs without attention dropout; "
                f"got dropout={dropout} (set the config's attention_dropout to 0 or train eagerly)"
            )
        # operator.index: the head counts and dims as ints (dynamo guards them) under dynamic=True.
        heads = tuple(operator.index(n) for n in (query.shape[1], key.shape[1], query.shape[-1], value.shape[-1]))
        module_key = traced_module_key(impl, frozen(settings), scaling, dropout, heads, is_causal, softcap)
        # A decode step's length 1 is static (dynamo specializes sizes 0 and 1); a symbolic length is longer.
        one_row = has_static_value(query.shape[2]) and query.shape[2] == 1
        fixed_mask = attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[1] == 2
        if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (query, key, value, sinks)):
            return torch.ops.attention.hf_attend_lse(query, key, value, attention_mask, module_key, is_causal,
                                                     sinks)[0]
        if traced_capturable(module_key, query.device.type, one_row, fixed_mask, is_causal):
            return torch.ops.attention.hf_attend(query, key, value, attention_mask, module_key, is_causal, sinks)
        return torch.ops.attention.hf_attend_padded(query, key, value, attention_mask, module_key, is_causal, sinks)
    _remember_implementation(config, impl)
    attention = attention_module(impl, settings, scaling, dropout, softcap)
    if documents is not None:
        return attend_packed(attention, query, key, value, documents, is_causal, sinks)
    return attend_padded(attention, query, key, value, attention_mask, is_causal, sinks)


def _value_of(number: Any) -> Any:
    """``number`` as a Python float where it is one. Under
    ``torch.compile(dynamic=True)`` dynamo hands a layer's float attributes
    (transformers' ``scaling`` and ``dropout``) over as symbolic floats, which
    neither the checks nor the module key can read; ``float.hex`` makes dynamo
    read the value (guarded: a model whose value changes recompiles), so the
    key holds a constant and the graph takes no float input."""
    return float.fromhex(number.hex()) if isinstance(number, float) else number


# ------------------------------------------------------------------ settings
def _settings(impl: str, config: Any) -> Mapping:
    settings = getattr(config, CONFIG_ATTRIBUTE, None)
    if not isinstance(settings, Mapping):
        raise ValueError(
            f"attn_implementation={impl!r} needs the model config attribute {CONFIG_ATTRIBUTE!r}: a dict such as "
            + ('{"segment_lengths": [2048, 4096], "dilation_rates": [1, 2]}' if impl == DILATED
               else '{"kind": "bigbird", "block_size": 64, "attention": "unidirectional"}')
            + f"; got {settings!r}"
        )
    return settings
