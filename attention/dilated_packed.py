"""Dilated attention over packed documents (``cu_seqlens``): every document
``[cu[i], cu[i+1])`` gets exactly what ``DilatedAttention`` gives it as a
sequence of its own (docs/design.md section 2.1 at ``n = L``): segments of
``s = min(w, L)`` from the document's first token, head offsets relative
to it, causal inside it, no key of another document.

The fast path (``packed_forward`` / ``packed_backward``). Per group (branch,
head group), every segment of every document is a variable-length sequence
of its selected positions ``start + offset + rate * m``. The segments of all
documents are grouped into a few length BUCKETS (``segment_buckets``): the
longest remaining row count opens a bucket, which takes every segment of at
least ``1 / _WASTE`` of it, so padding costs at most ``_WASTE`` rows per
real row and a group has about ``log(max rows) / log(_WASTE)`` buckets at
most (full segments, the bulk of long documents, share the first, exact
one). Each bucket is ONE gather of its positions, ONE ``kernels.attend``
call (bucket padding excluded by the key mask; padded query rows are
dropped on the scatter) and one merge into the output by log-sum-exp: the
kernel launches per call depend on groups x buckets, never on the number of
documents or segments. The backward walks the same buckets with
``kernels.attend_backward`` fed the FINAL out and lse (exact for the
combined softmax, as in ``dilated_kernels``); padded query rows enter it
with q, grad_out and out 0 and lse 0, which makes their gradient
contributions exactly 0.

Host reads. The bucket index tensors depend on the values of ``cu_seqlens``:
they are computed inside the custom ops (``attention::dilated_packed_*``),
vectorized, once per call and group: one device sync per call for a GPU
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

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .dilated_plan import DilatedPlan, Group, groups_from_flat, head_runs
from .dilated_reference import reference_attention
from .kernels import EMPTY_LSE, attend, attend_backward, lse_dtype, merge_
from .packed import document_bounds

__all__ = ["Bucket", "segment_buckets", "packed_forward", "packed_backward", "packed_reference",
           "dilated_packed_forward", "dilated_packed_backward", "dilated_packed_reference", "run_packed"]

# A bucket pads a segment to at most this many times its selected rows.
_WASTE = 1.25


class Bucket(NamedTuple):
    """Segments padded to one row count: ``valid`` (units, rows) bool (a
    segment's real rows first), ``read`` (units * rows,) the sequence
    positions to gather (0 where padded), ``write`` the same with the dump
    row ``n`` where padded (outputs are scattered there and dropped), and
    ``padded`` whether any entry is."""

    valid: Tensor
    read: Tensor
    write: Tensor
    padded: bool


def segment_buckets(bounds: Sequence[int], g: Group, device: torch.device) -> list[Bucket]:
    """The buckets of group ``g``'s segments over the documents ``bounds``
    (``[0, end_1, ..., total]``), vectorized over documents and segments."""
    cu = torch.tensor(bounds, dtype=torch.int64)
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    starts, lengths = starts[lengths > 0], lengths[lengths > 0]
    if not len(lengths):
        return []
    size = lengths.clamp(max=g.segment)                   # s = min(w, L) per document
    count = -(-lengths // size)                           # segments per document
    doc = torch.repeat_interleave(torch.arange(len(lengths)), count)
    first = torch.cumsum(count, 0) - count
    t = torch.arange(len(doc)) - first[doc]               # segment index inside its document
    seg_start = starts[doc] + t * size[doc]
    seg_len = torch.minimum(size[doc], lengths[doc] - t * size[doc])
    rows = (seg_len - g.offset + g.rate - 1).div(g.rate, rounding_mode="floor").clamp(min=0)
    keep = rows > 0
    seg_start, rows = seg_start[keep], rows[keep]
    buckets = []
    while len(rows):
        top = int(rows.max())
        inside = rows * _WASTE >= top
        starts_b, rows_b = seg_start[inside], rows[inside]
        seg_start, rows = seg_start[~inside], rows[~inside]
        m = torch.arange(top)
        valid = m[None, :] < rows_b[:, None]
        positions = starts_b[:, None] + g.offset + g.rate * m[None, :]
        read, write = positions.where(valid, 0).flatten(), positions.where(valid, bounds[-1]).flatten()
        buckets.append(Bucket(valid.to(device), read.to(device), write.to(device), not bool(valid.all())))
    return buckets


def _gather(x: Tensor, bucket: Bucket, heads: slice) -> Tensor:
    """x (n, h, ...) at the bucket's positions and ``heads`` -> (units, heads, rows, ...)."""
    units, rows = bucket.valid.shape
    return x[:, heads].index_select(0, bucket.read).unflatten(0, (units, rows)).transpose(1, 2)


def _rows(x: Tensor) -> Tensor:
    """A kernel result (units, heads, rows, ...) as (units * rows, heads, ...)."""
    return x.transpose(1, 2).flatten(0, 1)


def _first_branch_disjoint(groups: Sequence[Group]) -> int:
    """How many leading groups (the first branch) write disjoint head sets:
    their parts are written, not merged (``dilated_kernels._written_once``'s rule)."""
    first = 0
    while first < len(groups) and groups[first].branch == groups[0].branch:
        first += 1
    ranges = sorted((g.head_start, g.head_stop) for g in groups[:first])
    return first if all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:])) else 0


def _key_mask(bucket: Bucket, key_padding_mask: Optional[Tensor], is_causal: bool) -> Optional[Tensor]:
    """The keys a bucket's kernel call excludes: the caller's padding, and
    the bucket's padding unless causality already does (a segment's real
    rows come first, so its real queries see no padded key). None when
    nothing is excluded: a key mask costs the kernels a pass over k and v."""
    masked = ~bucket.valid if bucket.padded and not is_causal else None
    if key_padding_mask is not None:
        padded = key_padding_mask[0].index_select(0, bucket.read).view(bucket.valid.shape)
        masked = padded if masked is None else masked | padded
    return masked


def packed_forward(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], bounds: Sequence[int],
                   groups: Sequence[Group], is_causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """-> (out (1, n, h, d_v) in q's dtype, lse (1, n, h)); rows no group reaches: 0 and EMPTY_LSE."""
    n = q.shape[1]
    # One more row: the dump row that padded entries are written to.
    out = torch.zeros((1, n + 1, q.shape[2], v.shape[-1]), dtype=q.dtype, device=q.device)
    lse = torch.full((1, n + 1, q.shape[2]), EMPTY_LSE, dtype=lse_dtype(q.dtype), device=q.device)
    group_size = q.shape[2] // k.shape[2]
    written = _first_branch_disjoint(groups)
    q, k, v = q[0], k[0], v[0]
    for index, g in enumerate(groups):
        for bucket in segment_buckets(bounds, g, q.device):
            masked = _key_mask(bucket, key_padding_mask, is_causal)
            for heads, kv_heads in head_runs(g, group_size):
                o, l = attend(_gather(q, bucket, heads), _gather(k, bucket, kv_heads), _gather(v, bucket, kv_heads),
                              causal=is_causal, scale=scale, key_mask=masked)
                o, l = _rows(o).to(out.dtype), _rows(l)
                if index >= written:
                    current_o = out[0, :, heads].index_select(0, bucket.write)
                    current_l = lse[0, :, heads].index_select(0, bucket.write)
                    merge_(current_o, current_l, o, l)
                    o, l = current_o, current_l
                out[0, :, heads].index_copy_(0, bucket.write, o)
                lse[0, :, heads].index_copy_(0, bucket.write, l)
    return out[:, :n], lse[:, :n]


def packed_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                    key_padding_mask: Optional[Tensor], bounds: Sequence[int], groups: Sequence[Group],
                    is_causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of ``packed_forward``, each bucket's kernel backward fed the final out and lse."""
    n = q.shape[1]
    dq, dk, dv = (torch.zeros((1, n + 1, *x.shape[2:]), dtype=x.dtype, device=x.device) for x in (q, k, v))
    group_size = q.shape[2] // k.shape[2]
    q, k, v, out, grad_out, lse = (x[0] for x in (q, k, v, out, grad_out, lse))
    for g in groups:
        for bucket in segment_buckets(bounds, g, q.device):
            masked = _key_mask(bucket, key_padding_mask, is_causal)
            for heads, kv_heads in head_runs(g, group_size):
                qb, ob, dob, lb = (_gather(x, bucket, heads) for x in (q, out, grad_out, lse))
                if bucket.padded:  # padded query rows: zero inputs, zero contributions
                    drop = (~bucket.valid)[:, None, :]
                    qb, ob, dob = (x.masked_fill(drop[..., None], 0.0) for x in (qb, ob, dob))
                    lb = lb.masked_fill(drop, 0.0)
                gq, gk, gv = attend_backward(dob, qb, _gather(k, bucket, kv_heads), _gather(v, bucket, kv_heads),
                                             ob, lb, causal=is_causal, scale=scale, key_mask=masked)
                dq[0, :, heads].index_add_(0, bucket.write, _rows(gq).to(dq.dtype))
                dk[0, :, kv_heads].index_add_(0, bucket.write, _rows(gk).to(dk.dtype))
                dv[0, :, kv_heads].index_add_(0, bucket.write, _rows(gv).to(dv.dtype))
    return dq[:, :n], dk[:, :n], dv[:, :n]


def packed_reference(q: Tensor, k: Tensor, v: Tensor, plan: DilatedPlan, bounds: Sequence[int], is_causal: bool,
                     scale: float, key_padding_mask: Optional[Tensor], dropout_p: float,
                     with_lse: bool = False):
    """``reference_attention`` on every document as a sequence of its own,
    concatenated (autograd-native): out (1, n, h, d_v), with ``with_lse``
    also lse (1, n, h)."""
    outs, lses = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a == b:
            continue
        pad = None if key_padding_mask is None else key_padding_mask[:, a:b]
        result = reference_attention(q[:, a:b], k[:, a:b], v[:, a:b], plan, is_causal, scale, pad, dropout_p,
                                     with_lse=with_lse)
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
             flat_plan: list[int], is_causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    bounds = document_bounds(cu_seqlens, q.shape[1])
    return packed_forward(q, k, v, key_padding_mask, bounds, groups_from_flat(flat_plan), is_causal, scale)


def _reference(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], cu_seqlens: Tensor,
               flat_plan: list[int], is_causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    bounds = document_bounds(cu_seqlens, q.shape[1])
    plan = DilatedPlan.from_flat(q.shape[2], flat_plan)
    return packed_reference(q, k, v, plan, bounds, is_causal, scale, key_padding_mask, 0.0, with_lse=True)


def _backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              key_padding_mask: Optional[Tensor], cu_seqlens: Tensor, flat_plan: list[int], is_causal: bool,
              scale: float) -> tuple[Tensor, Tensor, Tensor]:
    bounds = document_bounds(cu_seqlens, q.shape[1])
    return packed_backward(grad_out, q, k, v, out, lse, key_padding_mask, bounds, groups_from_flat(flat_plan),
                           is_causal, scale)


def _forward_fake(q, k, v, key_padding_mask, cu_seqlens, flat_plan, is_causal, scale):
    return q.new_empty((*q.shape[:3], v.shape[-1])), q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype))


def _backward_fake(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens, flat_plan, is_causal, scale):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup(ctx, inputs, output) -> None:
    q, k, v, key_padding_mask, cu_seqlens, flat_plan, is_causal, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, cu_seqlens)
    ctx.flat_plan, ctx.is_causal, ctx.scale = flat_plan, is_causal, scale


def _gradients(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding_mask, cu_seqlens = ctx.saved_tensors
    grads = dilated_packed_backward(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens, ctx.flat_plan,
                                    ctx.is_causal, ctx.scale)
    return (*grads, None, None, None, None, None)


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
               scale: float, key_padding_mask: Optional[Tensor], dropout_p: float, cu_seqlens: Tensor) -> Tensor:
    """Implementation ``name`` of ``DilatedAttention`` on a packed batch
    (checked inputs): "reference" (and any call with dropout) per document,
    autograd-native in eager mode and one opaque op under ``torch.compile``;
    "fast", "flex" and "auto" the bucketed fast path (the fused FlexAttention
    path builds no packed BlockMask: module docstring of ``dilated``)."""
    if name == "reference" or dropout_p > 0:
        if torch.compiler.is_compiling() and dropout_p == 0:
            return dilated_packed_reference(q, k, v, key_padding_mask, cu_seqlens, list(flat_plan), is_causal,
                                            scale)[0]
        plan = DilatedPlan.from_flat(q.shape[2], flat_plan)
        return packed_reference(q, k, v, plan, document_bounds(cu_seqlens, q.shape[1]), is_causal, scale,
                                key_padding_mask, dropout_p)
    return dilated_packed_forward(q, k, v, key_padding_mask, cu_seqlens, list(flat_plan), is_causal, scale)[0]
