"""Padding for the Hugging Face integration (``attention.hf``): the mask
function registered with ``transformers.AttentionMaskInterface``, the
checks of what a model asks for (layer types, mask forms) and the core
that runs an attention module over a padded batch.

The forms below are those of layers that run a module (dilated or
block-sparse settings); a dense layer (every sliding-window layer, or a
layer type mapped to ``"dense"``: ``attention.hf.layers``) gets the model's
own ``(batch, 1, q_len, kv_len)`` mask instead.

The mask never is a ``q_len x kv_len`` tensor. It has two forms:
- eager: ``(batch, 1, 1, filled)`` bool, True = a real token, where
  ``filled`` is how many cache rows hold tokens; with a static cache (longer
  than ``filled``) the traced form below instead, whose shape stays fixed
  from step to step (``generate`` builds the mask eagerly and passes it to
  its compiled decode step). The row layout (one host sync) is computed once
  per forward here and kept as an attribute of the mask, so the layers do not
  recompute it.
- traced (inside ``torch.compile`` / ``torch.export``): ``(batch, 2, 1,
  kv_len)`` bool over the whole cache: ``[:, 0]`` = real token, ``[:, 1]`` =
  the cache row holds a token (dim 1 is 2, where a head-broadcast mask has 1). Built from tensors only (no host sync, no shape that
  depends on the data), so one graph serves every padding pattern and every
  static-cache step; ``attend_padded`` reads ``filled`` from ``[:, 1]``.
A packed batch (``DataCollatorWithFlattening``'s restarting position_ids)
gets the eager form with every token real, carrying each row's
``cu_seqlens`` (``attention.hf.packed``). As 4-D tensors the forms pass through ``create_causal_mask`` and ``generate``'s
mask preparation unchanged.

Each batch row's pattern starts at its first real token (left padding, as
``generate`` pads), so a padded batch gives each sequence exactly what it
gets alone. Cost: one module call per run of consecutive batch rows with the
same amount of left padding (one call for an unpadded batch), on views of
their rows; padding after a row's first real token is passed on as
``key_padding_mask``. Padded query rows output 0.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional

import torch
from torch import Tensor, nn

from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

from attention.hf.layers import CONFIG_ATTRIBUTE, DENSE, LAYER_TYPES, dense_mask, layer_entry, mask_layer_type
from attention.hf.packed import packed_mask, packed_sequence_ids

__all__ = ["RowLayout", "PaddedRun", "padding_mask", "padded_runs", "unpadded", "attend_padded", "check_config",
           "check_mask"]


def check_config(config: Any) -> None:
    """ValueError naming ``config.layer_types`` when it declares a type other
    than full or sliding attention (chunked, linear, ...). Runs first in the
    mask function and the attention function."""
    for kind in getattr(config, "layer_types", None) or ():
        if kind not in LAYER_TYPES:
            raise ValueError(f"patternstore attention runs the layer types {list(LAYER_TYPES)}; config.layer_types "
                             f"has {kind!r}")


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
    """The ``AttentionMaskInterface`` function of both implementations (the
    module docstring gives its two forms). Older transformers pass
    ``cache_position`` instead of ``q_length`` and ``q_offset``; both are
    understood. A dense layer's call gets ``attention.hf.layers.dense_mask``."""
    config = kwargs.get("config")
    check_config(config)
    if cache_position is not None:
        q_length, q_offset = cache_position.shape[-1], cache_position[..., 0]
    settings = getattr(config, CONFIG_ATTRIBUTE, None)  # missing or wrong: the attention function names it
    if isinstance(settings, Mapping) and layer_entry(settings, mask_layer_type(kwargs), CONFIG_ATTRIBUTE) == DENSE:
        return dense_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, device,
                          **kwargs)
    if mask_function is not causal_mask_function and mask_function is not bidirectional_mask_function:
        if torch.compiler.is_compiling():
            # transformers looks for packed sequences in position_ids when there is neither a mask nor a
            # cache; in a traced region it cannot read them, so it always passes the packed-sequence mask.
            raise ValueError(
                "patternstore attention runs packed sequences (restarting position_ids, cu_seqlens) eagerly only, "
                "and no mask other than causal or bidirectional; under torch.compile without an attention_mask and "
                "without a cache transformers cannot rule out packed sequences: pass attention_mask (e.g. "
                "torch.ones_like(input_ids)), or run packed batches eagerly"
            )
        ids = packed_sequence_ids(mask_function)  # eager: the closure is read, not traced
        if ids is None:
            raise ValueError(
                "patternstore attention supports causal or bidirectional masks with padding, and packed sequences "
                "(restarting position_ids); this model asked for another mask (block_sequence_ids, or an or/and "
                f"mask function): mask_function={getattr(mask_function, '__qualname__', mask_function)!r}"
            )
        return packed_mask(ids, device)  # attention.hf.packed: each document as if alone
    if kv_offset:
        raise ValueError(
            f"patternstore attention needs the whole cache (kv_offset 0); got kv_offset={kv_offset} "
            "(a sliding-window or chunked cache)"
        )
    if torch.compiler.is_compiling():
        return _traced_mask(batch_size, q_length, kv_length, q_offset, attention_mask, device)
    filled = int(q_offset) + int(q_length)  # a static cache's offset is a tensor: one sync
    if kv_length is not None and filled > kv_length:
        raise ValueError(f"q_offset + q_length = {filled} exceeds kv_length = {kv_length}")
    if attention_mask is None:
        real = torch.ones(batch_size, filled, dtype=torch.bool, device=device)
    else:
        real = _real_tokens(attention_mask, filled)
    if isinstance(q_offset, Tensor) or (kv_length is not None and kv_length > filled):
        # A static cache (longer than its tokens, or its fill level a tensor): the
        # fixed-shape form, so that the compiled decode step generate calls with
        # it keeps one shape at every step (one graph, replayable).
        mask = _traced_mask(batch_size, q_length, kv_length, q_offset, attention_mask, device)
    else:
        mask = real[:, None, None, :]
    setattr(mask, _LAYOUT_ATTRIBUTE, _row_layout_of(real))
    return mask


def _traced_mask(batch: int, q_length: int, kv_length: Optional[int], q_offset: Any,
                 attention_mask: Optional[Tensor], device: Any) -> Tensor:
    """The traced form, ``(batch, 2, 1, kv_length)``: no host sync, so the
    graph depends on shapes only (``q_offset`` may be a tensor)."""
    kv_length = int(q_length) if kv_length is None else kv_length
    held = torch.arange(kv_length, device=device) < q_offset + q_length
    if attention_mask is None:
        real = held.expand(batch, -1)
    else:
        real = _real_tokens(attention_mask, kv_length) & held
    return torch.stack((real, held.expand(batch, -1)), dim=1)[:, :, None]


def _real_tokens(attention_mask: Tensor, length: int) -> Tensor:
    """A 2-D mask (1 / True = token) as (batch, length) bool; columns past its
    end are the new tokens (real)."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be 2-D (batch, kv_len), got shape {tuple(attention_mask.shape)}")
    if attention_mask.dtype.is_floating_point:
        raise ValueError("attention_mask must be a 0/1 or bool padding mask, not an additive float mask")
    real = attention_mask[:, :length].to(torch.bool)
    if real.shape[-1] < length:
        real = torch.nn.functional.pad(real, (0, length - real.shape[-1]), value=True)
    return real


def check_mask(attention_mask: Any) -> None:
    """ValueError unless the mask is None, 2-D, or one of the two 4-D forms:
    shape and dtype only, so it runs in a traced region too."""
    if attention_mask is None:
        return
    if not isinstance(attention_mask, Tensor):
        raise ValueError(f"attention_mask must be a tensor or None, got {type(attention_mask).__name__}")
    if attention_mask.dim() == 4 and (
        attention_mask.shape[1:3] not in ((1, 1), (2, 1)) or attention_mask.dtype != torch.bool
    ):
        raise ValueError(
            "patternstore attention takes padding from a 2-D attention_mask (register() installs the mask "
            f"function that passes it on); got a 4-D {attention_mask.dtype} mask of shape "
            f"{tuple(attention_mask.shape)}, which it cannot honour"
        )
    if attention_mask.dim() not in (2, 4):
        raise ValueError(f"attention_mask must be 2-D (batch, kv_len), got shape {tuple(attention_mask.shape)}")


def _row_layout(attention_mask: Optional[Tensor], batch: int, kv_len: int) -> tuple[RowLayout, Optional[Tensor]]:
    """(layout, real tokens (batch, filled) or None) from what the model passed."""
    check_mask(attention_mask)
    if attention_mask is None:
        return RowLayout(kv_len, (0,) * batch, (False,) * batch), None
    kept = getattr(attention_mask, _LAYOUT_ATTRIBUTE, None)  # set by padding_mask in eager calls
    if attention_mask.dim() == 4 and attention_mask.shape[1] == 2:  # fixed-shape form: filled from the layout
        filled = kept.filled if kept is not None else int(attention_mask[0, 1, 0].sum())  # or one host sync
        real = attention_mask[:, 0, 0, :filled]
    elif attention_mask.dim() == 4:
        real = attention_mask[:, 0, 0, :]
    else:
        real = _real_tokens(attention_mask, attention_mask.shape[-1])
    if real.shape[0] not in (1, batch):
        raise ValueError(f"attention_mask has batch {real.shape[0]}, the query has batch {batch}")
    if real.shape[-1] > kv_len:
        raise ValueError(f"attention_mask covers {real.shape[-1]} keys, the cache holds {kv_len}")
    layout = kept or _row_layout_of(real)
    if len(layout.starts) != batch:  # a (1, ...) mask shared by the batch
        layout = RowLayout(layout.filled, layout.starts * batch, layout.holes * batch)
        real = real.expand(batch, -1)
    return layout, real


def attend_padded(
    attention: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor], is_causal: bool,
    sinks: Optional[Tensor] = None,
) -> Tensor:
    """``attention`` over transformers' layouts: query ``(batch, heads, q_len,
    head_dim)``, key/value ``(batch, kv_heads, kv_len, head_dim_k / _v)``,
    the mask in any form above; returns ``(batch, q_len, heads, head_dim_v)``.
    ``sinks``: the module's ``sinks`` argument (None: not passed)."""
    extra = {} if sinks is None else {"sinks": sinks}
    batch, _, q_len, _ = query.shape
    filled, runs = padded_runs(attention_mask, batch, q_len, key.shape[2])
    # (batch, seq, heads, head_dim) views: the cache's filled rows, untouched.
    q = query.transpose(1, 2)
    k = key[:, :, :filled].transpose(1, 2)
    v = value[:, :, :filled].transpose(1, 2)
    if unpadded(runs, batch):  # the module's output as it is
        return attention(q, k, v, is_causal=is_causal, **extra)
    return _per_padding(attention, q, k, v, runs, is_causal, extra)


class PaddedRun(NamedTuple):
    """Batch rows ``rows`` attend together: query rows from ``first_query``
    (those before it are padding) over keys from ``start`` (their first real
    token), ``key_padding_mask`` (True = padding) over those keys or None."""

    rows: slice
    first_query: int
    start: int
    key_padding_mask: Optional[Tensor]


def padded_runs(attention_mask: Optional[Tensor], batch: int, q_len: int, kv_len: int) -> tuple[int, list[PaddedRun]]:
    """(filled, runs) of a call: ``filled`` cache rows hold tokens; one run
    (all rows, from 0, no mask) for an unpadded batch, else one per run of
    consecutive batch rows with the same amount of left padding (a row with
    padding after its first token alone, with its key mask)."""
    layout, real = _row_layout(attention_mask, batch, kv_len)
    filled = layout.filled
    if filled < q_len:
        raise ValueError(f"the mask covers {filled} keys, fewer than the {q_len} queries")
    if not any(layout.starts) and not any(layout.holes):
        return filled, [PaddedRun(slice(0, batch), 0, 0, None)]
    runs = []
    row = 0
    while row < batch:
        start, holes = layout.starts[row], layout.holes[row]
        end = row + 1
        # Rows with padding after their first token carry their own key mask; others run together.
        while not holes and end < batch and layout.starts[end] == start and not layout.holes[end]:
            end += 1
        first_query = max(0, start - (filled - q_len))
        if first_query < q_len:
            runs.append(PaddedRun(slice(row, end), first_query, start, ~real[row:end, start:] if holes else None))
        row = end
    return filled, runs


def unpadded(runs: list[PaddedRun], batch: int) -> bool:
    """Whether ``runs`` is one call over the whole batch and cache."""
    return len(runs) == 1 and runs[0].rows == slice(0, batch) and runs[0].first_query == runs[0].start == 0 \
        and runs[0].key_padding_mask is None


def _per_padding(attention, q, k, v, runs: list[PaddedRun], is_causal: bool, extra: dict) -> Tensor:
    """Padded batches: each run attends on its own, over keys ``start:`` and
    the queries at positions >= start, so its pattern starts at its first
    token. Padded query rows output 0."""
    batch, q_len, heads, _ = q.shape
    out = q.new_zeros(batch, q_len, heads, v.shape[-1])
    for run in runs:
        out[run.rows, run.first_query:] = attention(
            q[run.rows, run.first_query:], k[run.rows, run.start:], v[run.rows, run.start:],
            is_causal=is_causal, key_padding_mask=run.key_padding_mask, **extra,
        )
    return out
