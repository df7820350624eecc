"""Packed (padding-free) batches in the Hugging Face integration
(``attention.hf``): what transformers' ``DataCollatorWithFlattening``
produces, turned into the modules' ``cu_seqlens`` (``attention.packed``).

The collator puts a batch's documents back to back in one row, in two forms:
- ``position_ids`` restarting at each document, no ``attention_mask``:
  transformers (``masking_utils.find_packed_sequence_indices``) starts a new
  document wherever a position is not its predecessor's plus one and hands the
  mask function ``and_masks(remap_positions_for_packed_sequence(causal or
  bidirectional, position_ids), packed_sequence_mask_function(ids))``;
- ``return_flash_attn_kwargs=True``: the attention function also gets
  ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (and ``max_length_q`` / ``_k``, hints
  that are not needed here).

Guarantees:
- Recognition is structural: a mask function is packed only when it is
  exactly that composition of transformers' own factories (compared by code
  object) around the plain causal or bidirectional mask. Anything else (an
  or/and mask function, ``block_sequence_ids``, a transformers that composes
  it otherwise) is not packed, and ``attention.hf.padding`` refuses it.
- Exact: within a document transformers' positions rise by one, so its
  remapped causal mask is causal on the token index; each document gets what
  the module gives it as a sequence of its own (patterns start at its first
  token), which is what the model computes for that document alone.
- Host reads: the mask function turns the document ids into ``cu_seqlens``
  (CPU int64, one host sync per forward) and keeps them as an attribute of the
  mask, as ``attention.hf.padding`` keeps its row layout; the layers read them
  from there.
- ``use_cache=True`` (the config default, also in training): transformers
  then skips its packed mask, so the first layer looks at ``position_ids``
  itself, as the flash path does: restarting positions in a batch without
  padding are packed documents (two host reads, kept on the mask for the
  other layers of the forward). A padded batch keeps its padding semantics.
- ``cu_seq_lens_q`` / ``_k`` are read on the host once per forward (one
  sync on a GPU, ``_read_bounds``): the first layer keeps what it read on
  ``cu_seq_lens_q`` (an attribute of that tensor, with ``_k`` by weak
  reference and both tensors' in-place version counters), and the other
  layers of the forward take it from there; a new tensor, another ``_k`` or
  a tensor changed in place is read again. Limit: inference tensors (made
  under ``torch.inference_mode``) count no versions, so they are read in
  every layer, as restarting ``position_ids`` that are inference tensors
  are. When both forms are given, the explicit ``cu_seq_lens_q`` wins (as
  in transformers' flash path). Dense layers (sliding windows, ``"dense"``)
  take the model's mask, which holds restarting position_ids' documents, and
  ``cu_seq_lens_q``'s documents on top (``dense_documents``).
- Rows: several packed rows (``position_ids`` of shape (batch, length)) run
  one module call per row; ``cu_seq_lens_q`` describes one row (batch 1).
Limits: eager only. Under ``torch.compile`` / ``torch.export`` the layer op
carries no ``cu_seqlens``: ``cu_seq_lens_q`` raises here and the packed mask
raises in the mask function, naming the way out; restarting position_ids
with a cache under compile are not looked at (the graph reads no values;
transformers' sdpa path does not either). Decode after a packed
prefill is not served (transformers looks for packed sequences only without
a cache; generation uses padded batches).
"""

from __future__ import annotations

import weakref
from types import CodeType
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from transformers.masking_utils import (
    and_masks,
    bidirectional_mask_function,
    causal_mask_function,
    packed_sequence_mask_function,
    remap_positions_for_packed_sequence,
)

__all__ = ["packed_sequence_ids", "packed_mask", "packed_documents", "dense_documents", "attend_packed"]

_DOCUMENTS_ATTRIBUTE = "_patternstore_documents"  # set by the mask function: the batch's documents
# What a layer found in position_ids, kept on the mask for the other layers of the forward with the
# position_ids it read and their version (a mask used again with other positions is read again).
_POSITIONS_ATTRIBUTE = "_patternstore_position_documents"
_FLASH_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k")
# What the forward's first layer read from cu_seq_lens_q / _k, kept on cu_seq_lens_q: (a weak reference
# to _k, both tensors' versions, the bounds).
_FLASH_ATTRIBUTE = "_patternstore_flash_bounds"

# The code objects of transformers' factories' inner functions: every function
# a factory returns shares its code object, whatever it closes over.
_PROBE = torch.zeros(1, 1, dtype=torch.long)
_AND_CODE: CodeType = and_masks(causal_mask_function).__code__
_REMAP_CODE: CodeType = remap_positions_for_packed_sequence(causal_mask_function, _PROBE).__code__
_DOCUMENTS_CODE: CodeType = packed_sequence_mask_function(_PROBE).__code__


def _closed_over(function: Any, code: CodeType) -> Optional[dict[str, Any]]:
    """The free variables of ``function`` by name when its code is ``code``, else None."""
    if getattr(function, "__code__", None) is not code:
        return None
    return dict(zip(code.co_freevars, (cell.cell_contents for cell in function.__closure__ or ())))


def packed_sequence_ids(mask_function: Any) -> Optional[Tensor]:
    """The document ids ``(batch, length)`` (equal ids = one document) when
    ``mask_function`` is transformers' packed-sequence mask over the plain
    causal or bidirectional mask, else None (module docstring)."""
    outer = _closed_over(mask_function, _AND_CODE)
    parts = outer.get("mask_functions") if outer is not None else None
    if not isinstance(parts, tuple) or len(parts) != 2:
        return None
    remap, documents = _closed_over(parts[0], _REMAP_CODE), _closed_over(parts[1], _DOCUMENTS_CODE)
    if remap is None or documents is None:
        return None
    if remap.get("mask_function") not in (causal_mask_function, bidirectional_mask_function):
        return None
    ids = documents.get("packed_sequence_mask")
    return ids if isinstance(ids, Tensor) and ids.dim() == 2 else None


def _row_bounds(new_document: Tensor) -> tuple[Tensor, ...]:
    """Each row's ``cu_seqlens`` (CPU int64) from ``new_document`` (batch,
    length - 1) bool, True where token i + 1 starts a document: one host read."""
    batch, length = new_document.shape[0], new_document.shape[1] + 1
    bounds: list[list[int]] = [[0] for _ in range(batch)]
    for row, before in new_document.nonzero().tolist():
        bounds[row].append(before + 1)
    return tuple(torch.tensor(b + [length], dtype=torch.int64) for b in bounds)


def packed_mask(ids: Tensor, device: Any) -> Tensor:
    """The mask of a packed batch: ``(batch, 1, 1, length)`` bool, all real
    tokens (``attention.hf.padding``'s eager form), carrying each row's
    ``cu_seqlens`` read from ``ids`` in one host sync."""
    mask = torch.ones(ids.shape[0], 1, 1, ids.shape[1], dtype=torch.bool, device=device)
    setattr(mask, _DOCUMENTS_ATTRIBUTE, _row_bounds(torch.diff(ids, dim=-1).ne(0)))
    return mask


def _restarting(position_ids: Any, batch: int, length: int) -> Optional[tuple[Tensor, ...]]:
    """Each row's ``cu_seqlens`` where ``position_ids`` restart (a position
    not its predecessor's plus one, as transformers finds packed sequences),
    None where they do not restart or do not cover the sequence."""
    if not isinstance(position_ids, Tensor) or position_ids.dim() != 2 or position_ids.shape[-1] != length:
        return None
    restarts = torch.diff(position_ids.expand(batch, -1), dim=-1).ne(1)
    documents = _row_bounds(restarts)
    return documents if any(cu.numel() > 2 for cu in documents) else None


def _flash_bounds(impl: str, kwargs: Mapping[str, Any]) -> Optional[list[int]]:
    """``cu_seq_lens_q`` as Python ints (read with ``_k`` in one host read),
    None when neither is given. ValueError naming the field when only one is
    given, when they differ or are not 1-D tensors, and under compile."""
    given = [name for name in _FLASH_KEYS if kwargs.get(name) is not None]
    if not given:
        return None
    if torch.compiler.is_compiling():
        raise ValueError(
            f"attn_implementation={impl!r} runs packed documents (cu_seq_lens_q / cu_seq_lens_k, cu_seqlens) "
            f"eagerly only: the traced op carries no cu_seqlens; run the padding-free step without torch.compile"
        )
    if len(given) == 1:
        raise ValueError(f"cu_seq_lens_q and cu_seq_lens_k come together (packed self-attention); got only {given[0]}")
    cu_q, cu_k = (kwargs[name] for name in _FLASH_KEYS)
    for name, cu in zip(_FLASH_KEYS, (cu_q, cu_k)):
        if not isinstance(cu, Tensor) or cu.dim() != 1:
            raise ValueError(f"{name} must be a 1-D integer tensor [0, ..., total], got {getattr(cu, 'shape', cu)!r}")
    versions = (_version_of(cu_q), _version_of(cu_k))
    kept = getattr(cu_q, _FLASH_ATTRIBUTE, None)
    if kept is not None and None not in versions and kept[0]() is cu_k and kept[1] == versions:
        return kept[2]
    bounds = _read_bounds(cu_q, cu_k)
    if bounds[: cu_q.numel()] != bounds[cu_q.numel():]:
        raise ValueError(f"patternstore attention takes packed self-attention: cu_seq_lens_k must equal "
                         f"cu_seq_lens_q, got {bounds[cu_q.numel():]} and {bounds[: cu_q.numel()]}")
    if None not in versions:
        setattr(cu_q, _FLASH_ATTRIBUTE, (weakref.ref(cu_k), versions, bounds[: cu_q.numel()]))
    return bounds[: cu_q.numel()]


def _read_bounds(cu_q: Tensor, cu_k: Tensor) -> list[int]:
    """``cu_q`` then ``cu_k`` as Python ints: the flash form's one host read (a sync for a GPU tensor)."""
    return torch.cat((cu_q, cu_k.to(cu_q.device))).tolist()


def packed_documents(impl: str, attention_mask: Optional[Tensor], kwargs: Mapping[str, Any], query: Tensor,
                     key: Tensor) -> Optional[tuple[Tensor, ...]]:
    """Each batch row's ``cu_seqlens`` for a packed call of a module layer,
    or None for an unpacked one: from ``cu_seq_lens_q`` / ``_k`` when given
    (one row; ValueError with a padded ``attention_mask``), else from the
    packed mask, else from restarting ``position_ids`` in a batch without
    padding (transformers skips its packed mask when the model holds a cache,
    as with ``use_cache=True`` in training; the flash path reads them too).
    The answer is kept on the mask, which every layer of a forward shares."""
    bounds = _flash_bounds(impl, kwargs)
    if bounds is not None:
        if (attention_mask is not None and getattr(attention_mask, _DOCUMENTS_ATTRIBUTE, None) is None
                and not bool(attention_mask.all())):
            raise ValueError("cu_seq_lens_q (packed documents) takes no padding: got an attention_mask with padding")
        return (torch.tensor(bounds, dtype=torch.int64),)  # the module checks the values (attention.packed)
    if torch.compiler.is_compiling():
        return None
    kept = getattr(attention_mask, _DOCUMENTS_ATTRIBUTE, None)
    if kept is not None:
        return kept
    position_ids = kwargs.get("position_ids")
    found = _found(attention_mask, position_ids)
    if found is not None:
        return found or None
    documents = None
    if query.shape[2] == key.shape[2] and (attention_mask is None or bool(attention_mask.all())):
        documents = _restarting(position_ids, query.shape[0], key.shape[2])
    _keep(attention_mask, position_ids, documents or ())
    return documents


def _found(attention_mask: Optional[Tensor], position_ids: Any) -> Any:
    """What an earlier layer found in these ``position_ids`` (unchanged since), else None."""
    kept = getattr(attention_mask, _POSITIONS_ATTRIBUTE, None)
    if kept is None or kept[0] is not position_ids or kept[1] != _version_of(position_ids):
        return None
    return kept[2]


def _version_of(x: Any) -> Optional[int]:
    """A tensor's in-place version counter; None for no tensor and for an
    inference tensor, which counts none."""
    return x._version if isinstance(x, Tensor) and not x.is_inference() else None


def _keep(attention_mask: Optional[Tensor], position_ids: Any, found: Any) -> None:
    """Keep ``found`` on the mask, unless the positions are an inference tensor (no version to check)."""
    if attention_mask is not None and not (isinstance(position_ids, Tensor) and position_ids.is_inference()):
        setattr(attention_mask, _POSITIONS_ATTRIBUTE, (position_ids, _version_of(position_ids), found))


def dense_documents(impl: str, attention_mask: Optional[Tensor], kwargs: Mapping[str, Any], query: Tensor,
                    key: Tensor, is_causal: bool) -> Optional[Tensor]:
    """A dense layer's mask (``attention.hf.layers``) with the documents of
    ``cu_seq_lens_q``, or of restarting ``position_ids``, kept apart: the
    model's mask (None: causal or full by ``is_causal``) and the same
    document; the mask as given without them. Kept on the mask for the
    forward's other dense layers."""
    bounds = _flash_bounds(impl, kwargs)
    batch, length = query.shape[0], key.shape[2]
    if bounds is not None:
        if query.shape[2] != length or bounds[0] != 0 or bounds[-1] != length:
            raise ValueError(f"cu_seq_lens_q must run from 0 to the sequence length {length} with q_len == kv_len "
                             f"(packed self-attention, no cache); got {bounds} and q_len={query.shape[2]}")
        documents: Optional[tuple[Tensor, ...]] = (torch.tensor(bounds, dtype=torch.int64),)
    elif torch.compiler.is_compiling() or query.shape[2] != length:
        return attention_mask
    else:
        found = _found(attention_mask, kwargs.get("position_ids"))
        if found is not None:  # () where the forward's first dense layer found no documents
            return found if isinstance(found, Tensor) else attention_mask
        documents = _restarting(kwargs.get("position_ids"), batch, length)
    masked = attention_mask
    if documents is not None:
        positions = torch.arange(length, device=query.device)
        ids = torch.stack([torch.bucketize(positions, cu[1:-1].to(query.device), right=True) for cu in documents])
        same = (ids[:, :, None] == ids[:, None, :])[:, None]
        masked = (same.tril() if is_causal else same) if attention_mask is None else attention_mask & same
    if bounds is None:
        _keep(attention_mask, kwargs.get("position_ids"), masked if documents is not None else ())
    return masked


def attend_packed(attention: nn.Module, query: Tensor, key: Tensor, value: Tensor, documents: tuple[Tensor, ...],
                  is_causal: bool, sinks: Optional[Tensor] = None) -> Tensor:
    """``attention`` over transformers' layouts (query ``(batch, heads, length,
    head_dim)``, key/value ``(batch, kv_heads, length, head_dim_k / _v)``)
    with ``documents[b]`` the ``cu_seqlens`` of row b (one entry: the whole
    batch in one call) -> ``(batch, length, heads, head_dim_v)``."""
    extra = {} if sinks is None else {"sinks": sinks}
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    if len(documents) == 1:
        return attention(q, k, v, is_causal=is_causal, cu_seqlens=documents[0], **extra)
    return torch.cat([attention(q[row:row + 1], k[row:row + 1], v[row:row + 1], is_causal=is_causal,
                                cu_seqlens=cu, **extra) for row, cu in enumerate(documents)])
