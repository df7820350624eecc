"""LongNet dilated attention (docs/design.md sections 2.1, 5 and 7):
functional core and modules.

Layout, everywhere in this file: ``q`` is ``(batch, q_len, heads, head_dim)``,
``k, v`` are ``(batch, kv_len, kv_heads, head_dim)`` with ``q_len <= kv_len``
and ``heads % kv_heads == 0`` (grouped-query attention: query head ``j`` reads
key/value head ``j // (heads / kv_heads)``); outputs are q's shape;
log-sum-exps ``(batch, q_len, heads)``; ``key_padding_mask`` is ``(batch,
kv_len)`` bool, True = padding. The queries are the LAST ``q_len`` positions
(bottom-right aligned: query row ``i`` is position ``kv_len - q_len + i``), so
a decode step or a chunk of prefill gets exactly those rows of the full
forward. Kernels (``attention.kernels``) take ``(B, heads, M, head_dim)``,
reached by ``.transpose`` of views.

The math in two lines. Branch i attends inside segments of ``s = min(w_i, n)``
positions (n = kv_len), each head group to every ``r_i``-th position from its
offset, giving ``O_i`` and ``lse_i`` (0 and -inf where it selects nothing);
the result is ``O = sum_i exp(lse_i - L) O_i`` with ``L = logsumexp_i lse_i``:
one softmax per row over all the keys any branch gives it. With causal
attention a position's pattern never depends on n (its segment is
``[p // w_i * w_i, ...)`` whatever n is).

A plan (``DilatedPlan``) is the length-free ``groups`` table of a store
pattern as Python ints: one row per (branch, head group), columns
``patternstore.pattern.GROUP_COLUMNS``. Everything that depends on the length
(s, the number of full segments, rows per segment, the tail, where the
queries start) is derived inside the custom op from concrete shapes
(``_pieces``), so a compiled graph never specializes on the length. Each
piece's rows are a strided view of the sequence, so no gather and no index
tensor is needed, and a query row costs the keys it attends.

Two implementations of the same function:
- ``dilated_attention_reference``: plain and autograd-native; per branch a
  zero-filled full-size output, softmax attention per piece, one softmax over
  branches at the end. The one to read. Under ``torch.compile`` (no dropout)
  ``DilatedAttention`` runs it as one opaque op whose backward recomputes it
  by autograd, so its graph is length-free too.
- ``dilated_attention``: the fast path. One custom op (opaque to
  ``torch.compile``) runs ``kernels.attend`` piece by piece, chunk by chunk,
  and merges each result into one output in place; its backward runs
  ``kernels.attend_backward`` per chunk with the final merged output and
  log-sum-exp, which is exactly the gradient of the combined softmax, branch
  weights included.

Supported program transforms: ``torch.compile`` (``fullgraph=True``,
``dynamic=True``), ``torch.export`` with a dynamic sequence dimension,
``torch.func.grad`` / ``vjp``. Double backward and ``torch.jit.script`` raise
a clear error.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from typing import Iterator, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from patternstore.pattern import GROUP_COLUMNS, Pattern
from patternstore.specs import DilatedSpec, SCHEMES, check_branches, check_choice
from patternstore.store import PatternStore, default_store

from .kernels import (
    EMPTY_LSE,
    accumulate_dtype,
    attend,
    attend_backward,
    check_attention_inputs,
    check_dropout,
    check_is_causal,
    check_softmax_scale,
    default_scale,
    lse_dtype,
    merge_,
)

__all__ = [
    "DilatedAttention",
    "ImprovedDilatedAttention",
    "DilatedPlan",
    "Group",
    "dilated_attention",
    "dilated_attention_reference",
    "check_attention_inputs",
]

_NEG_INF = float("-inf")

# ---------------------------------------------------------------------- plan
class Group(NamedTuple):
    """One row of a plan: branch ``branch`` (segment length ``segment`` =
    w_i, not clipped to any length; dilation ``rate``) on query heads
    ``[head_start, head_stop)``, selecting positions ``offset + rate * m`` of
    each segment."""

    branch: int
    segment: int
    rate: int
    offset: int
    head_start: int
    head_stop: int


assert Group._fields == GROUP_COLUMNS


class DilatedPlan(NamedTuple):
    """What a kernel needs of a dilated pattern, as plain ints: valid for
    every sequence length."""

    num_heads: int
    groups: tuple[Group, ...]

    @classmethod
    def from_pattern(cls, pattern: Pattern) -> "DilatedPlan":
        spec = pattern.spec
        if not isinstance(spec, DilatedSpec):
            raise ValueError(f"a dilated plan needs a DilatedSpec pattern, got {spec.kind!r}")
        return cls(spec.num_heads, tuple(Group(*row) for row in pattern["groups"].tolist()))

    @classmethod
    def from_flat(cls, num_heads: int, flat_plan: Sequence[int]) -> "DilatedPlan":
        """The plan whose group rows, back to back, are ``flat_plan`` (``_flat``'s inverse)."""
        return cls(num_heads, tuple(_plan_groups(flat_plan)))


class Piece(NamedTuple):
    """One kernel problem of a group at given lengths: ``count`` segments
    (regions ``region`` rows long, one after another) of queries from q row
    ``q_start`` and of keys from k row ``k_start``; in each region the rows
    ``offset, offset + rate, ...`` are selected: ``q_rows`` queries, the last
    ones of the ``k_rows`` keys (so a causal piece is bottom-right aligned)."""

    count: int
    rate: int
    q_start: int
    q_region: int
    q_offset: int
    q_rows: int
    k_start: int
    k_region: int
    k_offset: int
    k_rows: int


def _selected(length: int, offset: int, rate: int) -> int:
    """How many of the rows ``offset + rate * m`` lie in ``[0, length)``."""
    return max(0, -(-(length - offset) // rate))


def _pieces(g: Group, q_len: int, kv_len: int) -> list[Piece]:
    """The kernel problems of group ``g`` for the last ``q_len`` of ``kv_len``
    positions: in every segment the queries are a suffix of the segment (they
    run to the end of the sequence), so each piece's selected queries are
    the last of its selected keys. Pieces: the segment the queries start
    inside (if they start mid-segment), the whole segments after it (one
    batched piece), and the shorter last segment."""
    s, r, o = min(g.segment, kv_len), g.rate, g.offset
    first_query = kv_len - q_len
    full = kv_len // s
    pieces = []
    t = first_query // s  # the first segment that holds a query
    if first_query % s:
        start, stop = t * s, min(t * s + s, kv_len)
        first = start + o + r * max(0, -(-(first_query - start - o) // r))  # first selected query position
        q_rows = _selected(stop - first, 0, r)
        if q_rows:
            pieces.append(Piece(1, r, first - first_query, stop - first, 0, q_rows,
                                start, stop - start, o, _selected(stop - start, o, r)))
        t += 1
    rows = _selected(s, o, r)
    if t < full and rows:
        pieces.append(Piece(full - t, r, t * s - first_query, s, o, rows, t * s, s, o, rows))
    tail = kv_len - full * s
    if tail and t <= full and _selected(tail, o, r):
        rows = _selected(tail, o, r)
        pieces.append(Piece(1, r, full * s - first_query, tail, o, rows, full * s, tail, o, rows))
    return pieces


def _view(x: Tensor, piece: Piece, queries: bool) -> Tensor:
    """The rows of ``x`` (b, L, ...) a piece selects, as a view (b, count, rows, ...)."""
    if queries:
        start, region, offset, rows = piece.q_start, piece.q_region, piece.q_offset, piece.q_rows
    else:
        start, region, offset, rows = piece.k_start, piece.k_region, piece.k_offset, piece.k_rows
    regions = x[:, start : start + piece.count * region].unflatten(1, (piece.count, region))
    return regions[:, :, offset : offset + (rows - 1) * piece.rate + 1 : piece.rate]


def _head_runs(g: Group, group_size: int) -> list[tuple[slice, slice]]:
    """(query heads, key/value heads) of a group under GQA (``group_size``
    query heads per key/value head): the group's heads cut where a
    key/value head's whole set of query heads begins or ends, so every run is
    either whole key/value heads or part of one, a valid grouped call."""
    start, stop = g.head_start, g.head_stop
    whole_from, whole_to = -(-start // group_size) * group_size, stop // group_size * group_size
    cuts = sorted({start, stop} | {x for x in (whole_from, whole_to) if start < x < stop})
    return [(slice(a, b), slice(a // group_size, -(-b // group_size))) for a, b in zip(cuts, cuts[1:])]


def _check_plan(plan: DilatedPlan, q: Tensor) -> None:
    if not isinstance(plan, DilatedPlan):
        raise ValueError(f"plan must be a DilatedPlan, got {type(plan).__name__}")
    if plan.num_heads != q.shape[2]:
        raise ValueError(f"plan is for num_heads={plan.num_heads}; q has num_heads={q.shape[2]}")


# ----------------------------------------------------- reference (plain)
def _softmax_lse(s: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax and log-sum-exp over the last dim, for rows that may be all
    -inf: those get probabilities 0 and lse -inf, and gradients stay finite
    (``torch.logsumexp`` and ``torch.softmax`` give NaN there)."""
    peak = s.detach().amax(-1, keepdim=True)
    peak = peak.masked_fill(peak == _NEG_INF, 0.0)
    e = (s - peak).exp()
    total = e.sum(-1, keepdim=True)
    safe = total.clamp_min(torch.finfo(total.dtype).tiny)
    lse = torch.where(total > 0, safe.log() + peak, _NEG_INF)
    return e / safe, lse.squeeze(-1)


def dilated_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: DilatedPlan,
    *,
    is_causal: bool = False,
    softmax_scale: Optional[float] = None,
    key_padding_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """docs/design.md section 2.1 written out: per branch, a zero
    output and a -inf log-sum-exp of full size, filled piece by piece with
    softmax attention; then one softmax over the branches' log-sum-exps
    weights their outputs. Differentiable by autograd. Dropout ``dropout_p``
    applies to the attention probabilities."""
    check_attention_inputs(q, k, v, key_padding_mask)
    _check_plan(plan, q)
    is_causal = check_is_causal(is_causal)
    scale = default_scale(q, check_softmax_scale(softmax_scale))
    return _reference(q, k, v, plan, is_causal, scale, key_padding_mask, check_dropout(dropout_p))


# Score elements the reference materializes at once (64 Mi: 256 MiB in float32).
_REFERENCE_SCORES = 1 << 26


def _reference(q, k, v, plan, is_causal, scale, key_padding_mask, dropout_p, with_lse: bool = False):
    """-> out, or (out, lse) with ``with_lse`` (lse EMPTY_LSE where no key)."""
    dtype, acc = q.dtype, accumulate_dtype(q.dtype)
    q, k, v = (x.to(acc) for x in (q, k, v))
    b, m, h, d = q.shape
    n, group_size = k.shape[1], h // k.shape[2]
    outs, lses = [], []
    for branch in sorted({g.branch for g in plan.groups}):
        out = q.new_zeros(b, m, h, d)
        lse = q.new_full((b, m, h), _NEG_INF)
        for g in plan.groups:
            if g.branch != branch:
                continue
            for piece in _pieces(g, m, n):
                # (b, count, heads, rows, d): segments as batch, selected rows as the sequence
                qp, kp, vp = (_view(x, piece, x is q).transpose(2, 3) for x in (q, k, v))
                pad = None if key_padding_mask is None else _view(key_padding_mask, piece, False)[:, :, None, None, :]
                future = None
                if is_causal:  # bottom-right: query i is key k_rows - q_rows + i
                    future = torch.ones(piece.q_rows, piece.k_rows, dtype=torch.bool, device=q.device)
                    future = future.triu(piece.k_rows - piece.q_rows + 1)
                step = max(1, _REFERENCE_SCORES // (b * h * piece.q_rows * piece.k_rows))
                for heads, kv_heads in _head_runs(g, group_size):
                    repeat = (heads.stop - heads.start) // (kv_heads.stop - kv_heads.start)
                    for t in range(0, piece.count, step):  # a few segments at a time
                        seg = slice(t, t + step)
                        ks, vs = (x[:, seg, kv_heads].repeat_interleave(repeat, dim=2) for x in (kp, vp))
                        scores = (qp[:, seg, heads] @ ks.transpose(-1, -2)) * scale
                        if future is not None:
                            scores = scores.masked_fill(future, _NEG_INF)
                        if pad is not None:
                            scores = scores.masked_fill(pad[:, seg], _NEG_INF)
                        p, seg_lse = _softmax_lse(scores)
                        if dropout_p > 0:
                            p = F.dropout(p, dropout_p)
                        _view(out, piece, True)[:, seg, :, heads] = (p @ vs).transpose(2, 3)
                        _view(lse, piece, True)[:, seg, :, heads] = seg_lse.transpose(2, 3)
        outs.append(out)
        lses.append(lse)
    weights, total = _softmax_lse(torch.stack(lses, dim=-1))  # exp(lse_i - L): (b, m, h, branches)
    out = sum(w.unsqueeze(-1) * o for w, o in zip(weights.unbind(-1), outs)).to(dtype)
    if with_lse:
        return out, total.clamp_min(EMPTY_LSE).to(lse_dtype(dtype))
    return out


@torch.library.custom_op("patternstore::dilated_attention_reference", mutates_args=())
def _reference_op(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], flat_plan: list[int],
    is_causal: bool, scale: float,
) -> tuple[Tensor, Tensor]:
    """``_reference`` (no dropout) as one opaque op -> (out, lse): what
    ``DilatedAttention`` runs under ``torch.compile``, so that the graph does
    not follow the length through the reference's Python loops. Its backward
    is the fast path's (exact given the final out and lse)."""
    plan = DilatedPlan.from_flat(q.shape[2], flat_plan)
    return _reference(q, k, v, plan, is_causal, scale, key_padding_mask, 0.0, with_lse=True)


@_reference_op.register_fake
def _(q, k, v, key_padding_mask, flat_plan, is_causal, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype))


def _reference_setup(ctx, inputs, output) -> None:
    q, k, v, key_padding_mask, flat_plan, is_causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.flat_plan, ctx.is_causal, ctx.scale = flat_plan, is_causal, scale


def _reference_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    grads = _dilated_backward_op(grad_out, q, k, v, out, lse, key_padding_mask, ctx.flat_plan, ctx.is_causal, ctx.scale)
    return (*grads, None, None, None, None)


_reference_op.register_autograd(_reference_backward, setup_context=_reference_setup)


# ------------------------------------------------------------ fast path
# A chunk's kernel output is at most 1/_CHUNK_FRACTION of the whole output (or
# one segment, or _MIN_CHUNK elements): with the in-place merge, forward peak
# memory above the inputs is the output, its log-sum-exp (1/head_dim of it)
# and one chunk's temporaries.
_CHUNK_FRACTION = 8
_MIN_CHUNK = 1 << 20


class _Rows(NamedTuple):
    """Where a piece's rows of one tensor ``x`` (b, L, ...) lie in its
    storage: row ``m`` of segment ``c`` of batch row ``i`` starts at
    ``offset + i * batch + c * segment + m * row``; the units of a chunk lie
    ``unit`` apart (consecutive segments, or for a one-segment piece
    consecutive batch rows). A chunk of them in the
    kernels' layout is then ONE ``as_strided`` (``_Rows.chunk``) instead of
    the five to eight view ops of ``_view`` plus the transposes: on a GPU
    each view op is host time the kernels wait for (docs/design.md section 5)."""

    x: Tensor
    offset: int
    batch: int
    segment: int
    row: int
    unit: int

    @classmethod
    def of(cls, x: Tensor, piece: Piece, queries: bool) -> "_Rows":
        start, region, offset = (
            (piece.q_start, piece.q_region, piece.q_offset) if queries
            else (piece.k_start, piece.k_region, piece.k_offset)
        )
        stride = x.stride()
        segment = region * stride[1]
        return cls(x, x.storage_offset() + (start + offset) * stride[1], stride[0], segment,
                   piece.rate * stride[1], segment if piece.count > 1 else stride[0])

    def chunk(self, span: "_Span", rows: int, heads: Optional[slice]) -> Tensor:
        """Rows of ``span``'s units as ``(units, heads, rows, ...)`` (``(units,
        rows)`` for a 2-D ``x``, which has no heads): what a kernel takes."""
        x = self.x
        offset = self.offset + span.batch_row * self.batch + span.segment * self.segment
        if x.dim() == 2:
            return x.as_strided((span.units, rows), (self.unit, self.row), offset)
        head_stride = x.stride(2)
        offset += heads.start * head_stride
        size = (span.units, heads.stop - heads.start, rows, *x.shape[3:])
        return x.as_strided(size, (self.unit, head_stride, self.row, *x.stride()[3:]), offset)


class _Span(NamedTuple):
    """One chunk: ``units`` (batch row, segment) pairs from (``batch_row``,
    ``segment``): consecutive segments (possibly running into the next batch
    row when the strides allow), or consecutive batch rows of a one-segment
    piece."""

    batch_row: int
    segment: int
    units: int


def _spans(piece: Piece, heads: int, q: Tensor, tensors: Sequence[_Rows]) -> list[_Span]:
    """The chunks of one piece: at most 1/_CHUNK_FRACTION of the output (or
    _MIN_CHUNK elements, or one unit) each, the same for every tensor of the
    call so that their chunks line up. A chunk runs across batch rows where
    every tensor's batch stride is ``count`` segment strides (or there is one
    batch row, or one segment)."""
    b, d, count = q.shape[0], q.shape[-1], piece.count
    unit = max(piece.q_rows, piece.k_rows) * heads * d
    per_chunk = max(1, max(q.numel() // _CHUNK_FRACTION, _MIN_CHUNK) // unit)
    if count == 1:
        return [_Span(i, 0, min(per_chunk, b - i)) for i in range(0, b, per_chunk)]
    if b == 1 or all(t.batch == count * t.segment for t in tensors):
        total = b * count
        return [_Span(u // count, u % count, min(per_chunk, total - u)) for u in range(0, total, per_chunk)]
    return [_Span(i, c, min(per_chunk, count - c)) for i in range(b) for c in range(0, count, per_chunk)]


def _plan_groups(flat_plan: Sequence[int]) -> list[Group]:
    width = len(Group._fields)
    return [Group(*flat_plan[i : i + width]) for i in range(0, len(flat_plan), width)]


def _written_once(groups: Sequence[Group]) -> int:
    """How many leading groups write disjoint (row, head) sets: those of the
    first branch when their head ranges do not overlap (every plan the store
    makes). Their results are copied into the fresh output instead of
    merged: merging into (0, EMPTY_LSE) gives exactly the part itself
    (weight sigmoid(l - EMPTY_LSE) = 1), so this saves three ops per chunk
    and changes no bit."""
    first = 0
    while first < len(groups) and groups[first].branch == groups[0].branch:
        first += 1
    ranges = sorted((g.head_start, g.head_stop) for g in groups[:first])
    disjoint = all(stop <= start for (_, stop), (start, _) in zip(ranges, ranges[1:]))
    return first if disjoint else 0


def _chunk_views(
    groups: Sequence[Group], q: Tensor, k: Tensor, query_side: Sequence[Tensor], key_side: Sequence[Tensor],
    key_padding_mask: Optional[Tensor],
) -> Iterator[tuple[int, list[Tensor], list[Tensor], Optional[Tensor]]]:
    """Every kernel call of the fast path, in order: ``(group index, chunks of
    the query_side tensors (b, q_len, h, ...), chunks of the key_side tensors
    (b, kv_len, h_kv, ...), the key mask's chunk or None)``, each chunk in the
    kernels' layout (``_Rows.chunk``); the forward and the backward walk the
    same chunks."""
    q_len, h, n = q.shape[1], q.shape[2], k.shape[1]
    group_size = h // k.shape[2]
    for index, g in enumerate(groups):
        for piece in _pieces(g, q_len, n):
            query_rows = [_Rows.of(x, piece, True) for x in query_side]
            key_rows = [_Rows.of(x, piece, False) for x in key_side]
            pad = None if key_padding_mask is None else _Rows.of(key_padding_mask, piece, False)
            every = query_rows + key_rows + ([] if pad is None else [pad])
            for heads, kv_heads in _head_runs(g, group_size):
                for span in _spans(piece, heads.stop - heads.start, q, every):
                    yield (index, [x.chunk(span, piece.q_rows, heads) for x in query_rows],
                           [x.chunk(span, piece.k_rows, kv_heads) for x in key_rows],
                           None if pad is None else pad.chunk(span, piece.k_rows, None))


def forward_groups(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], groups: Sequence[Group],
    is_causal: bool, scale: float, backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """Every group's attention folded into a new ``out`` (b, q_len, h, d) in
    q's dtype (the rule above ``kernels.accumulate_dtype``) and ``lse`` (b,
    q_len, h), chunk by chunk (the forward of the fast path; the
    sequence-parallel module runs its chunk-local groups through it too).
    Rows no group reaches are 0 with lse EMPTY_LSE. ``backend``: as
    ``kernels.attend``'s (default: q's device type; "cuda" on meta tensors
    runs the CUDA control flow)."""
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full(q.shape[:3], EMPTY_LSE, dtype=lse_dtype(q.dtype), device=q.device)
    copied = _written_once(groups)
    for index, (qc, oc, lc), (kc, vc), pc in _chunk_views(groups, q, k, (q, out, lse), (k, v), key_padding_mask):
        o, l = attend(qc, kc, vc, causal=is_causal, scale=scale, key_mask=pc, backend=backend)
        if index < copied:
            oc.copy_(o)
            lc.copy_(l)
        else:
            merge_(oc, lc, o, l)
        del o, l  # before the next chunk's kernel allocates its own
    return out, lse


def backward_groups(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    key_padding_mask: Optional[Tensor], groups: Sequence[Group], is_causal: bool, scale: float,
    dq: Tensor, dk: Tensor, dv: Tensor, backend: Optional[str] = None,
) -> None:
    """Add every group's gradients into ``dq, dk, dv``, each kernel backward
    fed the FINAL ``out`` and ``lse`` at its rows (``backend`` as in
    ``forward_groups``)."""
    views = _chunk_views(groups, q, k, (grad_out, q, out, lse, dq), (k, v, dk, dv), key_padding_mask)
    for _, (doc, qc, oc, lc, dqc), (kc, vc, dkc, dvc), pc in views:
        partial = attend_backward(doc, qc, kc, vc, oc, lc, causal=is_causal, scale=scale, key_mask=pc,
                                  backend=backend)
        for total, part in zip((dqc, dkc, dvc), partial):
            total.add_(part)
        del partial, part


@torch.library.custom_op("patternstore::dilated_attention", mutates_args=())
def _dilated_forward_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Optional[Tensor],
    flat_plan: list[int],
    is_causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """-> (out (b, q_len, h, d) in q's dtype, lse (b, q_len, h)); ``flat_plan``:
    the plan's group rows back to back (length-free: the same at every length)."""
    return forward_groups(q, k, v, key_padding_mask, _plan_groups(flat_plan), is_causal, scale)


@_dilated_forward_op.register_fake
def _(q, k, v, key_padding_mask, flat_plan, is_causal, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype))


@torch.library.custom_op("patternstore::dilated_attention_backward", mutates_args=())
def _dilated_backward_op(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    key_padding_mask: Optional[Tensor],
    flat_plan: list[int],
    is_causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), each group's kernel backward fed the final ``out`` and
    ``lse`` at its rows, summed in place in the inputs' dtype (the rule above
    ``kernels.accumulate_dtype``)."""
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    dk, dv = (torch.zeros(k.shape, dtype=k.dtype, device=k.device) for _ in range(2))
    backward_groups(grad_out, q, k, v, out, lse, key_padding_mask, _plan_groups(flat_plan), is_causal, scale, dq, dk, dv)
    return dq, dk, dv


@_dilated_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, key_padding_mask, flat_plan, is_causal, scale):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


class _DilatedFunction(torch.autograd.Function):
    """Autograd of the custom ops, written as a Function with
    ``setup_context`` so that ``torch.func`` transforms (grad, vjp, vmap)
    take it; ``torch.compile`` traces it into the graph around the opaque
    ops. The backward is differentiable once: double backward raises."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, key_padding_mask, flat_plan, is_causal, scale):  # type: ignore[override]
        return _dilated_forward_op(q, k, v, key_padding_mask, flat_plan, is_causal, scale)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, v, key_padding_mask, flat_plan, is_causal, scale = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)  # internal: the modules return only ``out``
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
        ctx.flat_plan, ctx.is_causal, ctx.scale = flat_plan, is_causal, scale

    @staticmethod
    def backward(ctx, grad_out, grad_lse):  # type: ignore[override]
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        with torch.no_grad():
            grads = _dilated_backward_op(
                grad_out, q, k, v, out, lse, key_padding_mask, ctx.flat_plan, ctx.is_causal, ctx.scale
            )
        anchors = [x for x in (grad_out, q, k, v) if x.requires_grad]
        if torch.is_grad_enabled() and anchors:
            # create_graph: gradients that depend on the inputs through a node
            # whose backward names the limit (instead of a silent detach).
            grads = _NoDoubleBackward.apply(anchors[0], *grads)
        return (*grads, None, None, None, None)


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on ``grads`` whose backward is a clear error (double backward
    of the fast path); ``anchor``, an input that requires grad, attaches it."""

    @staticmethod
    def forward(anchor, *grads):  # type: ignore[override]
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        raise RuntimeError(
            "double backward (gradients of gradients) of the fast dilated attention path is not supported; "
            "DilatedAttention (the autograd-native reference path) supports it"
        )


def dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: DilatedPlan,
    *,
    is_causal: bool = False,
    softmax_scale: Optional[float] = None,
    key_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """The same function as ``dilated_attention_reference`` (no dropout),
    fast: fused kernels on strided views, in-place merge, memory bounded by
    chunking. Exact gradients for q, k, v through ``torch.autograd``."""
    check_attention_inputs(q, k, v, key_padding_mask)
    _check_plan(plan, q)
    is_causal = check_is_causal(is_causal)
    scale = default_scale(q, check_softmax_scale(softmax_scale))
    return _fast(q, k, v, _flat(plan), is_causal, scale, key_padding_mask)


def _flat(plan: DilatedPlan) -> tuple[int, ...]:
    """The plan's group rows back to back: the form the custom ops take."""
    return tuple(value for g in plan.groups for value in g)


def _fast(q, k, v, flat_plan: Sequence[int], is_causal, scale, key_padding_mask) -> Tensor:
    out, _ = _DilatedFunction.apply(q, k, v, key_padding_mask, list(flat_plan), is_causal, scale)
    return out


# ------------------------------------------------------------------ modules
# Plans a module keeps (one per head count it has seen; a model uses one).
_PLANS_KEPT = 8


class _DilatedBase(nn.Module):
    """Configuration, validation and the plan lookup shared by the modules.
    Pickled state: the configuration and ``store`` (a PatternStore, which
    pickles as its directory, or None for the default store); plans are
    rebuilt lazily in any process."""

    def __init__(
        self,
        segment_lengths,
        dilation_rates,
        *,
        scheme: str = "longnet",
        softmax_scale: Optional[float] = None,
        dropout: float = 0.0,
        store: Optional[PatternStore] = None,
    ) -> None:
        super().__init__()
        self.segment_lengths, self.dilation_rates = check_branches(segment_lengths, dilation_rates)
        self.scheme = check_choice("scheme", scheme, SCHEMES)
        if store is not None and not isinstance(store, PatternStore):
            raise ValueError(f"store must be a PatternStore or None, got {type(store).__name__}")
        self.softmax_scale = check_softmax_scale(softmax_scale)
        self.dropout = check_dropout(dropout)
        self.store = store
        self._plans: OrderedDict[int, DilatedPlan] = OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_plans": OrderedDict()}

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"{type(self).__name__} cannot be compiled by torch.jit.script (its kernels are custom ops "
            f"and Python control flow); use torch.compile(module) instead"
        )

    # Compile contract (docs/design.md section 4). The lookup runs in
    # eager Python even inside torch.compile(fullgraph=True): dynamo calls a
    # function marked assume_constant_result at trace time and bakes its
    # result (a few dozen ints) into the graph. The plan depends only on the
    # head count, never on the length (the custom op derives everything
    # per-length from its inputs' shapes), so a dynamic sequence dimension
    # stays dynamic: one compile serves every length, and torch.export takes
    # a Dim on it. No tensor reaches the graph from the store: there are no
    # graph constants, no device copies and no locks in the graph.
    # The constant is a tuple of ints, not the DilatedPlan: torch 2.11's dynamo
    # could not iterate the NamedTuples of a constant result
    # (InternalTorchDynamoError from a HASATTR guard, second device run).
    @torch.compiler.assume_constant_result
    def _flat_plan(self, num_heads: int) -> tuple[int, ...]:
        """``_plan(num_heads)`` as the ints the custom ops take."""
        return _flat(self._plan(num_heads))

    def _plan(self, num_heads: int) -> DilatedPlan:
        """The plan for ``num_heads`` query heads: from this module's cache, else the store."""
        plan = self._plans.get(num_heads)
        if plan is None:
            spec = DilatedSpec(self.segment_lengths, self.dilation_rates, num_heads, self.scheme)
            store = self.store if self.store is not None else default_store()
            plan = DilatedPlan.from_pattern(store.get(spec))
            self._plans[num_heads] = plan
            while len(self._plans) > _PLANS_KEPT:
                self._plans.popitem(last=False)
        return plan

    def _prepare(self, q, k, v, is_causal, key_padding_mask) -> tuple[tuple[int, ...], float]:
        """(the flat plan for q's head count, the softmax scale), after the checks."""
        check_attention_inputs(q, k, v, key_padding_mask)
        check_is_causal(is_causal)
        flat_plan = self._flat_plan(operator.index(q.shape[2]))
        return flat_plan, default_scale(q, self.softmax_scale)

    def extra_repr(self) -> str:
        return (
            f"segment_lengths={self.segment_lengths}, dilation_rates={self.dilation_rates}, "
            f"scheme={self.scheme!r}, softmax_scale={self.softmax_scale}, dropout={self.dropout}"
        )


class DilatedAttention(_DilatedBase):
    """LongNet dilated attention, written to be read (``dilated_attention_reference``).

    ``forward(q, k, v, is_causal=False, key_padding_mask=None)``: q of shape
    (batch, q_len, heads, head_dim), k and v (batch, kv_len, kv_heads,
    head_dim), ``q_len <= kv_len`` (queries are the last positions), any
    length; returns q's shape. ``key_padding_mask``: (batch, kv_len) bool.
    """

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False, key_padding_mask: Optional[Tensor] = None
    ) -> Tensor:
        flat_plan, scale = self._prepare(q, k, v, is_causal, key_padding_mask)
        dropout_p = self.dropout if self.training else 0.0
        if torch.compiler.is_compiling() and dropout_p == 0:
            # One opaque op: the graph stays length-free (eager stays autograd-native).
            return _reference_op(q, k, v, key_padding_mask, list(flat_plan), is_causal, scale)[0]
        plan = DilatedPlan.from_flat(q.shape[2], flat_plan)
        return _reference(q, k, v, plan, is_causal, scale, key_padding_mask, dropout_p)


class ImprovedDilatedAttention(_DilatedBase):
    """The same function as ``DilatedAttention``, fast and memory-bounded
    (``dilated_attention``): a decode step (``q_len`` 1 against a cache)
    costs the keys its row attends. With dropout in training it takes the
    reference path (the fused kernels here run without dropout)."""

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False, key_padding_mask: Optional[Tensor] = None
    ) -> Tensor:
        flat_plan, scale = self._prepare(q, k, v, is_causal, key_padding_mask)
        if self.training and self.dropout > 0:
            plan = DilatedPlan.from_flat(q.shape[2], flat_plan)
            return _reference(q, k, v, plan, is_causal, scale, key_padding_mask, self.dropout)
        return _fast(q, k, v, flat_plan, is_causal, scale, key_padding_mask)
