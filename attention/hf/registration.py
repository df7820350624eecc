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
  one opaque custom op. Modules are built at trace time, and a dilated
  plan (length-free) is looked up then too; the graph holds no lock, store
  lookup or module construction, and depends on shapes only, so a new
  padding pattern or static-cache step does not recompile, and with
  ``dynamic=True`` (with or without ``fullgraph``) one graph serves every
  length. Training (inputs that require grad): the op keeps its output and
  log-sum-exp and its backward starts from them (``attention.hf.training``),
  no second forward. Limits: a sparse
  layout depends on the length, so the module looks up each new length on
  the op's first run at it (then from its cache), as in eager use; the op
  syncs with the host once per layer when it is given a mask (the row
  layout), so it cannot be captured in a CUDA graph; attention dropout is
  refused under compile.
- Saved models keep their attention: the first eager forward records
  ``config.attn_implementation``, which ``save_pretrained`` writes and a plain
  ``from_pretrained`` restores (after ``register()``). A config that carries
  ``patternstore_attention`` but runs another implementation warns once.
- ``softcap`` (Gemma 2's ``attn_logit_softcapping``) and attention sinks
  (gpt-oss's ``s_aux``) are computed exactly in every layer: the modules'
  ``softcap`` and ``sinks`` (``attention.kernels.sinks``). Limit: sinks in a
  full-attention layer under ``torch.compile`` / ``torch.export`` raise (the
  traced op carries no sinks); eager, and the sliding layers, take them.
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
import json
import operator
import warnings
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

from attention.caches import BoundedCache, process_cache
from attention.dilated.module import ImprovedDilatedAttention
import attention.hf.decode as hf_decode
from attention.hf.padding import attend_padded, check_config, check_mask, padding_mask
from attention.checks import check_dropout, check_sinks, check_softcap, check_softmax_scale
from attention.sparse.module import BlockSparseAttention
from attention.hf.packed import attend_packed, dense_documents, packed_documents
from attention.hf.layers import CONFIG_ATTRIBUTE, DENSE, FULL, call_layer_type, dense_attention, layer_entry
from attention.hf.training import attend_backward, attend_with_lse
from attention.kernels.softmax_parts import lse_dtype

__all__ = [
    "DILATED",
    "SPARSE",
    "register",
    "dilated_attention_forward",
    "sparse_attention_forward",
    "implementation_for",
]

DILATED = "patternstore_dilated"
SPARSE = "patternstore_sparse"

# Attention modules kept at once: one per distinct (settings, scaling,
# dropout) a process uses, usually one per model; the bound only stops a
# process that builds many differently configured models from growing.
MAX_MODULES = 32

_DILATED_KEYS = ("segment_lengths", "dilation_rates", "scheme")
_UNSUPPORTED = {
    "sinks": "attention sinks named 'sinks' (transformers passes them as s_aux)",
    "position_bias": "an additive position bias",
    "head_mask": "a head mask",
}

_store: Optional[PatternStore] = None
_modules: BoundedCache[nn.Module] = process_cache(MAX_MODULES)


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
    global _store
    if store is not None and not isinstance(store, PatternStore):
        raise ValueError(f"store must be a PatternStore or None, got {type(store).__name__}")
    _store = store
    _modules.clear()
    _op_modules.clear()
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
_warned: set[int] = set()


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
        if config is not None and not torch.compiler.is_compiling() and id(config) not in _warned:
            wanted = implementation_for(getattr(config, CONFIG_ATTRIBUTE, None))
            if wanted is not None and getattr(config, "_attn_implementation", None) not in (DILATED, SPARSE):
                _warned.add(id(config))
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
        if sinks is not None:
            raise ValueError(
                f"attn_implementation={impl!r} under torch.compile / torch.export takes no attention sinks (s_aux) "
                f"in its full-attention layers: the traced op carries none; run the model eagerly"
            )
        if dropout > 0:
            raise ValueError(
                f"attn_implementation={impl!r} under torch.compile runs without attention dropout; "
                f"got dropout={dropout} (set the config's attention_dropout to 0 or train eagerly)"
            )
        # operator.index: the head counts and dims as ints (dynamo guards them) under dynamic=True.
        heads = tuple(operator.index(n) for n in (query.shape[1], key.shape[1], query.shape[-1], value.shape[-1]))
        module_key = _traced_module_key(impl, _frozen(settings), scaling, dropout, heads, is_causal, softcap)
        # A decode step's length 1 is static (dynamo specializes sizes 0 and 1); a symbolic length is longer.
        one_row = has_static_value(query.shape[2]) and query.shape[2] == 1
        fixed_mask = attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[1] == 2
        if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
            return torch.ops.attention.hf_attend_lse(query, key, value, attention_mask, module_key, is_causal)[0]
        if _traced_capturable(module_key, query.device.type, one_row, fixed_mask, is_causal):
            return torch.ops.attention.hf_attend(query, key, value, attention_mask, module_key, is_causal)
        return torch.ops.attention.hf_attend_padded(query, key, value, attention_mask, module_key, is_causal)
    _remember_implementation(config, impl)
    attention = _attention_module(impl, settings, scaling, dropout, softcap)
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


# ------------------------------------------------------- the traced region
# Under torch.compile / torch.export a layer is one opaque custom op. Its
# module is found at trace time (``_traced_module_key`` runs eagerly, marked
# assume_constant_result: building, validation and the store lookup happen
# there and only the key string reaches the graph); at run time the op reads
# the module from a plain dict and runs the eager code, so the row layout,
# the static cache's fill level and the per-padding calls are data, not
# graph structure: one graph serves every padding pattern. The key is
# portable (an exported program rebuilds the module in another process).
_op_modules: BoundedCache[nn.Module] = process_cache(MAX_MODULES)


@torch.compiler.assume_constant_result
def _traced_module_key(
    impl: str, frozen_settings: tuple, scaling: Optional[float], dropout: float,
    heads: tuple[int, int, int, int], is_causal: bool, softcap: Optional[float] = None,
) -> str:
    """The op's key for these settings, with the module built and kept and
    its pattern looked up for ``heads`` = (heads, kv_heads, head_dim,
    v_head_dim): one call on meta tensors (no compute), so the op's first
    run finds the plan in the module's cache instead of the store."""
    key = json.dumps([impl, frozen_settings, scaling, dropout, softcap])
    attention = _op_modules.get(key)
    if attention is None:
        attention = _op_modules.put(key, _attention_module(impl, dict(frozen_settings), scaling, dropout, softcap))
    count, kv_count, head_dim, v_head_dim = heads
    q = torch.empty(1, 1, count, head_dim, device="meta")
    attention(q, q.new_empty(1, 1, kv_count, head_dim), q.new_empty(1, 1, kv_count, v_head_dim), is_causal=is_causal)
    return key


def _op_module(key: str) -> nn.Module:
    attention = _op_modules.get(key)  # no lock: one dict read
    if attention is None:  # register() or the bound dropped it, or an exported program runs in a new process
        impl, frozen_settings, scaling, dropout, softcap = json.loads(key)
        attention = _op_modules.put(key, _attention_module(
            impl, {name: value for name, value in frozen_settings}, scaling, dropout, softcap
        ))
    return attention


@torch.compiler.assume_constant_result
def _traced_capturable(module_key: str, device_type: str, one_row: bool, fixed_mask: bool, is_causal: bool) -> bool:
    """Whether the layer's op can run inside a CUDA-graph capture: a decode
    step ``hf_decode`` serves on one of its devices (decided at trace time)."""
    probe = torch.empty(1, 2, 1, 1, device="meta") if fixed_mask else None  # serves reads the mask's shape
    return device_type in hf_decode.DEVICE_TYPES and hf_decode.serves(_op_module(module_key), 1 if one_row else 2,
                                                                      probe, is_causal)


# Tagged: inductor must not capture an op that reads the device on the host.
_HOST_READS = tuple(tag for tag in (getattr(torch.Tag, "cudagraph_unsafe", None),) if tag is not None)


def _attend(query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor], module_key: str,
            is_causal: bool) -> Tensor:
    attention = _op_module(module_key)
    with torch.no_grad():
        out = hf_decode.step(attention, query, key, value, attention_mask, is_causal)
    if out is None:
        raise ValueError("attention::hf_attend computes the decode steps attention.hf.decode serves (one query row, "
                         "the fixed-shape mask); attention::hf_attend_padded computes every other call")
    return out.contiguous()


@torch.library.custom_op("attention::hf_attend", mutates_args=())
def _attend_op(
    query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor], module_key: str, is_causal: bool
) -> Tensor:
    """A decode step ``attention.hf.decode`` serves: capturable (``_traced_capturable`` chose it)."""
    return _attend(query, key, value, attention_mask, module_key, is_causal)


@torch.library.custom_op("attention::hf_attend_padded", mutates_args=(), tags=_HOST_READS)
def _attend_padded_op(
    query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor], module_key: str, is_causal: bool
) -> Tensor:
    """A layer's attention through the padded path (host reads: never captured)."""
    attention = _op_module(module_key)
    with torch.no_grad():
        return attend_padded(attention, query, key, value, attention_mask, is_causal).contiguous()


def _attend_fake(query, key, value, attention_mask, module_key, is_causal):
    batch, heads, q_len, _ = query.shape
    return query.new_empty(batch, q_len, heads, value.shape[-1])


# No autograd: a traced layer whose inputs require grad takes attention::hf_attend_lse (a backward
# through these two raises torch's "no autograd formula was registered").
for _op in (_attend_op, _attend_padded_op):
    _op.register_fake(_attend_fake)


# The training path (attention.hf.training): the forward keeps its
# log-sum-exp and the backward starts from it.
@torch.library.custom_op("attention::hf_attend_lse", mutates_args=(), tags=_HOST_READS)
def _attend_lse_op(
    query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor], module_key: str, is_causal: bool
) -> tuple[Tensor, Tensor]:
    """A layer's attention through the padded path, with each query row's
    log-sum-exp: ``(out (batch, q_len, heads, head_dim_v), lse (batch,
    q_len, heads))``, both contiguous."""
    return attend_with_lse(_op_module(module_key), query, key, value, attention_mask, is_causal)


@_attend_lse_op.register_fake
def _(query, key, value, attention_mask, module_key, is_causal):
    batch, heads, q_len, _ = query.shape
    return (query.new_empty(batch, q_len, heads, value.shape[-1]),
            query.new_empty(batch, q_len, heads, dtype=lse_dtype(query.dtype)))


@torch.library.custom_op("attention::hf_attend_backward", mutates_args=(), tags=_HOST_READS)
def _attend_backward_op(
    grad: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
    attention_mask: Optional[Tensor], module_key: str, is_causal: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``attention::hf_attend_lse``'s ``out`` for query, key and
    value from its saved ``out`` and ``lse``: contiguous, in their shapes."""
    return attend_backward(_op_module(module_key), grad, query, key, value, out, lse, attention_mask, is_causal)


@_attend_backward_op.register_fake
def _(grad, query, key, value, out, lse, attention_mask, module_key, is_causal):
    return tuple(x.new_empty(x.shape) for x in (query, key, value))  # contiguous, as the real op's


def _attend_setup(ctx, inputs, output) -> None:
    query, key, value, attention_mask, ctx.module_key, ctx.is_causal = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)  # internal: the layer returns only ``out``
    ctx.save_for_backward(query, key, value, out, lse, attention_mask)


def _attend_backward(ctx, grad, grad_lse):
    query, key, value, out, lse, attention_mask = ctx.saved_tensors
    grads = _attend_backward_op(grad, query, key, value, out, lse, attention_mask, ctx.module_key, ctx.is_causal)
    return *grads, None, None, None


_attend_lse_op.register_autograd(_attend_backward, setup_context=_attend_setup)


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


def _attention_module(impl: str, settings: Mapping, scaling: Optional[float], dropout: float,
                      softcap: Optional[float] = None) -> nn.Module:
    """The attention module for these settings, built on first use."""
    store = _store
    cache_key = (impl, _frozen(settings), id(store), scaling, dropout, softcap)
    attention = _modules.get(cache_key)
    if attention is None:  # a racing thread's module wins (BoundedCache.put)
        attention = _modules.put(cache_key, _build(impl, dict(settings), scaling, dropout, store, softcap))
    return attention


def _frozen(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def _build(impl: str, settings: dict, scaling: Optional[float], dropout: float, store,
           softcap: Optional[float]) -> nn.Module:
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
                softmax_scale=scaling, dropout=dropout, store=store, softcap=softcap,
            )
        else:
            if "kind" not in settings:
                raise ValueError(f"needs 'kind' (and optionally 'block_size', 'seed' and the kind's "
                                 f"SparseSpec parameters), got keys {sorted(settings)}")
            kind = settings.pop("kind")
            attention = BlockSparseAttention(kind, softmax_scale=scaling, dropout=dropout, store=store,
                                             softcap=softcap, **settings)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from error
    # transformers passes dropout 0 outside training: the module drops exactly when it was given a rate.
    return attention.train(dropout > 0)
