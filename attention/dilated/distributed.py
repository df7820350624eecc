"""Sequence-parallel LongNet dilated attention over torch.distributed
(docs/design.md section 6, LongNet section 3).

Each of the ``P`` ranks of the process group holds a contiguous chunk of
``c = n / P`` positions: ``q, k, v`` of shape (batch, c, heads, head_dim), rank
``p`` holding positions ``[p*c, (p+1)*c)``. The result on each rank is its
chunk of ``DilatedAttention`` on the whole sequence, outputs and gradients.

Per branch, with segment ``s = min(w, n)``:
- ``s`` divides ``c``: every segment lies inside one chunk. The branch runs
  locally, exactly as in one process, with no communication.
- ``s`` is a multiple of ``c`` (or the whole sequence): the segment spans the
  ``s / c`` ranks ``[t*s/c, (t+1)*s/c)``. For each head group, every rank
  dilates its own keys and values first (the rows ``o + r*m`` of the segment
  that fall in its chunk), and an autograd-aware all-gather inside the
  segment's process group brings in the others' dilated rows: a rank receives
  about ``2 * (s / r) * batch * heads * head_dim`` elements for the branch,
  independent of the sequence length. Queries stay local. With a
  ``key_padding_mask``, the same rows of the mask are gathered beside them
  (one byte per row and batch).
- Any other ``s`` raises a ``ValueError`` (segments would straddle chunks
  unevenly).

All branches' outputs merge locally by log-sum-exp, in place, as in
``dilated_attention``; the backward pass feeds every kernel the final merged
output and log-sum-exp (which is the exact gradient of the combined softmax)
and reduce-scatters the gathered keys' and values' gradients back to their
ranks.

Waiting: one ``timeout`` per module bounds every collective it joins and the
creation of their groups (``collectives``). Transforms: ``torch.func.grad``
and ``vjp`` (the autograd Function has ``setup_context``); ``vmap`` is refused
by torch (no vmap rule: a batched collective would need every rank to vmap
alike).
"""

from __future__ import annotations

import weakref
from datetime import timedelta
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from attention.dilated.collectives import TimedGroup, agree_on_shapes, all_gather, reduce_scatter, require_initialized, timed_group
from attention.dilated.module import DilatedAttention
from attention.dilated.fast import backward_groups, forward_groups
from attention.dilated.plan import DilatedPlan
from patternstore.dilated_groups import Group
from attention.kernels.softmax_parts import accumulate_dtype, merge_
from attention.kernels.attend import attend, attend_backward
from attention.checks import check_attention_inputs, check_is_causal, default_scale

__all__ = ["DistributedDilatedAttention"]

_DTYPE_CODES = {torch.float64: 0, torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}


class LongGroup(NamedTuple):
    """A head group of a branch whose segment spans several ranks, seen from one rank."""

    heads: slice
    rate: int
    first: int                    # first selected row of this rank's chunk (chunk-local)
    counts: tuple[int, ...]       # selected rows on each rank of the segment, rank order
    index: int                    # this rank's position among the segment's ranks
    ranks: tuple[int, ...]        # global ranks of the segment
    padded: int                   # rows each rank sends: ceil(c / r)

    @property
    def rows(self) -> tuple[slice, slice, slice]:
        """Index of this rank's selected rows and heads in a (b, c, h, ...) chunk."""
        return (slice(None), slice(self.first, None, self.rate), self.heads)

    def received_rows(self, device: torch.device) -> Tensor:
        """Where the real rows sit in the padded all-gather buffer, in rank order."""
        return torch.cat([torch.arange(n) + i * self.padded for i, n in enumerate(self.counts)]).to(device)


class DistributedPlan(NamedTuple):
    local: tuple[Group, ...]      # groups that run inside the chunk, in chunk coordinates
    long: tuple[LongGroup, ...]


def distributed_plan(plan: DilatedPlan, chunk: int, rank: int, global_ranks: tuple[int, ...]) -> DistributedPlan:
    """Split the whole-sequence ``plan`` into what rank ``rank`` (of
    ``len(global_ranks)``) runs locally and what it gathers."""
    local, long = [], []
    seq_len = chunk * len(global_ranks)
    for g in plan.groups:
        s = min(g.segment, seq_len)
        if chunk % s == 0:
            local.append(g._replace(segment=s))  # the chunk's segments are the sequence's
        elif s % chunk == 0:
            per = s // chunk
            first_rank = rank // per * per
            ranks = range(first_rank, min(first_rank + per, len(global_ranks)))
            counts = tuple(_selected_rows(chunk, (p - first_rank) * chunk, g.offset, g.rate) for p in ranks)
            long.append(LongGroup(
                heads=slice(g.head_start, g.head_stop), rate=g.rate,
                first=(g.offset - (rank - first_rank) * chunk) % g.rate,
                counts=counts, index=rank - first_rank,
                ranks=tuple(global_ranks[p] for p in ranks), padded=-(-chunk // g.rate),
            ))
        else:
            raise ValueError(
                f"segment length {s} (branch {g.branch}) must divide the chunk length {chunk} "
                f"or be a multiple of it (sequence {seq_len} over {len(global_ranks)} ranks)"
            )
    return DistributedPlan(tuple(local), tuple(long))


def _selected_rows(chunk: int, start: int, offset: int, rate: int) -> int:
    """Rows ``start + i`` (0 <= i < chunk) with ``(start + i - offset) % rate == 0``, ``>= offset``."""
    first = (offset - start) % rate
    return max(0, -(-(chunk - first) // rate))


class _SequenceParallel(torch.autograd.Function):
    """The module's forward and backward with ``setup_context``, so
    ``torch.func`` (``grad``, ``vjp``) takes it. Outputs: ``(out, lse, the
    gathered keys and values of each long group, then its gathered key
    padding if any)``; all but ``out`` are non-differentiable, returned only
    to be saved (setup_context sees inputs and outputs, nothing else)."""

    @staticmethod
    def forward(q, k, v, pad: Optional[Tensor], dplan: DistributedPlan, groups: tuple, is_causal: bool,  # type: ignore[override]
                scale: float, stats: dict):
        out, lse = forward_groups(q, k, v, pad, dplan.local, is_causal, scale)
        saved = []
        for lg, group in zip(dplan.long, groups):
            keys, values = _gather_segment(k, v, lg, group, stats)
            key_pad = None if pad is None else _gather_padding(pad, lg, group, stats)
            saved += [keys, values] + ([] if key_pad is None else [key_pad])
            queries = q[lg.rows].transpose(1, 2)
            for key_rows, causal in _key_ranges(lg, is_causal):
                o, l = attend(queries, keys[:, :, key_rows], values[:, :, key_rows], causal=causal, scale=scale,
                              key_mask=None if key_pad is None else key_pad[:, key_rows])
                merge_(out[lg.rows], lse[lg.rows], o.transpose(1, 2), l.transpose(1, 2))
        return (out.to(q.dtype), lse, *saved)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, v, pad, dplan, groups, is_causal, scale, _ = inputs
        out, lse, *saved = output
        ctx.mark_non_differentiable(lse, *saved)
        ctx.save_for_backward(q, k, v, out, lse, pad, *saved)
        ctx.dplan, ctx.groups, ctx.is_causal, ctx.scale = dplan, groups, is_causal, scale

    @staticmethod
    def backward(ctx, grad_out, *unused):  # type: ignore[override]
        q, k, v, out, lse, pad, *saved = ctx.saved_tensors
        dplan, is_causal, scale = ctx.dplan, ctx.is_causal, ctx.scale
        acc = accumulate_dtype(q.dtype)
        grads = [torch.zeros(q.shape, dtype=acc, device=q.device) for _ in range(3)]
        backward_groups(grad_out, q, k, v, out, lse, pad, dplan.local, is_causal, scale, *grads)
        dq, dk, dv = grads
        per_group = 2 if pad is None else 3
        for i, (lg, group) in enumerate(zip(dplan.long, ctx.groups)):
            keys, values, *key_pads = saved[per_group * i : per_group * (i + 1)]
            key_pad = key_pads[0] if key_pads else None
            rows = lg.rows
            queries = q[rows].transpose(1, 2)
            dkeys, dvalues = torch.zeros_like(keys, dtype=acc), torch.zeros_like(values, dtype=acc)
            for key_rows, causal in _key_ranges(lg, is_causal):
                gq, gk, gv = attend_backward(
                    grad_out[rows].transpose(1, 2), queries, keys[:, :, key_rows], values[:, :, key_rows],
                    out[rows].transpose(1, 2), lse[rows].transpose(1, 2), causal=causal, scale=scale,
                    key_mask=None if key_pad is None else key_pad[:, key_rows],
                )
                dq[rows] += gq.transpose(1, 2)
                dkeys[:, :, key_rows] += gk
                dvalues[:, :, key_rows] += gv
            mine_k, mine_v = _scatter_segment(dkeys, dvalues, lg, group)
            dk[rows] += mine_k
            dv[rows] += mine_v
        return tuple(g.to(q.dtype) for g in grads) + (None,) * 6


def _key_ranges(lg: LongGroup, is_causal: bool) -> list[tuple[slice, bool]]:
    """Which gathered keys this rank's queries see, and whether causally.
    Gathered rows are in position order, this rank's own rows at
    ``[before, before + mine)``: with ``is_causal`` the earlier ranks' rows are
    all visible, its own rows causally, later ranks' rows not at all."""
    before, mine = sum(lg.counts[: lg.index]), lg.counts[lg.index]
    if not is_causal:
        return [(slice(None), False)]
    ranges = [(slice(before, before + mine), True)] if mine else []
    return ([(slice(0, before), False)] if before else []) + ranges


def _gather_segment(k: Tensor, v: Tensor, lg: LongGroup, group, stats: dict) -> tuple[Tensor, Tensor]:
    """The dilated keys and values of the whole segment: (b, heads, M, d) each,
    rows in position order (``M = sum(lg.counts)``)."""
    b, _, _, d = k.shape
    hg = lg.heads.stop - lg.heads.start
    send = k.new_zeros(lg.padded, 2, b, hg, d)
    mine = lg.counts[lg.index]
    send[:mine, 0] = k[lg.rows].transpose(0, 1)
    send[:mine, 1] = v[lg.rows].transpose(0, 1)
    received = send.new_empty(len(lg.ranks) * lg.padded, 2, b, hg, d)
    all_gather(received, send, group)
    stats["bytes_received"] += (len(lg.ranks) - 1) * send.numel() * send.element_size()
    both = received.index_select(0, lg.received_rows(k.device)).permute(1, 2, 3, 0, 4)  # (2, b, hg, M, d)
    return both[0], both[1]


def _gather_padding(pad: Tensor, lg: LongGroup, group, stats: dict) -> Tensor:
    """The key padding of the segment's dilated rows: (b, M) bool, rows in
    position order, as ``_gather_segment`` orders the keys."""
    send = pad.new_zeros(lg.padded, pad.shape[0], dtype=torch.uint8)  # bool is not a gloo type
    mine = lg.counts[lg.index]
    send[:mine] = pad[:, lg.first :: lg.rate].t()
    received = send.new_empty(len(lg.ranks) * lg.padded, pad.shape[0])
    all_gather(received, send, group)
    stats["bytes_received"] += (len(lg.ranks) - 1) * send.numel()
    return received.index_select(0, lg.received_rows(pad.device)).t().bool()


def _scatter_segment(dkeys: Tensor, dvalues: Tensor, lg: LongGroup, group) -> tuple[Tensor, Tensor]:
    """Reduce-scatter the gathered rows' gradients back to their ranks: this
    rank's (b, mine, heads, d) gradients of k and v."""
    b, hg, _, d = dkeys.shape
    full = dkeys.new_zeros(len(lg.ranks) * lg.padded, 2, b, hg, d)
    full.index_copy_(0, lg.received_rows(dkeys.device), torch.stack([dkeys, dvalues]).permute(3, 0, 1, 2, 4))
    mine = reduce_scatter(full, group)
    count = lg.counts[lg.index]
    return mine[:count, 0].transpose(0, 1), mine[:count, 1].transpose(0, 1)


class DistributedDilatedAttention(DilatedAttention):
    """``DilatedAttention`` over a sequence split across the ranks of
    ``process_group`` (default: the whole world), on the fast kernels.

    ``forward(q, k, v, is_causal=False, key_padding_mask=None)``: this rank's
    contiguous chunk (batch, seq_len // world_size, heads, head_dim) -> this
    rank's chunk of the output; ``key_padding_mask`` is this rank's chunk
    (batch, seq_len // world_size) of the (batch, seq_len) bool mask, True =
    padding, as in ``DilatedAttention``. Every rank must call it with chunks
    of one shape, and pass a mask or not; a mismatch raises the same
    ``ValueError`` on every rank, and an invalid input on one rank raises its
    own ``ValueError`` there and one naming that rank on the others.
    ``cu_seqlens`` (packed documents) is refused with a ``ValueError``
    before any collective.

    ``timeout`` bounds everything the module waits on: the shape agreement,
    the all-gathers and reduce-scatters, and the creation of their groups
    all run in groups made with it. A rank that never calls makes the others
    raise ``collectives.CollectiveError`` after about ``timeout``, naming the
    collective and the group. ``bytes_received`` counts the bytes this rank
    received from all-gathers since construction.
    """

    def __init__(
        self,
        segment_lengths,
        dilation_rates,
        *,
        process_group: Optional[dist.ProcessGroup] = None,
        scheme: str = "longnet",
        softmax_scale: Optional[float] = None,
        dropout: float = 0.0,
        store=None,
        timeout: timedelta = timedelta(minutes=5),
    ) -> None:
        super().__init__(segment_lengths, dilation_rates, implementation="fast", scheme=scheme,
                         softmax_scale=softmax_scale, dropout=dropout, store=store)
        if dropout:
            raise ValueError("dropout must be 0.0 for DistributedDilatedAttention (the fused kernels run without it)")
        if not isinstance(timeout, timedelta) or timeout <= timedelta(0):
            raise ValueError(f"timeout must be a positive datetime.timedelta, got {timeout!r}")
        self.process_group = process_group
        self.timeout = timeout
        self._stats = {"bytes_received": 0}
        # process group -> {"agree": its timed copy, (chunk, heads): (plan,
        # segment groups)}; weakly keyed, so a destroyed group's subgroups are
        # not kept (or reused).
        self._distributed_plans: weakref.WeakKeyDictionary[dist.ProcessGroup, dict] = weakref.WeakKeyDictionary()

    def __getstate__(self) -> dict:
        # The per-group plans hold this process's process groups (weakly):
        # a copy or an unpickled module rebuilds them at its first call.
        state = super().__getstate__()
        del state["_distributed_plans"]
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._distributed_plans = weakref.WeakKeyDictionary()

    @property
    def bytes_received(self) -> int:
        return self._stats["bytes_received"]

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False, key_padding_mask: Optional[Tensor] = None,
        *, cu_seqlens: Optional[Tensor] = None,
    ) -> Tensor:
        if cu_seqlens is not None:
            # Refused before any collective: the segment plan and its groups
            # are per sequence, and attending across documents is never an option.
            raise ValueError(
                "cu_seqlens is not supported by DistributedDilatedAttention (packed documents under sequence "
                "parallelism, where documents may cross rank boundaries, are not implemented); run "
                "DilatedAttention(cu_seqlens=...) on one rank, or give each rank whole unpacked sequences"
            )
        group = require_initialized(self.process_group)
        # Every rank reaches the agreement below, valid inputs or not, so a bad
        # input on one rank is an error on all of them, never a wait for a
        # collective the bad rank will not join.
        try:
            check_attention_inputs(q, k, v, key_padding_mask)
            check_is_causal(is_causal)
            if q.shape != k.shape or q.shape != v.shape:
                raise ValueError(
                    f"DistributedDilatedAttention needs q, k and v of one shape (each rank's chunk of one "
                    f"sequence, all heads); got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
                )
            local_error = None
        except ValueError as error:
            local_error = error
        nccl = dist.get_backend(group) == "nccl"
        if local_error is None:
            b, c, h, d = q.shape
            description = [b, c, h, d, _DTYPE_CODES.get(q.dtype, -1), int(bool(is_causal)),
                           int(key_padding_mask is not None), 0]
            device = q.device if nccl else torch.device("cpu")
        else:
            description = [-1] * 7 + [1]
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        try:
            agree_on_shapes(description, self._agreement_group(group), device,
                            "chunks of one shape (batch, seq_len // world_size, heads, head_dim), one dtype, "
                            "one is_causal and a key_padding_mask on all or none (batch, chunk, heads, "
                            "head_dim, dtype, causal, masked, invalid; a rank with invalid inputs shows "
                            "-1s and raises its own error)")
        except ValueError:
            if local_error is not None:
                raise local_error from None
            raise
        if local_error is not None:  # every rank's inputs were invalid in the same way
            raise local_error
        dplan, groups = self._distributed_plan(c, h, group)
        out, *_ = _SequenceParallel.apply(q, k, v, key_padding_mask, dplan, groups, bool(is_causal),
                                          default_scale(q, self.softmax_scale), self._stats)
        return out

    def _agreement_group(self, group: dist.ProcessGroup) -> TimedGroup:
        """``group``'s ranks in a group with this module's timeout."""
        plans = self._distributed_plans.setdefault(group, {})
        if "agree" not in plans:
            world = dist.get_world_size(group)
            plans["agree"] = timed_group(tuple(dist.get_global_rank(group, r) for r in range(world)), self.timeout)
        return plans["agree"]

    def _distributed_plan(self, chunk: int, heads: int, group) -> tuple[DistributedPlan, tuple[TimedGroup, ...]]:
        plans = self._distributed_plans.setdefault(group, {})
        cached = plans.get((chunk, heads))
        if cached is None:
            world, rank = dist.get_world_size(group), dist.get_rank(group)
            global_ranks = tuple(dist.get_global_rank(group, r) for r in range(world))
            dplan = distributed_plan(self.plan(heads), chunk, rank, global_ranks)
            groups = tuple(timed_group(lg.ranks, self.timeout) for lg in dplan.long)
            cached = plans[(chunk, heads)] = (dplan, groups)
        return cached
