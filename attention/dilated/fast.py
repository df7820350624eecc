"""The fast path of dilated attention: every (group, piece) of the plan
through ``kernels.attend`` on strided views, chunk by chunk, each result
merged into one output in place; the backward runs ``kernels.attend_backward``
on the same chunks, each fed the FINAL merged output and log-sum-exp, which
is exactly the gradient of the combined softmax, branch weights included.

Layout: ``q`` (b, q_len, h, d), ``k`` (b, kv_len, h_kv, d), ``v`` (b, kv_len,
h_kv, d_v) with the queries the last ``q_len`` positions; ``out`` (b, q_len,
h, d_v), ``lse`` (b, q_len, h). Kernels take (units, heads, rows, d), each
chunk ONE ``as_strided`` of its tensor (``_Rows.chunk``), so no gather and no
index tensor is made.

Memory: a chunk's kernel output is at most 1/``_CHUNK_FRACTION`` of the
whole output (or one unit, or ``_MIN_CHUNK`` elements): forward peak memory
above the inputs is the output, its log-sum-exp and one chunk's temporaries.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from attention.dilated.plan import Piece, head_runs, pieces
from patternstore.dilated_groups import Group
from attention.kernels.softmax_parts import EMPTY_LSE, lse_dtype, merge_
from attention.kernels.attend import attend, attend_backward, resolve_kernel

__all__ = ["forward_groups", "backward_groups"]

# Chunk bounds (module docstring, Memory).
_CHUNK_FRACTION = 8
_MIN_CHUNK = 1 << 20


class _Rows(NamedTuple):
    """Where a piece's rows of one tensor ``x`` (b, L, ...) lie in its
    storage: row ``m`` of segment ``c`` of batch row ``i`` starts at
    ``offset + i * batch + c * segment + m * row``; the units of a chunk lie
    ``unit`` apart (consecutive segments, or for a one-segment piece
    consecutive batch rows). A chunk of them in the
    kernels' layout is then ONE ``as_strided`` (``_Rows.chunk``) instead of
    the five to eight view ops of ``dilated_plan.view`` plus the transposes: on a GPU
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
        for piece in pieces(g, q_len, n):
            query_rows = [_Rows.of(x, piece, True) for x in query_side]
            key_rows = [_Rows.of(x, piece, False) for x in key_side]
            pad = None if key_padding_mask is None else _Rows.of(key_padding_mask, piece, False)
            every = query_rows + key_rows + ([] if pad is None else [pad])
            for heads, kv_heads in head_runs(g, group_size):
                for span in _spans(piece, heads.stop - heads.start, q, every):
                    yield (index, [x.chunk(span, piece.q_rows, heads) for x in query_rows],
                           [x.chunk(span, piece.k_rows, kv_heads) for x in key_rows],
                           None if pad is None else pad.chunk(span, piece.k_rows, None))


def forward_groups(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], groups: Sequence[Group],
    is_causal: bool, scale: float, backend: Optional[str] = None, softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    """Every group's attention folded into a new ``out`` (b, q_len, h, d_v) in
    q's dtype (the rule above ``kernels.accumulate_dtype``) and ``lse`` (b,
    q_len, h), chunk by chunk (the forward of the fast path; the
    sequence-parallel module runs its chunk-local groups through it too).
    Rows no group reaches are 0 with lse EMPTY_LSE. ``backend``: as
    ``kernels.attend``'s (default: q's device type; "cuda" on meta tensors
    runs the CUDA control flow)."""
    out = torch.zeros((*q.shape[:3], v.shape[-1]), dtype=q.dtype, device=q.device)
    lse = torch.full(q.shape[:3], EMPTY_LSE, dtype=lse_dtype(q.dtype), device=q.device)
    copied = _written_once(groups)
    backend = resolve_kernel(q, v, key_padding_mask, backward=False, backend=backend, softcap=softcap)  # once for every chunk
    for index, (qc, oc, lc), (kc, vc), pc in _chunk_views(groups, q, k, (q, out, lse), (k, v), key_padding_mask):
        o, l = attend(qc, kc, vc, causal=is_causal, scale=scale, key_mask=pc, backend=backend, softcap=softcap)
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
    dq: Tensor, dk: Tensor, dv: Tensor, backend: Optional[str] = None, softcap: Optional[float] = None,
) -> None:
    """Add every group's gradients into ``dq, dk, dv``, each kernel backward
    fed the FINAL ``out`` and ``lse`` at its rows (``backend`` as in
    ``forward_groups``)."""
    backend = resolve_kernel(q, v, key_padding_mask, backward=True, backend=backend, softcap=softcap)  # once for every chunk
    views = _chunk_views(groups, q, k, (grad_out, q, out, lse, dq), (k, v, dk, dv), key_padding_mask)
    for _, (doc, qc, oc, lc, dqc), (kc, vc, dkc, dvc), pc in views:
        partial = attend_backward(doc, qc, kc, vc, oc, lc, causal=is_causal, scale=scale, key_mask=pc,
                                  backend=backend, softcap=softcap)
        for total, part in zip((dqc, dkc, dvc), partial):
            total.add_(part)
        del partial, part
