"""The attention modules a Hugging Face model's settings build
(``attention.hf``): the two implementation names, and one module per
(implementation, settings, store, scaling, dropout, softcap), built on first
use and kept.

Guarantees:
- ``attention_module`` builds a module once per distinct key and hands the
  same one back after (the last ``MAX_MODULES`` kept), so its plan and layout
  caches live across calls and layers; a racing thread's module wins.
- settings are checked when the module is built: a bad key or value raises
  ``ValueError`` naming ``config.patternstore_attention`` and the
  implementation.
- ``use_store`` replaces the store the modules look their patterns up in and
  drops the modules built for the old one.
Limit: a process that builds more than ``MAX_MODULES`` differently
configured modules rebuilds the oldest on their next use.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import nn

from patternstore.store import PatternStore

from attention.caches import BoundedCache, process_cache
from attention.dilated.module import ImprovedDilatedAttention
from attention.hf.layers import CONFIG_ATTRIBUTE
from attention.sparse.module import BlockSparseAttention

__all__ = ["DILATED", "SPARSE", "MAX_MODULES", "attention_module", "frozen", "use_store"]

DILATED = "patternstore_dilated"
SPARSE = "patternstore_sparse"

# Attention modules kept at once: one per distinct (settings, scaling,
# dropout) a process uses, usually one per model; the bound only stops a
# process that builds many differently configured models from growing.
MAX_MODULES = 32

_DILATED_KEYS = ("segment_lengths", "dilation_rates", "scheme")

_store: Optional[PatternStore] = None
_modules: BoundedCache[nn.Module] = process_cache(MAX_MODULES)


def use_store(store: Optional[PatternStore]) -> None:
    """Build modules over ``store`` from now on (None: ``patternstore.default_store()``)."""
    global _store
    _store = store
    _modules.clear()


def attention_module(impl: str, settings: Mapping, scaling: Optional[float], dropout: float,
                     softcap: Optional[float] = None) -> nn.Module:
    """The attention module for these settings, built on first use."""
    store = _store
    cache_key = (impl, frozen(settings), id(store), scaling, dropout, softcap)
    attention = _modules.get(cache_key)
    if attention is None:  # a racing thread's module wins (BoundedCache.put)
        attention = _modules.put(cache_key, _build(impl, dict(settings), scaling, dropout, store, softcap))
    return attention


def frozen(value: Any) -> Any:
    """``value`` (settings: nested mappings and sequences) as nested tuples, mappings sorted: hashable, and
    equal for equal settings however they were spelled (a list or a tuple, any key order)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(frozen(v) for v in value)
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
