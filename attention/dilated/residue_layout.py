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

``residue_layouts(plan, lengths, block_size, is_causal)`` builds the
layouts of many lengths at once (packed documents: every distinct document
length of a batch) in the same vectorized pass, the segments of every
length numbered one after the other; ``residue_layout`` is that pass at one
length. Both run in numpy on the host (single-threaded: hundreds of small
ops of a parallel torch pool stall on a loaded machine, docs/bench.md).

Cost: the pieces' products per segment and one sort of them (all head
signatures and lengths together), at the layout's period when it has one (``layout_period``:
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
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from attention.checks import check_count
from attention.caches import register_cached_function
from attention.dilated.plan import DilatedPlan, check_plan
from attention.residue import residue_modulus

__all__ = ["ResidueLayout", "residue_layout", "residue_layouts", "layout_period", "LAYOUTS_KEPT"]

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


def residue_layouts(plan: DilatedPlan, lengths: Sequence[int], block_size: int,
                    is_causal: bool) -> tuple[Tensor, Tensor, Tensor, np.ndarray]:
    """The layouts of ``plan`` at every one of ``lengths`` at once (packed
    documents: one per distinct document length), stacked along the rows in
    ``attention.block_mask.stack_layouts``'s form: ``(kv_num_blocks [H, sum
    nb_u], kv_indices, full, first_row [U])``; layout ``u`` equals
    ``residue_layout(plan, lengths[u], block_size, is_causal)``. Built on the
    host in one pass of vectorized numpy over all lengths (no per-length
    torch ops: each small op of a parallel pool risks a stall of
    milliseconds on a loaded machine, docs/bench.md), not cached."""
    check_plan(plan)
    n = np.array([_check_int("lengths", value, 1) for value in lengths], dtype=np.int64)
    if n.size == 0:
        raise ValueError("lengths must hold at least one length, got none")
    _check_int("block_size", block_size, 1)
    if not isinstance(is_causal, bool):
        raise ValueError(f"is_causal must be True or False, got {is_causal!r}")
    counts, indices, full, first = _stacked(plan, n, block_size, is_causal, False)
    return torch.from_numpy(counts), torch.from_numpy(indices), torch.from_numpy(full), first


def _ceil_div(a: np.ndarray, b) -> np.ndarray:
    return -((-a) // b)


def _group_pairs(g, n: np.ndarray, block: int, causal: bool, transposed: bool,
                 modulus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(length ids ``u``, codes ``row_block * nb_u + column_block``, full
    flags) of one group's block pairs at each length ``n[u]``, rows the query
    blocks (``transposed``: the key blocks); repeats possible where two of
    its pieces share a block. Segments of every length are numbered one
    after the other; a run is a (segment, class) the group selects."""
    nb = _ceil_div(n, block)
    per_class, longer = np.divmod(n, modulus)
    classes = np.arange(modulus)
    starts = classes * per_class[:, None] + np.minimum(classes, longer[:, None])  # (U, R)
    s = np.minimum(g.segment, n)
    segments = _ceil_div(n, s)
    seg_length = np.repeat(np.arange(n.size), segments)  # each segment's length id
    seg_start = ((np.arange(seg_length.size) - np.repeat(np.cumsum(segments) - segments, segments))
                 * s[seg_length])[:, None]  # (S, 1) segments x (1, R) classes
    lo = _ceil_div(seg_start - classes, modulus)  # first step m of the class inside the segment
    hi = _ceil_div(np.minimum(seg_start + s[seg_length][:, None], n[seg_length][:, None]) - classes, modulus)
    keep = ((classes - g.offset - seg_start) % g.rate == 0) & (hi > lo)
    run_seg, run_class = np.nonzero(keep)  # segment-major: a segment's runs are adjacent
    run_length = seg_length[run_seg]
    run_lo = starts[run_length, run_class] + lo[run_seg, run_class]  # indices [run_lo, run_hi) of a run
    run_hi = starts[run_length, run_class] + hi[run_seg, run_class]
    first = run_lo // block
    cuts = (run_hi - 1) // block - first + 1  # pieces of each run
    run = np.repeat(np.arange(run_lo.size), cuts)
    blk = first[run] + np.arange(run.size) - np.repeat(np.cumsum(cuts) - cuts, cuts)
    p_lo = np.maximum(run_lo[run], blk * block)
    p_hi = np.minimum(run_hi[run], blk * block + block)
    piece_class, piece_length = run_class[run], run_length[run]
    base = piece_class - modulus * starts[piece_length, piece_class]
    first_pos, last_pos = base + modulus * p_lo, base + modulus * (p_hi - 1)
    whole = (p_lo == blk * block) & (p_hi == np.minimum(blk * block + block, n[piece_length]))
    piece_seg = run_seg[run]
    # every piece of a segment with every piece of the same segment
    per_seg = np.bincount(piece_seg, minlength=seg_length.size)
    size = per_seg[piece_seg]
    i = np.repeat(np.arange(piece_seg.size), size)
    seg_first = np.cumsum(per_seg) - per_seg
    j = seg_first[piece_seg[i]] + np.arange(i.size) - np.repeat(np.cumsum(size) - size, size)
    full = whole[i] & whole[j]
    if causal:  # piece i is the row's (query, or key when transposed), j the column's
        q, k = (j, i) if transposed else (i, j)
        live = first_pos[k] <= last_pos[q]
        full &= last_pos[k] <= first_pos[q]
        i, j, full = i[live], j[live], full[live]
    u = piece_length[i]
    return u, blk[i] * nb[u] + blk[j], full


def _stacked(plan: DilatedPlan, n: np.ndarray, block: int, causal: bool,
             transposed: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``residue_layouts``'s arrays (int32 counts and indices, bool full,
    int64 first rows), without checks. Heads with the same groups (a
    signature) share the work: the pairs of each (length, signature, row)
    are sorted and deduplicated by one ``np.unique`` of their codes, the
    full entry of a repeated pair kept."""
    modulus = residue_modulus(g.rate for g in plan.groups)
    nb = _ceil_div(n, block)
    heads = plan.num_heads
    signature = [tuple(i for i, g in enumerate(plan.groups) if g.head_start <= h < g.head_stop) for h in range(heads)]
    signatures = sorted(set(signature))
    area = len(signatures) * nb * nb  # codes of each length: (signature, row, column)
    code_base = np.cumsum(area) - area
    pairs = {i: _group_pairs(g, n, block, causal, transposed, modulus) for i, g in enumerate(plan.groups)}
    keys = []
    for number, groups in enumerate(signatures):
        for i in groups:
            u, codes, full = pairs[i]
            keys.append(((code_base[u] + number * nb[u] * nb[u] + codes) << 1) | ~full)
    key = np.unique(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.int64)
    code = key >> 1
    first = np.ones(code.size, dtype=bool)
    first[1:] = code[1:] != code[:-1]  # the full entry of a code sorts first
    code, full = code[first], (key[first] & 1) == 0
    u = np.searchsorted(code_base, code, side="right") - 1
    local = code - code_base[u]
    row_base = np.cumsum(len(signatures) * nb) - len(signatures) * nb
    counts = np.bincount(row_base[u] + local // nb[u], minlength=int(row_base[-1] + len(signatures) * nb[-1]))
    offsets = np.cumsum(counts) - counts
    # head h's rows of every length (its signature's), then head h + 1's
    which = np.array([signatures.index(sig) for sig in signature], dtype=np.int64)
    first_row = np.cumsum(nb) - nb
    row_length = np.repeat(np.arange(n.size), nb)
    source = (row_base[row_length] + np.arange(int(nb.sum())) - first_row[row_length])[None] \
        + which[:, None] * nb[row_length][None]  # (H, sum nb)
    out_counts = counts[source]
    flat = out_counts.ravel()
    out_row = np.repeat(np.arange(flat.size), flat)
    entry = offsets[source.ravel()][out_row] + np.arange(out_row.size) - np.repeat(np.cumsum(flat) - flat, flat)
    return (out_counts.astype(np.int32), (local % nb[u])[entry].astype(np.int32), full[entry], first_row)


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
    counts, indices, full, _ = _stacked(plan, np.array([n], dtype=np.int64), block, causal, transposed)
    return ResidueLayout(n, block, causal, torch.from_numpy(counts), torch.from_numpy(indices), torch.from_numpy(full))
