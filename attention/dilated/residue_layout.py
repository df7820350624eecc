"""The block layout of a dilated plan in residue order, in O(active blocks).

``residue_layout(plan, seq_len, block_size, is_causal)`` is the block
reduction of the ``M > 0`` mask (docs/design.md section 2.1; with
``is_causal`` also ``key <= query`` on the ORIGINAL positions) after both
axes are put in residue order (``attention.residue``): block pair ``(i, j)``
of head ``h`` is active iff some query of index block ``i`` and some key of
block ``j`` are a pair some branch selects on ``h``. It never evaluates the
``n x n`` mask: a group (branch, head range, offset) selects in each segment
a set of residue classes, each one run of indices; the runs are cut at block
edges into pieces, and the block pairs are the pieces' products per segment,
kept where causality leaves a pair (a piece's positions grow with its
indices, so that is one comparison of its first key position with its last
query position). Heads with the same groups share the work.

``full`` marks blocks in which every pair attends: flex then skips their
mask_mod. A block is marked full when one product of whole-block pieces
covers it (and, causal, its last key is at most its first query): exact when
every block lies inside one run (``R`` divides every segment ``s = min(w,
n)``, the block divides ``s / R`` and ``n / R``), conservative otherwise (a
block covered only by the union of several products stays partial, which is
correct, only slower).

Cost: the pieces' products per segment and one sort of them per distinct
head signature, at the layout's period when it has one (``layout_period``:
``L = lcm(R, segments)`` divides n and ``L / R`` is a multiple of the block;
positions shifted by L keep their segments, classes and causality, so n's
layout is L's repeated along the diagonal: copies only). Kept per process (``functools.lru_cache``, ``LAYOUTS_KEPT``
entries), not in the pattern store: the layout is a function of a few dozen
ints, built in about the time reading its CSR from disk would take, and the
flex BlockMask built from it lives on a device in one process anyway
(figures: tools/results/residue.json).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor

from attention.checks import check_count
from attention.caches import register_cached_function
from attention.dilated.plan import DilatedPlan, check_plan
from attention.residue import residue_modulus

__all__ = ["ResidueLayout", "residue_layout", "layout_period", "LAYOUTS_KEPT"]

# Layouts kept per process: one per (plan, length, block, causal) a model
# runs; at 1M tokens one is about 25 MB (benchmark spec, 16 heads, block 128).
LAYOUTS_KEPT = 16


class ResidueLayout(NamedTuple):
    """CSR of the active blocks, rows back to back (head-major), each row ascending.

    ``kv_num_blocks``: int32 ``(heads, nb)``, ``nb = ceil(seq_len / block_size)``;
    ``kv_indices``: int32 ``(nnz,)``; ``full``: bool ``(nnz,)``, True where every
    pair of the block attends."""

    seq_len: int
    block_size: int
    is_causal: bool
    kv_num_blocks: Tensor
    kv_indices: Tensor
    full: Tensor


def _check_int(name: str, value: object, minimum: int) -> int:
    return check_count(name, value, minimum)


def residue_layout(
    plan: DilatedPlan, seq_len: int, block_size: int, is_causal: bool, *, transposed: bool = False
) -> ResidueLayout:
    """The block layout of ``plan`` at ``seq_len`` in residue order (module
    docstring), from this process's cache when it was built before (do not
    modify its tensors). ``transposed``: rows are key blocks and columns
    query blocks (flex's q-side arrays), the same as the layout unless causal."""
    check_plan(plan)
    _check_int("seq_len", seq_len, 1)
    _check_int("block_size", block_size, 1)
    if not isinstance(is_causal, bool):
        raise ValueError(f"is_causal must be True or False, got {is_causal!r}")
    if not isinstance(transposed, bool):
        raise ValueError(f"transposed must be True or False, got {transposed!r}")
    return _layout(plan, seq_len, block_size, is_causal, transposed and is_causal)


def _ceil_div(a: Tensor, b: int) -> Tensor:
    return -((-a) // b)


def _group_pairs(g, n: int, block: int, causal: bool, transposed: bool, modulus: int) -> tuple[Tensor, Tensor]:
    """(codes ``row_block * nb + column_block``, full flags) of one group's
    block pairs, rows the query blocks (``transposed``: the key blocks);
    repeats possible where two of its pieces share a block."""
    nb = -(-n // block)
    per_class, longer = divmod(n, modulus)
    classes = torch.arange(modulus)
    starts = classes * per_class + classes.clamp(max=longer)
    s = min(g.segment, n)
    seg = torch.arange(-(-n // s))[:, None]  # (T, 1) segments x (1, R) classes
    lo = _ceil_div(seg * s - classes, modulus)  # first step m of the class inside the segment
    hi = _ceil_div((seg * s + s).clamp(max=n) - classes, modulus)
    keep = ((classes - g.offset - seg * s) % g.rate == 0) & (hi > lo)
    run_seg = seg.expand_as(keep)[keep]
    run_class = classes.expand_as(keep)[keep]
    run_lo = (starts + lo)[keep]  # indices [run_lo, run_hi) of a selected run
    run_hi = (starts + hi)[keep]
    first = run_lo // block
    cuts = (run_hi - 1) // block - first + 1  # pieces of each run
    run = torch.repeat_interleave(torch.arange(run_lo.numel()), cuts)
    blk = first[run] + torch.arange(run.numel()) - torch.repeat_interleave(cuts.cumsum(0) - cuts, cuts)
    p_lo = torch.maximum(run_lo[run], blk * block)
    p_hi = torch.minimum(run_hi[run], blk * block + block)
    base = run_class[run] - modulus * starts[run_class[run]]
    first_pos, last_pos = base + modulus * p_lo, base + modulus * (p_hi - 1)
    whole = (p_lo == blk * block) & (p_hi == (blk * block + block).clamp(max=n))
    piece_seg = run_seg[run]
    # every piece of a segment with every piece of the same segment
    per_seg = torch.bincount(piece_seg, minlength=int(seg.shape[0]))
    size = per_seg[piece_seg]
    i = torch.repeat_interleave(torch.arange(piece_seg.numel()), size)
    seg_first = per_seg.cumsum(0) - per_seg
    j = seg_first[piece_seg[i]] + torch.arange(i.numel()) - torch.repeat_interleave(size.cumsum(0) - size, size)
    full = whole[i] & whole[j]
    if causal:  # piece i is the row's (query, or key when transposed), j the column's
        q, k = (j, i) if transposed else (i, j)
        live = first_pos[k] <= last_pos[q]
        full &= last_pos[k] <= first_pos[q]
        i, j, full = i[live], j[live], full[live]
    return blk[i] * nb + blk[j], full


def _period(plan: DilatedPlan, n: int, block: int, modulus: int) -> int:
    """A length L < n whose layout repeats along the diagonal to give n's,
    else 0. With L the lcm of the segments and R, n a multiple of L and
    L / R a multiple of the block, every block lies inside one class and the
    rows of class c, block-steps ``[k P, (k + 1) P)`` (P = L / (R block)) are
    the rows of the first P shifted by ``k P`` in every class: segments,
    selections and causality are all invariant under shifting positions by L."""
    period = math.lcm(modulus, *(g.segment for g in plan.groups))
    if period < n and n % period == 0 and (period // modulus) % block == 0:
        return period
    return 0


def layout_period(plan: DilatedPlan, seq_len: int, block_size: int) -> int:
    """The period ``L < seq_len`` along whose diagonal the layout repeats
    (``_period``), or 0 when it does not."""
    return _period(check_plan(plan), seq_len, block_size, residue_modulus(g.rate for g in plan.groups))


def _repeated(base: ResidueLayout, n: int, modulus: int) -> ResidueLayout:
    """The layout at ``n`` from the layout ``base`` at its period (``_period``):
    per (head, class), the class's rows of ``base`` repeated ``n / L`` times,
    their key blocks shifted along in every class."""
    heads, base_nb = base.kv_num_blocks.shape
    steps = base_nb // modulus  # block-steps of a class at the period
    copies = n // base.seq_len
    nb_steps = steps * copies  # block-steps of a class at n
    counts = base.kv_num_blocks.view(heads, modulus, 1, steps).expand(heads, modulus, copies, steps)
    shift = (torch.arange(copies, dtype=torch.int32) * steps)[:, None]
    cls, step = base.kv_indices // steps, base.kv_indices % steps
    moved = cls * nb_steps + step  # the key block at n, first copy
    ends = base.kv_num_blocks.view(heads * modulus, steps).sum(1).cumsum(0).tolist()
    indices = torch.empty(base.kv_indices.numel() * copies, dtype=torch.int32)
    full = torch.empty(indices.numel(), dtype=torch.bool)
    for start, stop in zip([0] + ends[:-1], ends):  # one (head, class) at a time, written in place
        rows = slice(start * copies, stop * copies)
        torch.add(moved[start:stop][None, :], shift, out=indices[rows].view(copies, stop - start))
        full[rows].view(copies, stop - start).copy_(base.full[start:stop][None, :].expand(copies, -1))
    return ResidueLayout(n, base.block_size, base.is_causal, counts.reshape(heads, -1).contiguous(), indices, full)


@register_cached_function
@functools.lru_cache(maxsize=LAYOUTS_KEPT)
def _layout(plan: DilatedPlan, n: int, block: int, causal: bool, transposed: bool) -> ResidueLayout:
    modulus = residue_modulus(g.rate for g in plan.groups)
    period = _period(plan, n, block, modulus)
    if period:
        return _repeated(_layout(plan, period, block, causal, transposed), n, modulus)
    nb = -(-n // block)
    heads = plan.num_heads
    signature = [tuple(i for i, g in enumerate(plan.groups) if g.head_start <= h < g.head_stop) for h in range(heads)]
    signatures = sorted(set(signature))
    pairs = {i: _group_pairs(g, n, block, causal, transposed, modulus) for i, g in enumerate(plan.groups)}
    keys = []
    for number, groups in enumerate(signatures):
        for i in groups:
            codes, full = pairs[i]
            keys.append(((number * nb * nb + codes) << 1) | (~full).long())
    key = torch.unique(torch.cat(keys)) if keys else torch.zeros(0, dtype=torch.long)
    code = key >> 1
    first = torch.ones_like(code, dtype=torch.bool)
    first[1:] = code[1:] != code[:-1]  # the full entry of a code sorts first
    code, full = code[first], (key[first] & 1) == 0
    row = code // nb  # signature * nb + query block
    counts = torch.bincount(row, minlength=len(signatures) * nb).view(len(signatures), nb)
    ends = counts.sum(1).cumsum(0)
    starts = ends - counts.sum(1)
    which = [signatures.index(sig) for sig in signature]
    take = [torch.arange(int(starts[w]), int(ends[w])) for w in which]
    take = torch.cat(take) if take else torch.zeros(0, dtype=torch.long)
    return ResidueLayout(
        n, block, causal, counts[which].to(torch.int32), (code[take] % nb).to(torch.int32), full[take]
    )
