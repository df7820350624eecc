"""Dilated attention over packed documents (``cu_seqlens``): every document
``[cu[i], cu[i+1])`` gets exactly what ``DilatedAttention`` gives it as a
sequence of its own (docs/design.md section 2.1 at ``n = L``): segments of
``s = min(w, L)`` from the document's first token, head offsets relative
to it, causal inside it, no key of another document.

The fast path (``packed_forward`` / ``packed_backward``). The groups of a
branch (disjoint heads, one offset each) run together as a ``Layer``. Per
layer, every segment of every document is a variable-length sequence of its
selected positions ``start + offset + rate * m`` (per head). The segments
of all documents are grouped into a few length BUCKETS
(``segment_buckets``): the longest remaining row count opens a step, which
takes every segment of at least ``1 / BUCKET_WASTE`` of it, so padding
costs at most ``BUCKET_WASTE`` rows per real row; when most of a step's
segments have its full row count on every head (the full segments, the bulk
of long documents), they form an unpadded bucket of their own and the rest
a padded one, so a layer has at most ``2 (1 + log(max rows) /
log(BUCKET_WASTE))`` buckets. A bucket runs in runs of whole units of at
most ``1 / _CHUNK_FRACTION`` of the (position, head) rows (``_chunks``: the
allocator reuses their temporaries, no fresh pages per bucket). Each run is
ONE ``index_select`` per input of its (position, head) rows in a flat
``(n * h, d)`` view, read by the kernels as a strided view, ONE
``kernels.attend`` call (padding excluded by a mask, none for an unpadded
bucket or under causality: a segment's real rows come first) and one
``index_copy_`` into the output: a plain copy for a layer that is the
first on its heads, else a merge by log-sum-exp of the rows read back;
padded rows go to a dump row past the sequence. A layer's runs number at
most its buckets plus ``2 BUCKET_WASTE _CHUNK_FRACTION`` (a run holds at
least half its bound unless it is one unit), so the kernel calls per call
depend on branches and buckets, never on the number of documents or segments. The backward walks
the same runs with ``kernels.attend_backward`` fed the FINAL out and lse
(exact for the combined softmax, as in ``attention.dilated.fast``); padded query
rows enter it with q, grad_out and out 0 and lse 0, which makes their
gradient contributions exactly 0. Padded keys (``key_padding_mask``) are
zeroed once per call, so a NaN or Inf in them reaches no output.
A soft-cap goes to every kernel call (``softcap``, the kernels whose
entry takes it); sinks (``attention.kernels.sinks``, per row and head,
blind to documents) are merged once into the final out and lse by the
forward op and get their gradient in its autograd, as in
``attention::dilated_forward``.

Host reads. The bucket index tensors depend on the values of ``cu_seqlens``:
they are computed inside the custom ops (``attention::dilated_packed_*``),
vectorized, once per call and layer: one device sync per call for a GPU
``cu_seqlens``, none for a CPU one. The ops are opaque to ``torch.compile``,
whose graph takes ``cu_seqlens`` as a tensor input: a new split at the same
total length does not recompile, and with ``dynamic=True`` one graph serves
every length.

The reference path (``packed_reference``): one ``reference_attention`` call
per document, autograd-native in eager mode (double backward, dropout);
under ``torch.compile`` it runs as the opaque op
``attention::dilated_packed_reference`` (no dropout).
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from attention.dilated.plan import DilatedPlan, groups_from_flat
from patternstore.dilated_groups import Group
from attention.dilated.reference import reference_attention
from attention.kernels.softmax_parts import EMPTY_LSE, lse_dtype, merge_
from attention.kernels.attend import attend, attend_backward
from attention.kernels.sinks import apply_sinks, sinks_grad
from attention.dilated.packed_flex import packed_flex_attention, serves_packed
from attention.packed import document_bounds

__all__ = ["BUCKET_WASTE", "Layer", "layers", "Bucket", "segment_buckets", "packed_forward", "packed_backward",
           "packed_reference", "dilated_packed_forward", "dilated_packed_backward", "dilated_packed_reference",
           "run_packed"]

# A bucket pads a segment to at most this many times its selected rows.
BUCKET_WASTE = 1.1
# A kernel call's run of units selects at most max(n / _CHUNK_FRACTION,
# _MIN_CHUNK_ROWS) (position, head) rows (``_chunks``).
_CHUNK_FRACTION = 8
_MIN_CHUNK_ROWS = 1 << 14


class Layer(NamedTuple):
    """Groups of one branch on disjoint heads, run together: query head
    ``heads[j]`` selects offset ``offsets[j]``; ``kv_heads[j]`` is its key/value head."""

    segment: int
    rate: int
    heads: Tensor
    kv_heads: Tensor
    offsets: Tensor


def layers(groups: Sequence[Group], group_size: int) -> list[Layer]:
    """The groups as layers: per branch, each group joins the first layer
    of its branch whose heads it does not overlap (one layer per branch for
    every plan the store makes)."""
    found: list[tuple[Group, list[Group]]] = []
    for g in groups:
        for first, members in found:
            if (first.branch == g.branch and all(m.head_stop <= g.head_start or g.head_stop <= m.head_start
                                                  for m in members)):
                members.append(g)
                break
        else:
            found.append((g, [g]))
    result = []
    for first, members in found:
        heads = torch.cat([torch.arange(g.head_start, g.head_stop) for g in members])
        offsets = torch.cat([torch.full((g.head_stop - g.head_start,), g.offset) for g in members])
        result.append(Layer(first.segment, first.rate, heads, heads // group_size, offsets))
    return result


class Bucket(NamedTuple):
    """Segments of one layer padded to one row count, for the layer's heads:
    ``valid`` (units, rows, heads) bool (a segment's real rows first),
    ``read`` (units * rows, heads) the sequence positions to gather (0 where
    padded), ``write`` the same with the dump row ``n`` where padded
    (outputs are scattered there and dropped), ``padded`` whether any
    entry is."""

    valid: Tensor
    read: Tensor
    write: Tensor
    padded: bool


def _bucket(seg_start: Tensor, rows: Tensor, layer: Layer, total: int, device: torch.device) -> Bucket:
    """The bucket of the segments starting at ``seg_start`` with ``rows`` (units, heads) selected rows."""
    m = torch.arange(int(rows.max()))[None, :, None]
    valid = m < rows[:, None, :]                                          # (units, rows, heads)
    positions = seg_start[:, None, None] + layer.offsets + layer.rate * m
    read, write = positions.where(valid, 0).flatten(0, 1), positions.where(valid, total).flatten(0, 1)
    return Bucket(valid.to(device), read.to(device), write.to(device), not bool(valid.all()))


def segment_buckets(bounds: Sequence[int], layer: Layer, device: torch.device) -> list[Bucket]:
    """The buckets of ``layer``'s segments over the documents ``bounds``
    (``[0, end_1, ..., total]``), vectorized over documents, segments and heads."""
    cu = torch.tensor(bounds, dtype=torch.int64)
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    starts, lengths = starts[lengths > 0], lengths[lengths > 0]
    if not len(lengths):
        return []
    size = lengths.clamp(max=layer.segment)               # s = min(w, L) per document
    count = -(-lengths // size)                           # segments per document
    doc = torch.repeat_interleave(torch.arange(len(lengths)), count)
    first = torch.cumsum(count, 0) - count
    t = torch.arange(len(doc)) - first[doc]               # segment index inside its document
    seg_start = starts[doc] + t * size[doc]
    seg_len = torch.minimum(size[doc], lengths[doc] - t * size[doc])
    # selected rows per (segment, head): ceil((len - offset) / rate), at least 0
    rows = (seg_len[:, None] - layer.offsets + layer.rate - 1).div(layer.rate, rounding_mode="floor").clamp(min=0)
    most = rows.amax(1)
    keep = most > 0
    seg_start, rows, most = seg_start[keep], rows[keep], most[keep]
    buckets = []
    while len(most):
        top = int(most.max())
        inside = most * BUCKET_WASTE >= top
        # When most of them have ``top`` rows on every head (full segments, the
        # bulk of long documents), those run on their own: no padding, no mask.
        exact = inside & (rows == top).all(1)
        if 2 * int(exact.sum()) < int(inside.sum()):
            exact = torch.zeros_like(inside)
        for members in (exact, inside & ~exact):
            if bool(members.any()):
                buckets.append(_bucket(seg_start[members], rows[members], layer, bounds[-1], device))
        seg_start, rows, most = seg_start[~inside], rows[~inside], most[~inside]
    return buckets


def _chunks(bucket: Bucket, elements: int) -> list[Bucket]:
    """The bucket in runs of whole units whose (rows, heads) selections hold
    at most ``elements`` rows of one query tensor ``(n, h, d)`` together
    (at least one unit each): bounded temporaries, reused by the allocator
    from one run to the next instead of fresh pages per bucket."""
    units, rows, heads = bucket.valid.shape
    step = max(1, elements // (rows * heads))
    if step >= units:
        return [bucket]
    return [Bucket(bucket.valid[a:a + step], bucket.read[a * rows:(a + step) * rows],
                   bucket.write[a * rows:(a + step) * rows], bucket.padded) for a in range(0, units, step)]


def _runs(bounds: Sequence[int], layer: Layer, query_rows: int, device: torch.device) -> Iterator[Bucket]:
    """``layer``'s kernel calls: its buckets (``segment_buckets``) in runs
    (``_chunks``) of at most ``max(query_rows / _CHUNK_FRACTION,
    _MIN_CHUNK_ROWS)`` (position, head) rows, ``query_rows`` being n * h."""
    elements = max(query_rows // _CHUNK_FRACTION, _MIN_CHUNK_ROWS)
    return (run for bucket in segment_buckets(bounds, layer, device) for run in _chunks(bucket, elements))


def _flat(positions: Tensor, heads: Tensor, num_heads: int) -> Tensor:
    """(units * rows, heads) positions of an (n, num_heads, ...) tensor as
    indices of its (n * num_heads, ...) view, in that order."""
    return (positions * num_heads + heads).flatten()


def _gather(x: Tensor, index: Tensor, bucket: Bucket) -> Tensor:
    """x (n, h, ...) contiguous at the flat ``index`` (``_flat``) -> (units, heads, rows, ...):
    one ``index_select`` of whole rows, a strided view for the kernels."""
    return x.flatten(0, 1).index_select(0, index).view(*bucket.valid.shape, *x.shape[2:]).transpose(1, 2)


def _rows(x: Tensor) -> Tensor:
    """A kernel result (units, heads, rows, ...) as (units * rows * heads, ...): free
    for the kernels' results on ``_gather``'s views, which keep their strides."""
    return x.transpose(1, 2).reshape(-1, *x.shape[3:])


def _key_mask(bucket: Bucket, key_padding_mask: Optional[Tensor], is_causal: bool) -> Optional[Tensor]:
    """The keys a bucket's kernel call excludes, (units, heads, 1, rows):
    the caller's padding, and the bucket's padding unless causality already
    does (a segment's real rows come first, so its real queries see no
    padded key). None when nothing is excluded: a mask costs the kernels a
    pass over the scores."""
    masked = ~bucket.valid if bucket.padded and not is_causal else None
    if key_padding_mask is not None:
        padded = key_padding_mask[0][bucket.read].view(bucket.valid.shape)
        masked = padded if masked is None else masked | padded
    return None if masked is None else masked.transpose(1, 2).unsqueeze(2)


def _without_padded_keys(k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """k, v (n, h_kv, ...) with padded keys zeroed: the per-head masks go to
    the kernels as ``mask``, which excludes but does not zero, so a NaN in a
    padded key must not get that far."""
    if key_padding_mask is None:
        return k, v
    drop = key_padding_mask[0][:, None, None]
    return k.masked_fill(drop, 0.0), v.masked_fill(drop, 0.0)


def _copies_every_row(found: Sequence[Layer], h: int) -> bool:
    """Whether every head's first layer has rate 1 (offset 0) and is copied
    (no head of it came earlier): its segments tile every document, so the
    output and lse need no initial value (the plan the benchmarks run skips
    a pass over both)."""
    covered, everywhere = torch.zeros(h, dtype=torch.bool), torch.zeros(h, dtype=torch.bool)
    for layer in found:
        if layer.rate == 1 and not bool(layer.offsets.any()) and not bool(covered[layer.heads].any()):
            everywhere[layer.heads] = True
        covered[layer.heads] = True
    return bool(everywhere.all())


def packed_forward(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], bounds: Sequence[int],
                   groups: Sequence[Group], is_causal: bool, scale: float,
                   softcap: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """-> (out (1, n, h, d_v) in q's dtype, lse (1, n, h)); rows no group reaches: 0 and EMPTY_LSE."""
    n, h, h_kv = q.shape[1], q.shape[2], k.shape[2]
    found = layers(groups, h // h_kv)
    # One more row: the dump row that padded entries are written to.
    out = torch.empty((n + 1, h, v.shape[-1]), dtype=q.dtype, device=q.device)
    lse = torch.empty((n + 1, h), dtype=lse_dtype(q.dtype), device=q.device)
    if not _copies_every_row(found, h):
        out.zero_()
        lse.fill_(EMPTY_LSE)
    flat_out, flat_lse = out.view(-1, v.shape[-1]), lse.view(-1)
    q, (k, v) = q[0].contiguous(), (x.contiguous() for x in _without_padded_keys(k[0], v[0], key_padding_mask))
    covered = torch.zeros(h, dtype=torch.bool)
    for layer in found:
        heads, kv_heads = layer.heads.to(q.device), layer.kv_heads.to(q.device)
        merge = bool(covered[layer.heads].any())  # else this layer's part is the first on its heads: copied
        covered[layer.heads] = True
        for bucket in _runs(bounds, layer, n * h, q.device):
            at_q, at_kv, to = (_flat(bucket.read, heads, h), _flat(bucket.read, kv_heads, h_kv),
                               _flat(bucket.write, heads, h))
            o, l = attend(_gather(q, at_q, bucket), _gather(k, at_kv, bucket), _gather(v, at_kv, bucket),
                          causal=is_causal, scale=scale, mask=_key_mask(bucket, key_padding_mask, is_causal),
                          softcap=softcap)
            o, l = _rows(o).to(out.dtype), _rows(l)
            if merge:
                current_o, current_l = flat_out.index_select(0, to), flat_lse.index_select(0, to)
                merge_(current_o, current_l, o, l)
                o, l = current_o, current_l
            flat_out.index_copy_(0, to, o)
            flat_lse.index_copy_(0, to, l)
            del o, l  # before the next bucket's kernel allocates its own
    return out[None, :n], lse[None, :n]


def packed_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                    key_padding_mask: Optional[Tensor], bounds: Sequence[int], groups: Sequence[Group],
                    is_causal: bool, scale: float, softcap: Optional[float] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of ``packed_forward``, each bucket's kernel backward fed the final out and lse."""
    n, h, h_kv = q.shape[1], q.shape[2], k.shape[2]
    dq, dk, dv = (torch.zeros((n + 1, *x.shape[2:]), dtype=x.dtype, device=x.device) for x in (q, k, v))
    flat_dq, flat_dk, flat_dv = (x.flatten(0, 1) for x in (dq, dk, dv))
    q, out, grad_out, lse = (x[0].contiguous() for x in (q, out, grad_out, lse))
    k, v = (x.contiguous() for x in _without_padded_keys(k[0], v[0], key_padding_mask))
    for layer in layers(groups, h // h_kv):
        heads, kv_heads = layer.heads.to(q.device), layer.kv_heads.to(q.device)
        for bucket in _runs(bounds, layer, n * h, q.device):
            at_q, at_kv = _flat(bucket.read, heads, h), _flat(bucket.read, kv_heads, h_kv)
            qb, ob, dob, lb = (_gather(x, at_q, bucket) for x in (q, out, grad_out, lse))
            if bucket.padded:  # padded query rows: zero inputs, zero contributions
                drop = (~bucket.valid).transpose(1, 2)
                qb, ob, dob = (x.masked_fill(drop[..., None], 0.0) for x in (qb, ob, dob))
                lb = lb.masked_fill(drop, 0.0)
            gq, gk, gv = attend_backward(dob, qb, _gather(k, at_kv, bucket), _gather(v, at_kv, bucket), ob, lb,
                                         causal=is_causal, scale=scale,
                                         mask=_key_mask(bucket, key_padding_mask, is_causal), softcap=softcap)
            to, to_kv = _flat(bucket.write, heads, h), _flat(bucket.write, kv_heads, h_kv)
            flat_dq.index_put_((to,), _rows(gq).to(dq.dtype), accumulate=True)
            flat_dk.index_put_((to_kv,), _rows(gk).to(dk.dtype), accumulate=True)
            flat_dv.index_put_((to_kv,), _rows(gv).to(dv.dtype), accumulate=True)
    return dq[None, :n], dk[None, :n], dv[None, :n]


def packed_reference(q: Tensor, k: Tensor, v: Tensor, plan: DilatedPlan, bounds: Sequence[int], is_causal: bool,
                     scale: float, key_padding_mask: Optional[Tensor], dropout_p: float,
                     with_lse: bool = False, softcap: Optional[float] = None, sinks: Optional[Tensor] = None):
    """``reference_attention`` on every document as a sequence of its own,
    concatenated (autograd-native): out (1, n, h, d_v), with ``with_lse``
    also lse (1, n, h); ``softcap`` and ``sinks`` go to each call as to an
    unpacked one (a sink is per row: merged per document is merged once)."""
    outs, lses = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a == b:
            continue
        pad = None if key_padding_mask is None else key_padding_mask[:, a:b]
        result = reference_attention(q[:, a:b], k[:, a:b], v[:, a:b], plan, is_causal, scale, pad, dropout_p,
                                     with_lse=with_lse, softcap=softcap, sinks=sinks)
        outs.append(result[0] if with_lse else result)
        if with_lse:
            lses.append(result[1])
    out = torch.cat(outs, 1) if outs else q.new_zeros((*q.shape[:3], v.shape[-1]))
    if not with_lse:
        return out
    lse = torch.cat(lses, 1) if lses else q.new_full(q.shape[:3], EMPTY_LSE, dtype=lse_dtype(q.dtype))
    return out, lse


# ------------------------------------------------------------ the ops
def _forward(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], cu_seqlens: Tensor,
             flat_plan: list[int], is_causal: bool, scale: float, softcap: Optional[float] = None,
             sinks: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The fast path; with ``sinks`` ``(h,)`` merged into the final out and
    lse (as ``attention::dilated_forward``), which the backward takes."""
    bounds = document_bounds(cu_seqlens, q.shape[1])
    out, lse = packed_forward(q, k, v, key_padding_mask, bounds, groups_from_flat(flat_plan), is_causal, scale,
                              softcap)
    return (out, lse) if sinks is None else apply_sinks(out, lse, sinks)


def _reference(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], cu_seqlens: Tensor,
               flat_plan: list[int], is_causal: bool, scale: float, softcap: Optional[float] = None,
               sinks: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    bounds = document_bounds(cu_seqlens, q.shape[1])
    plan = DilatedPlan.from_flat(q.shape[2], flat_plan)
    return packed_reference(q, k, v, plan, bounds, is_causal, scale, key_padding_mask, 0.0, with_lse=True,
                            softcap=softcap, sinks=sinks)


def _backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              key_padding_mask: Optional[Tensor], cu_seqlens: Tensor, flat_plan: list[int], is_causal: bool,
              scale: float, softcap: Optional[float] = None) -> tuple[Tensor, Tensor, Tensor]:
    bounds = document_bounds(cu_seqlens, q.shape[1])
    return packed_backward(grad_out, q, k, v, out, lse, key_padding_mask, bounds, groups_from_flat(flat_plan),
                           is_causal, scale, softcap)


def _forward_fake(q, k, v, key_padding_mask, cu_seqlens, flat_plan, is_causal, scale, softcap=None, sinks=None):
    return q.new_empty((*q.shape[:3], v.shape[-1])), q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype))


def _backward_fake(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens, flat_plan, is_causal, scale,
                   softcap=None):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup(ctx, inputs, output) -> None:
    q, k, v, key_padding_mask, cu_seqlens, flat_plan, is_causal, scale, softcap, sinks = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, cu_seqlens, sinks)
    ctx.flat_plan, ctx.is_causal, ctx.scale, ctx.softcap = flat_plan, is_causal, scale, softcap


def _gradients(ctx, grad_out, grad_lse):
    """q, k, v from the kernels' backward fed the final out and lse (sinks
    merged); the sinks' own gradient as ``attention::dilated_forward``'s."""
    q, k, v, out, lse, key_padding_mask, cu_seqlens, sinks = ctx.saved_tensors
    grads = dilated_packed_backward(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens, ctx.flat_plan,
                                    ctx.is_causal, ctx.scale, ctx.softcap)
    d_sinks = None if sinks is None or not ctx.needs_input_grad[9] else sinks_grad(grad_out, out, lse, sinks)
    return (*grads, None, None, None, None, None, None, d_sinks)


def _define(name: str, function, fake, autograd: bool):
    op = torch.library.custom_op(name, function, mutates_args=())
    op.register_fake(fake)
    if autograd:
        op.register_autograd(_gradients, setup_context=_setup)
    return op


dilated_packed_backward = _define("attention::dilated_packed_backward", _backward, _backward_fake, autograd=False)
dilated_packed_forward = _define("attention::dilated_packed_forward", _forward, _forward_fake, autograd=True)
dilated_packed_reference = _define("attention::dilated_packed_reference", _reference, _forward_fake, autograd=True)


def run_packed(name: str, q: Tensor, k: Tensor, v: Tensor, flat_plan: Sequence[int], is_causal: bool,
               scale: float, key_padding_mask: Optional[Tensor], dropout_p: float, cu_seqlens: Tensor,
               softcap: Optional[float] = None, sinks: Optional[Tensor] = None) -> Tensor:
    """Implementation ``name`` of ``DilatedAttention`` on a packed batch
    (checked inputs): "reference" (and any call with dropout) per document,
    autograd-native in eager mode and one opaque op under ``torch.compile``
    (which refuses dropout here: the per-document loop reads ``cu_seqlens``);
    "flex" the fused path where it serves the call
    (``attention.dilated.packed_flex.serves_packed``: eager; on the CPU
    without gradients, float32 or half; no soft-cap or sinks, which "flex"
    hands to "fast" as unpacked), else and for "fast" and "auto" the
    bucketed fast path."""
    if name == "reference" or dropout_p > 0:
        if torch.compiler.is_compiling() and dropout_p > 0:
            raise ValueError("dropout with cu_seqlens runs the reference per document in eager mode only; under "
                             "torch.compile set dropout=0.0 or call module.eval()")
        if torch.compiler.is_compiling():
            return dilated_packed_reference(q, k, v, key_padding_mask, cu_seqlens, list(flat_plan), is_causal,
                                            scale, softcap, sinks)[0]
        plan = DilatedPlan.from_flat(q.shape[2], flat_plan)
        return packed_reference(q, k, v, plan, document_bounds(cu_seqlens, q.shape[1]), is_causal, scale,
                                key_padding_mask, dropout_p, softcap=softcap, sinks=sinks)
    if name == "flex" and softcap is None and sinks is None and serves_packed(q, k, v):
        plan = DilatedPlan.from_flat(q.shape[2], flat_plan)
        return packed_flex_attention(q, k, v, plan, document_bounds(cu_seqlens, q.shape[1]), is_causal, scale,
                                     key_padding_mask)
    return dilated_packed_forward(q, k, v, key_padding_mask, cu_seqlens, list(flat_plan), is_causal, scale, softcap,
                                  sinks)[0]
