"""LongNet dilated attention (DESIGN.md section 2): functional core and modules.

Layout, everywhere in this file: ``q, k, v`` and outputs are
``(batch, seq, heads, head_dim)``; log-sum-exps are ``(batch, seq, heads)``;
``key_padding_mask`` is ``(batch, seq)`` bool, True = padding. Kernels take
SDPA's ``(B, heads, M, head_dim)``, reached by ``.transpose`` of views.

The math in two lines. Branch i attends inside segments of ``min(w_i, n)``
positions, each head group to every ``r_i``-th position from its offset, giving
``O_i`` and ``lse_i`` (0 and -inf where it selects nothing); the result is
``O = sum_i exp(lse_i - L) O_i`` with ``L = logsumexp_i lse_i``: one softmax per
row over all the keys any branch gives it, a key counted once per branch.

A plan (``DilatedPlan``) is the ``groups`` table of a store pattern as Python
ints: one row per (branch, head group). Each row's selected positions are a
strided view of the sequence, ``x[:, :T*s].unflatten(1, (T, s))[:, :, o::r]``
for the full segments and ``x[:, T*s + o :: r]`` for the tail, so no gather
and no index tensor is needed; the plan's ``positions`` array lists exactly
those positions (tests hold the two together).

Two implementations of the same function:
- ``dilated_attention_reference``: plain and autograd-native; per branch a
  zero-filled full-size output, softmax attention per group, one softmax over
  branches at the end. The one to read.
- ``dilated_attention``: the fast path. One custom op (opaque to
  ``torch.compile``) runs SDPA's fused CPU flash kernel, which returns the
  log-sum-exp, chunk by chunk on strided views and merges each chunk into one
  output in place; its backward runs the flash backward kernel per chunk with
  the final merged output and log-sum-exp, which is exactly the gradient of
  the combined softmax, branch weights included. Other devices and dtypes
  take a matmul kernel with the same contract.
"""

from __future__ import annotations

import math
import operator
from typing import Iterator, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from patternstore.pattern import GROUP_COLUMNS, Pattern
from patternstore.specs import DilatedSpec, SCHEMES, check_branches, check_choice
from patternstore.store import PatternStore, default_store

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
# The fast path's log-sum-exp for "no key": finite, so the merge needs no NaN
# guards (logaddexp(E, E) rounds to E, and a branch with lse E gets weight 0
# beside any real one), and exp(S - E) is still 0 for the masked (-inf) scores
# of such rows in the backward.
_EMPTY = -1e30


# ---------------------------------------------------------------------- plan
class Group(NamedTuple):
    """One row of a plan's ``groups`` table (``patternstore.pattern.GROUP_COLUMNS``)."""

    branch: int
    segment: int       # s = min(w_i, seq_len)
    rate: int          # r_i
    offset: int        # o: first selected position inside each segment
    head_start: int    # heads [head_start, head_stop)
    head_stop: int
    num_segments: int  # T = seq_len // s full segments
    per_segment: int   # positions selected per full segment: ceil((s - o) / r)
    tail: int          # positions selected in the shorter last segment
    start: int         # where the group's positions begin in the pattern's ``positions``


assert Group._fields == GROUP_COLUMNS


class DilatedPlan(NamedTuple):
    """What a kernel needs of a dilated pattern, as plain ints."""

    seq_len: int
    num_heads: int
    groups: tuple[Group, ...]

    @classmethod
    def from_pattern(cls, pattern: Pattern) -> "DilatedPlan":
        spec = pattern.spec
        if not isinstance(spec, DilatedSpec):
            raise ValueError(f"a dilated plan needs a DilatedSpec pattern, got {spec.kind!r}")
        rows = pattern["groups"].tolist()
        return cls(spec.seq_len, spec.num_heads, tuple(Group(*row) for row in rows))


def _part(x: Tensor, g: Group, tail: bool) -> Tensor:
    """The positions of ``x`` (b, n, ...) that group ``g`` selects, as a view:
    full segments -> (b, T, per_segment, ...), the tail -> (b, 1, tail, ...)."""
    s, r, o, t = g.segment, g.rate, g.offset, g.num_segments
    if tail:
        return x[:, t * s + o :: r].unsqueeze(1)
    return x[:, : t * s].unflatten(1, (t, s))[:, :, o::r]


def _parts(g: Group) -> tuple[bool, ...]:
    """Which of (full segments, tail) the group selects anything in."""
    return tuple(tail for tail, count in ((False, g.num_segments), (True, g.tail)) if count > 0)


# -------------------------------------------------------------- validation
def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None) -> None:
    """ValueError naming the problem unless q, k, v are (batch, seq, heads,
    head_dim) floating tensors of one shape, dtype and device, nothing empty,
    and ``key_padding_mask`` is None or a (batch, seq) bool tensor there too."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, seq, heads, head_dim), got shape {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if not q.shape == k.shape == v.shape:
        raise ValueError(
            f"q, k and v must have the same shape (batch, seq, heads, head_dim); "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.numel() == 0:
        raise ValueError(f"q, k and v must not be empty, got shape {tuple(q.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise ValueError("key_padding_mask must be a bool tensor (True = padding)")
        if tuple(key_padding_mask.shape) != tuple(q.shape[:2]):
            raise ValueError(
                f"key_padding_mask must have shape (batch, seq) = {tuple(q.shape[:2])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q on {q.device}")


def _check_plan(plan: DilatedPlan, q: Tensor) -> None:
    if not isinstance(plan, DilatedPlan):
        raise ValueError(f"plan must be a DilatedPlan, got {type(plan).__name__}")
    if (plan.seq_len, plan.num_heads) != (q.shape[1], q.shape[2]):
        raise ValueError(
            f"plan is for seq_len={plan.seq_len}, num_heads={plan.num_heads}; "
            f"q has seq_len={q.shape[1]}, num_heads={q.shape[2]}"
        )


# ------------------------------------------------------------ shared math
def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Outputs and log-sum-exps are accumulated in float32 for half types."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _scores(q: Tensor, k: Tensor, scale: float, is_causal: bool, pad: Optional[Tensor]) -> Tensor:
    """Masked ``scale * q @ k^T`` for (..., M, d) inputs; ``pad`` (..., M) marks keys."""
    s = (q @ k.transpose(-1, -2)) * scale
    if is_causal:
        m = s.shape[-1]
        s = s.masked_fill(torch.ones(m, m, dtype=torch.bool, device=s.device).triu(1), _NEG_INF)
    if pad is not None:
        s = s.masked_fill(pad.unsqueeze(-2).unsqueeze(-2), _NEG_INF)
    return s


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


# ----------------------------------------------------- reference (plain)
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
    """DESIGN.md section 2 written out: per branch, a zero output and a -inf
    log-sum-exp of full size, filled group by group with softmax attention
    inside each segment; then one softmax over the branches' log-sum-exps
    weights their outputs. Differentiable by autograd. Dropout ``dropout_p``
    applies to the attention probabilities."""
    check_attention_inputs(q, k, v, key_padding_mask)
    _check_plan(plan, q)
    return _reference(q, k, v, plan, is_causal, _scale(softmax_scale, q), key_padding_mask, dropout_p)


# Score elements the reference materializes at once (64 Mi: 256 MiB in float32).
_REFERENCE_SCORES = 1 << 26


def _reference(q, k, v, plan, is_causal, scale, key_padding_mask, dropout_p) -> Tensor:
    dtype, acc = q.dtype, _accumulate_dtype(q.dtype)
    q, k, v = (x.to(acc) for x in (q, k, v))
    b, n, h, d = q.shape
    outs, lses = [], []
    for branch in sorted({g.branch for g in plan.groups}):
        out = q.new_zeros(b, n, h, d)
        lse = q.new_full((b, n, h), _NEG_INF)
        for g in plan.groups:
            if g.branch != branch:
                continue
            heads = slice(g.head_start, g.head_stop)
            for tail in _parts(g):
                # (b, T, hg, m, d): segments as batch, the m selected positions as the sequence
                qs, ks, vs = (_part(x, g, tail)[:, :, :, heads].transpose(2, 3) for x in (q, k, v))
                pad = None if key_padding_mask is None else _part(key_padding_mask, g, tail)
                # A few segments at a time: their (m x m) scores stay under _REFERENCE_SCORES.
                m = qs.shape[3]
                step = max(1, _REFERENCE_SCORES // (b * qs.shape[2] * m * m))
                for t in range(0, qs.shape[1], step):
                    seg = slice(t, t + step)
                    scores = _scores(qs[:, seg], ks[:, seg], scale, is_causal, None if pad is None else pad[:, seg])
                    p, seg_lse = _softmax_lse(scores)
                    if dropout_p > 0:
                        p = F.dropout(p, dropout_p)
                    _part(out, g, tail)[:, seg, :, heads] = (p @ vs[:, seg]).transpose(2, 3)
                    _part(lse, g, tail)[:, seg, :, heads] = seg_lse.transpose(2, 3)
        outs.append(out)
        lses.append(lse)
    weights, _ = _softmax_lse(torch.stack(lses, dim=-1))  # exp(lse_i - L): (b, n, h, branches)
    return sum(w.unsqueeze(-1) * o for w, o in zip(weights.unbind(-1), outs)).to(dtype)


def _scale(softmax_scale: Optional[float], q: Tensor) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)


# ------------------------------------------------------------ fast path
_FLASH_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

# A chunk's kernel output is at most 1/_CHUNK_FRACTION of the whole output (or
# one segment, or _MIN_CHUNK elements): with the in-place merge, forward peak
# memory above the inputs is the output, its log-sum-exp (1/head_dim of it)
# and one chunk's temporaries.
_CHUNK_FRACTION = 8
_MIN_CHUNK = 1 << 20


def _uses_flash(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _FLASH_DTYPES


def _dead_rows(pad: Tensor, is_causal: bool) -> Tensor:
    """True where a query has no unpadded key (the flash kernel reports lse 0
    there): (B, M) for causal (square) attention, else (B, 1), any query count."""
    if is_causal:
        return (~pad).cumsum(-1) == 0
    return pad.all(-1, keepdim=True)


def _additive_mask(pad: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    if pad is None:
        return None
    return torch.zeros(pad.shape, dtype=dtype, device=pad.device).masked_fill_(pad, _NEG_INF)[:, None, None, :]


def _kernel_forward(q, k, v, is_causal: bool, scale: float, pad: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Attention of (B, H, M, d) views -> (out (B, H, M, d), lse (B, H, M)); rows with no key: 0, _EMPTY."""
    if _uses_flash(q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=_additive_mask(pad, q.dtype), scale=scale
        )
        if pad is not None:
            lse = lse.masked_fill(_dead_rows(pad, is_causal).unsqueeze(1), _EMPTY)
        return out, lse
    acc = _accumulate_dtype(q.dtype)
    q, k, v = (x.to(acc) for x in (q, k, v))
    p, lse = _softmax_lse(_scores(q, k, scale, is_causal, pad))
    return p @ v, lse.clamp_min(_EMPTY)


def _kernel_backward(do, q, k, v, out, lse, is_causal: bool, scale: float, pad: Optional[Tensor]):
    """Gradients of (B, H, M, d) views given the FINAL output and log-sum-exp
    of these rows: P = exp(S - lse),
    dS = P * (dO @ v^T - rowsum(dO * out)). -> (dq, dk, dv)."""
    if _uses_flash(q):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, out, lse, 0.0, is_causal, attn_mask=_additive_mask(pad, q.dtype), scale=scale
        )
    acc = _accumulate_dtype(q.dtype)
    do, q, k, v, out = (x.to(acc) for x in (do, q, k, v, out))
    p = (_scores(q, k, scale, is_causal, pad) - lse.unsqueeze(-1)).exp()
    ds = p * (do @ v.transpose(-1, -2) - (do * out).sum(-1, keepdim=True))
    return ds @ k * scale, ds.transpose(-1, -2) @ q * scale, p.transpose(-1, -2) @ do


def _merge(out: Tensor, lse: Tensor, o: Tensor, l: Tensor) -> None:
    """Fold one branch's (o, l) into the running (out, lse), in place:
    out <- out * exp(lse - new) + o * exp(l - new), new = logaddexp(lse, l).
    The two weights sum to 1, so that is one lerp with weight
    exp(l - new) = sigmoid(l - lse): one pass over the output and three small
    ops (each parallel op costs a thread wake-up, which is what a short
    sequence's merge time is made of)."""
    weight = (l - lse).sigmoid_().unsqueeze(-1)
    torch.logaddexp(lse, l, out=lse)
    out.lerp_(o.to(out.dtype), weight)  # half-type kernels: accumulated in float32


def _chunks(x: Optional[Tensor], units: int, flat: bool) -> Iterator[Optional[Tensor]]:
    """Split a group part (b, T, m, ...) into views (B', m, ...) of at most
    ``units`` (batch, segment) pairs. ``flat``: batch and segment dims merge
    into one (b == 1, T == 1, or no unselected tail: n == T * s), so chunks
    may cross batch rows; otherwise each chunk stays in one batch row.
    Chunks of tensors allocated here are always views (written in place)."""
    if x is None:
        while True:
            yield None
    b, t = x.shape[:2]
    if flat:
        merged = x.flatten(0, 1)
        for i in range(0, b * t, units):
            yield merged[i : i + units]
    else:
        for row in range(b):
            for i in range(0, t, units):
                yield x[row, i : i + units]


def _chunk_layout(g: Group, tail: bool, q: Tensor) -> tuple[int, bool]:
    """(units per chunk, flat) for one part of a group; the same for every
    tensor of the call, so their chunks line up."""
    b, n, _, d = q.shape
    rows = g.tail if tail else g.per_segment
    unit = rows * (g.head_stop - g.head_start) * d
    units = max(1, max(q.numel() // _CHUNK_FRACTION, _MIN_CHUNK) // unit)
    flat = b == 1 or tail or n == g.num_segments * g.segment
    return units, flat


def _plan_groups(flat_plan: list[int]) -> list[Group]:
    width = len(GROUP_COLUMNS)
    return [Group(*flat_plan[i : i + width]) for i in range(0, len(flat_plan), width)]


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward_groups(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], groups: Sequence[Group],
    is_causal: bool, scale: float, out: Tensor, lse: Tensor,
) -> None:
    """Fold every group's attention into ``out`` (b, n, h, d) and ``lse``
    (b, n, h), in place, chunk by chunk (the forward of the fast path; the
    sequence-parallel module runs its chunk-local groups through it too)."""
    for g in groups:
        heads = slice(g.head_start, g.head_stop)
        for tail in _parts(g):
            units, flat = _chunk_layout(g, tail, q)
            views = [_part(x, g, tail)[:, :, :, heads] for x in (q, k, v, out, lse)]
            pad = None if key_padding_mask is None else _part(key_padding_mask, g, tail)
            for qc, kc, vc, oc, lc, pc in zip(*(_chunks(x, units, flat) for x in views), _chunks(pad, units, flat)):
                o, l = _kernel_forward(qc.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), is_causal, scale, pc)
                _merge(oc, lc, o.transpose(1, 2), l.transpose(1, 2))
                del o, l  # before the next chunk's kernel allocates its own


def backward_groups(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    key_padding_mask: Optional[Tensor], groups: Sequence[Group], is_causal: bool, scale: float,
    dq: Tensor, dk: Tensor, dv: Tensor,
) -> None:
    """Add every group's gradients into ``dq, dk, dv``, each kernel backward
    fed the FINAL ``out`` and ``lse`` at its rows."""
    for g in groups:
        heads = slice(g.head_start, g.head_stop)
        for tail in _parts(g):
            units, flat = _chunk_layout(g, tail, q)
            views = [_part(x, g, tail)[:, :, :, heads] for x in (grad_out, q, k, v, out, lse, dq, dk, dv)]
            pad = None if key_padding_mask is None else _part(key_padding_mask, g, tail)
            for *chunk, pc in zip(*(_chunks(x, units, flat) for x in views), _chunks(pad, units, flat)):
                doc, qc, kc, vc, oc, lc, dqc, dkc, dvc = chunk
                partial = _kernel_backward(
                    *(x.transpose(1, 2) for x in (doc, qc, kc, vc, oc, lc)), is_causal, scale, pc
                )
                for total, part in zip((dqc, dkc, dvc), partial):
                    total.add_(part.transpose(1, 2))
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
    """-> (out (b, n, h, d) in q's dtype, lse (b, n, h)); ``flat_plan``: the
    plan's group rows back to back."""
    b, n, h, d = q.shape
    out = torch.zeros(b, n, h, d, dtype=_accumulate_dtype(q.dtype), device=q.device)
    lse = torch.full((b, n, h), _EMPTY, dtype=_lse_dtype(q.dtype), device=q.device)
    forward_groups(q, k, v, key_padding_mask, _plan_groups(flat_plan), is_causal, scale, out, lse)
    return out.to(q.dtype), lse


@_dilated_forward_op.register_fake
def _(q, k, v, key_padding_mask, flat_plan, is_causal, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))


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
    ``lse`` at its rows, accumulated in place."""
    acc = _accumulate_dtype(q.dtype)
    grads = [torch.zeros(q.shape, dtype=acc, device=q.device) for _ in range(3)]
    backward_groups(grad_out, q, k, v, out, lse, key_padding_mask, _plan_groups(flat_plan), is_causal, scale, *grads)
    return tuple(grad.to(q.dtype) for grad in grads)


@_dilated_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, key_padding_mask, flat_plan, is_causal, scale):
    return tuple(torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, key_padding_mask, flat_plan, is_causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.flat_plan, ctx.is_causal, ctx.scale = flat_plan, is_causal, scale


def _backward(ctx, grad_out, grad_lse):
    # lse is an internal output: the modules return only ``out``.
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = _dilated_backward_op(
        grad_out, q, k, v, out, lse, key_padding_mask, ctx.flat_plan, ctx.is_causal, ctx.scale
    )
    return dq, dk, dv, None, None, None, None


_dilated_forward_op.register_autograd(_backward, setup_context=_setup_context)


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
    return _fast(q, k, v, plan, is_causal, _scale(softmax_scale, q), key_padding_mask)


def _fast(q, k, v, plan, is_causal, scale, key_padding_mask) -> Tensor:
    flat_plan = [value for g in plan.groups for value in g]
    out, _ = _dilated_forward_op(q, k, v, key_padding_mask, flat_plan, is_causal, scale)
    return out


# ------------------------------------------------------------------ modules
class _DilatedBase(nn.Module):
    """Configuration, validation and the plan lookup shared by both modules."""

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
        if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and softmax_scale > 0):
            raise ValueError(f"softmax_scale must be None or a number > 0, got {softmax_scale!r}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        if store is not None and not isinstance(store, PatternStore):
            raise ValueError(f"store must be a PatternStore or None, got {type(store).__name__}")
        self.softmax_scale = softmax_scale
        self.dropout = float(dropout)
        self.store = store
        self._plans: dict[tuple[int, int], DilatedPlan] = {}

    # Compile contract (DESIGN.md section 4). The lookup runs in eager Python
    # even inside torch.compile(fullgraph=True): dynamo calls a function marked
    # assume_constant_result at trace time and bakes its result (a few dozen
    # ints) into the graph, which is specialized to the sequence length anyway
    # (the ints shape every view). operator.index() on the sizes makes dynamo
    # specialize a length it has marked dynamic, so each new length compiles
    # once and repeated calls recompile nothing. No tensor reaches the graph
    # from the store: the kernels need only these ints (strided views), so
    # there are no graph constants, no device copies and no locks in the graph.
    # Alternatives measured: a custom op wrapping the lookup cannot hand out
    # ints that shape views, and a torch.compiler.disable'd lookup is a graph
    # break, which fullgraph refuses.
    @torch.compiler.assume_constant_result
    def _plan(self, seq_len: int, num_heads: int) -> DilatedPlan:
        """The plan for (seq_len, num_heads): from this module's dict, else the store."""
        plan = self._plans.get((seq_len, num_heads))
        if plan is None:
            spec = DilatedSpec(seq_len, self.segment_lengths, self.dilation_rates, num_heads, self.scheme)
            store = self.store if self.store is not None else default_store()
            plan = DilatedPlan.from_pattern(store.get(spec))
            self._plans[(seq_len, num_heads)] = plan
        return plan

    def _prepare(self, q, k, v, key_padding_mask) -> tuple[DilatedPlan, float]:
        check_attention_inputs(q, k, v, key_padding_mask)
        plan = self._plan(operator.index(q.shape[1]), operator.index(q.shape[2]))
        return plan, _scale(self.softmax_scale, q)

    def extra_repr(self) -> str:
        return (
            f"segment_lengths={self.segment_lengths}, dilation_rates={self.dilation_rates}, "
            f"scheme={self.scheme!r}, softmax_scale={self.softmax_scale}, dropout={self.dropout}"
        )


class DilatedAttention(_DilatedBase):
    """LongNet dilated attention, written to be read (``dilated_attention_reference``).

    ``forward(q, k, v, is_causal=False, key_padding_mask=None)``: q, k, v of
    shape (batch, seq, heads, head_dim), any seq length; returns the same shape.
    """

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False, key_padding_mask: Optional[Tensor] = None
    ) -> Tensor:
        plan, scale = self._prepare(q, k, v, key_padding_mask)
        dropout_p = self.dropout if self.training else 0.0
        return _reference(q, k, v, plan, is_causal, scale, key_padding_mask, dropout_p)


class ImprovedDilatedAttention(_DilatedBase):
    """The same function as ``DilatedAttention``, fast and memory-bounded
    (``dilated_attention``). With dropout in training it takes the reference
    path (the fused kernels here run without dropout)."""

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False, key_padding_mask: Optional[Tensor] = None
    ) -> Tensor:
        plan, scale = self._prepare(q, k, v, key_padding_mask)
        if self.training and self.dropout > 0:
            return _reference(q, k, v, plan, is_causal, scale, key_padding_mask, self.dropout)
        return _fast(q, k, v, plan, is_causal, scale, key_padding_mask)
