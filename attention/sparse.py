"""Block-sparse attention over a stored CSR layout (docs/design.md section 2).

Layout of every tensor, stated once: ``q`` and the output are ``(batch,
q_len, heads, head_dim)``, ``k, v`` are ``(batch, kv_len, kv_heads,
head_dim)`` with ``kv_len >= q_len`` and ``heads % kv_heads == 0`` (grouped
query attention: query head ``j`` reads key/value head ``j // (heads /
kv_heads)``). The layout is ``kv_num_blocks`` int32 ``[H, nb]`` and
``kv_indices`` int32 ``[nnz]`` (``patternstore.csr``) over ``nb =
ceil(kv_len / block_size)`` query and key blocks, ``H = 1`` (one layout for
every head) or ``H = heads``.

Semantics: query row ``r`` sits at position ``p = kv_len - q_len + r``
(bottom-right aligned, docs/design.md section 7; ``q_len == kv_len`` is the
ordinary square case). It attends the set ``K(p)`` of key positions that lie
in the active key blocks of query block ``p // block_size``, are ``<
kv_len``, are ``<= p`` when ``causal``, and are not marked in
``key_padding_mask``, with ONE softmax over all of ``K(p)``::

    out_p = sum_{t in K(p)} exp(s_pt - lse_p) v_t,   s_pt = scale * q_p . k_t,
    lse_p = log sum_{t in K(p)} exp(s_pt).

So the rows of a short ``q`` equal, exactly, the same rows of the full
forward. A query with an empty ``K(p)`` outputs 0 and gets zero gradient.
Gradients are exact (FlashAttention-2's backward from the saved ``lse``).

Execution of the gather path (CPU tensors; decode, chunked prefill and
dropout on any device; the functional ``block_sparse_attention``).
Only the query blocks that hold a query row are visited. Rows (head, query
block) are grouped by their number ``c`` of active blocks; each group runs in
tiles of ``R`` rows by ``kc`` key blocks: query, key and value blocks are
gathered by position with ``index_select`` straight from the caller's
tensors (viewed as ``(batch, positions * heads, head_dim)``, never copied as
a whole), into buffers reused from tile to tile, so a decode step costs the
key blocks of its rows, not ``kv_len``. A tile is one attention call with
queries ``[batch * A, R, G * bs, d]`` against keys ``[batch * A, R, kc * bs,
d]``: with one shared layout ``A = kv_heads`` and the ``G = heads /
kv_heads`` query heads of a key/value head share its gathered keys (no key
is repeated for GQA); with a per-head layout ``A = G = 1`` and each row
gathers the key/value head of its own query head. Rows with more key blocks
than a tile holds (global rows) run as several key tiles merged by their
log-sum-exps, so no call gathers more than ``TILE_ELEMENTS`` key elements.
The backward runs the same tiles from the saved ``out`` and ``lse`` and
scatter-adds the gradients (``index_add_``).

The CPU path was chosen by measurement (tools/bench_sparse.py): the figures
are in the note above ``USE_CPU_FLASH_KERNEL``. Square CUDA calls take the
FlexAttention path instead (``BlockSparseAttention._flex_forward``: compiled
``flex_attention`` on a ``BlockMask`` kept per layout, length and device);
the rule is ``attention_path``, with its reasons in the note above it.

Compile contract (docs/design.md section 4): the data-dependent work lives
inside the custom operators ``patternstore::block_sparse_forward`` /
``_backward``, opaque to dynamo with fake implementations that give shapes;
the store lookup is the custom operator ``patternstore::sparse_layout``
whose string argument describes the layout completely (kind, block size,
seed, parameters, store directory), so a compiled or exported graph resolves
it in any process; the flex path's lookup is ``patternstore::sparse_block_mask``
(its BlockMask's arrays). No length is baked into a graph: ``dynamic=True``
compiles once for every length.

Pickling (issue 10): a module's state is its layout description and its
store's directory; lookups are rebuilt lazily in whatever process runs it.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from patternstore.blockmask import block_mask_of, layout_block_mask, structural_mask_mod, with_key_padding
from patternstore.csr import check_layout, drop_future_blocks, prefix_rows
from patternstore.specs import SparseSpec
from patternstore.store import PatternStore, store_for

from .kernels import (
    EMPTY_LSE,
    accumulate_dtype,
    check_attention_inputs,
    check_dropout,
    check_is_causal,
    check_softmax_scale,
    default_scale,
    merge_,
)

__all__ = ["block_sparse_attention", "BlockSparseAttention"]

# Key (and value) elements gathered per tile: 4 Mi = 16 MiB each in float32.
# The sweep of 1, 4 and 16 Mi (forward + backward, bigbird 16K) showed no
# difference larger than the machine's noise; 4 Mi bounds memory.
TILE_ELEMENTS = 1 << 22

# On the CPU, without dropout, each tile runs through ATen's fused CPU flash
# attention kernel (the one F.scaled_dot_product_attention dispatches to; the
# private op because it also returns the log-sum-exp that a merge and the
# backward need). Otherwise the same tiles run through matmuls (the
# "explicit" path). Tests run both.
#
# The CPU path, chosen by measurement (tools/bench_sparse.py, results/
# bench_sparse.json: float32, batch 1, 8 heads, head_dim 64, block 128,
# forward medians, candidates interleaved, 2 shared cores):
# - these tiles through the fused kernel vs through matmuls: 0.88x to 1.25x,
#   the fused kernel ahead in 5 of 8 cases (4K and 16K, four kinds);
# - vs compiled flex_attention on a create_block_mask mask, steady state:
#   flex 1.1x to 1.45x faster at 4K and 16K, ours 1.06x faster at 32K with
#   90% block sparsity (4.63 s vs 4.89 s); vs SDPA with the dense boolean
#   mask: 1.9x to 21.6x faster (7.3x at 32K, 90% sparse).
# flex is not the CPU default: on the CPU it has no backward, compiles once
# per (layout, length) (0.2 s to 2.6 s here), and past dynamo's recompile
# limit it falls back to dense math (a 32 GiB allocation at 32K in our first
# run). Users who want it for inference get the mask from patternstore.blockmask.
USE_CPU_FLASH_KERNEL = True

# Which path a call takes (issue 12 section 3), decided by ``attention_path``:
# - "flex": compiled ``flex_attention`` on a ``BlockMask`` built once per
#   (layout, length, device) from the stored CSR (patternstore.blockmask.
#   layout_block_mask), for device types in FLEX_DEVICE_TYPES, square calls
#   (q_len == kv_len), no dropout and blocks that are multiples of
#   FLEX_MIN_BLOCK (torch 2.13's CPU flex returns NaN for 8-token blocks; 16
#   is exact; the kernel's tiles, ``flex_tiles``, must divide the blocks). On CUDA it is the fused kernel that
#   skips empty blocks and takes GQA natively, with its own backward.
# - "gather": the tiles above, for everything else: CPU tensors (flex on the
#   CPU has no backward, refuses lse, and compiles per length; figures above),
#   decode and chunked prefill (q_len < kv_len: rows not aligned to blocks),
#   and dropout (flex has no dropout).
# Tests add "cpu" to FLEX_DEVICE_TYPES to run the flex path in CPU inference.
FLEX_DEVICE_TYPES: tuple[str, ...] = ("cuda",)
FLEX_MIN_BLOCK = 16


def attention_path(device_type: str, q_len: int, kv_len: int, dropout_p: float, block_size: int) -> str:
    """"flex" or "gather" (see the note above FLEX_DEVICE_TYPES)."""
    if device_type in FLEX_DEVICE_TYPES and q_len == kv_len and dropout_p == 0 and block_size % FLEX_MIN_BLOCK == 0:
        return "flex"
    return "gather"


# The largest Triton tile flex_attention picks by itself (BLOCK_M of the
# forward on an H100, torch 2.11).
FLEX_DEFAULT_TILE = 128


def flex_tiles(block_size: int) -> dict[str, int]:
    """``kernel_options`` of flex_attention whose tiles divide ``block_size``
    (a multiple of FLEX_MIN_BLOCK): none for blocks that are multiples of
    FLEX_DEFAULT_TILE, else every forward and backward tile set to the largest
    power of two dividing the block. Without them, compiled flex on an H100
    refused 64-token blocks ("Q and KV block size must be divisible by BLOCK_M
    and BLOCK_N", every 64-block CUDA test of the second device run)."""
    tile = block_size & -block_size  # the largest power of two dividing it
    if tile >= FLEX_DEFAULT_TILE:
        return {}
    return {name: tile for name in ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")}


_compiled_flex = None


def _flex_attention():
    """``flex_attention`` compiled once per process (it runs only compiled:
    eager flex materializes the scores). Inside a caller's compiled region
    dynamo traces through it."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, fullgraph=True)
    return _compiled_flex
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


# ----------------------------------------------------------------- the plan
def _row_groups(kv_num_blocks: Tensor, kv_indices: Tensor, causal: bool,
                first_block: int) -> list[tuple[Tensor, Tensor]]:
    """``(rows [R], keys [R, c])`` for every block count ``c > 0`` among the
    rows of query blocks ``>= first_block``: flat row ids ``h * nb + i`` and
    key block ids ``j`` (int64). With ``causal``, key blocks after the query
    block are dropped first."""
    if causal:
        kv_num_blocks, kv_indices = drop_future_blocks(kv_num_blocks, kv_indices)
    heads, nb = kv_num_blocks.shape
    counts = kv_num_blocks.flatten().long()
    offsets = torch.cumsum(counts, 0) - counts
    # The rows of query blocks >= first_block, head by head (no nonzero: one sync fewer on a GPU).
    live = (torch.arange(heads, device=counts.device)[:, None] * nb
            + torch.arange(first_block, nb, device=counts.device)).flatten()
    order = live[torch.argsort(counts[live], stable=True)]
    values, lengths = torch.unique_consecutive(counts[order], return_counts=True)
    values, lengths = torch.stack([values, lengths]).tolist()  # one device-to-host copy, not two
    groups = []
    for c, rows in zip(values, torch.split(order, lengths)):
        if c == 0:
            continue  # rows without key blocks: output 0, lse EMPTY_LSE
        slots = offsets[rows, None] + torch.arange(c, device=rows.device)
        groups.append((rows, kv_indices[slots].long()))
    return groups


class _TilePlan:
    """Everything one call needs: the gather indices of a tile (module
    docstring: queries ``[b * A, R, G * bs, d]``, keys ``[b * A, R, kc * bs,
    d]``), its mask, and buffers reused from tile to tile."""

    def __init__(self, q: Tensor, k: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
                 key_padding_mask: Optional[Tensor], block_size: int, causal: bool, dropout_p: float,
                 trusted_layout: bool) -> None:
        b, q_len, h, d = q.shape
        kv_len, kv_heads = k.shape[1], k.shape[2]
        self.b, self.q_len, self.h, self.kv_len, self.kv_heads = b, q_len, h, kv_len, kv_heads
        self.bs, self.causal = block_size, causal
        self.nb = nb = -(-kv_len // block_size)
        self.shared = kv_num_blocks.shape[0] == 1
        self.lanes = kv_heads if self.shared else 1                   # A
        self.per_lane = h // kv_heads if self.shared else 1          # G
        self.offset = kv_len - q_len                                  # position of query row 0
        self.work = accumulate_dtype(q.dtype)
        # A trusted causal layout holds no future block already (_LayoutSource.layout).
        self.groups = _row_groups(kv_num_blocks, kv_indices, causal and not trusted_layout,
                                  self.offset // block_size)
        self.fused = USE_CPU_FLASH_KERNEL and q.device.type == "cpu" and dropout_p == 0
        self._buffers: dict[str, Tensor] = {}
        device = q.device
        self.slot = torch.arange(block_size, device=device)
        self.future = self.slot[None, :] > self.slot[:, None]           # [bs, bs] key offset > query offset
        self.beyond = self.slot >= kv_len - (nb - 1) * block_size if kv_len % block_size else None
        # Filled on the device: torch.tensor(value, device=...) would copy from the host.
        self.minus_infinity = torch.full((), float("-inf"), dtype=self.work, device=device)
        self.zero = torch.zeros((), dtype=self.work, device=device)
        self.key_padding_mask = key_padding_mask
        self.heads_outer = _heads_outer(k)  # the flat order of keys and values (``_flat``)
        if self.shared:  # query head of lane a, slot r: a * G + r
            self.head_of_lane = torch.arange(h, device=device).view(self.lanes, 1, self.per_lane, 1)

    # -------------------------------------------------------- indices
    def query_index(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Flat indices into ``(b, q_len * h)`` of the tile's query slots,
        ``[A, R, G, bs]`` (clamped into range), and bool ``[A, R, G, bs]``:
        the slot is a real query row. Invalid slots (before the first query
        row, past kv_len) are computed and thrown away."""
        position = (rows % self.nb)[:, None] * self.bs + self.slot - self.offset   # query row, [R, bs]
        valid = (position >= 0) & (position < self.q_len)
        row = position.clamp(0, self.q_len - 1)
        if self.shared:
            flat = row[None, :, None, :] * self.h + self.head_of_lane
            valid = valid[None, :, None, :].expand(flat.shape)
        else:
            flat = (row * self.h + (rows // self.nb)[:, None])[None, :, None, :]
            valid = valid[None, :, None, :]
        return flat, valid

    def key_positions(self, keys: Tensor) -> Tensor:
        """``[R, kc * bs]`` key positions of key blocks ``keys [R, kc]``, clamped below kv_len."""
        return (keys[:, :, None] * self.bs + self.slot).flatten(1).clamp(max=self.kv_len - 1)

    def key_index(self, rows: Tensor, positions: Tensor) -> Tensor:
        """Flat indices into the keys as ``_flat(k, self.heads_outer)`` lays
        them out: ``[A, R, kc * bs]``."""
        if self.shared:
            heads = torch.arange(self.kv_heads, device=rows.device)[:, None, None]
            positions = positions[None]
        else:
            heads = (rows // self.nb // (self.h // self.kv_heads))[:, None]
        if self.heads_outer:
            index = heads * self.kv_len + positions
        else:
            index = positions * self.kv_heads + heads
        return index if self.shared else index[None]

    def unflat_keys(self, x: Tensor) -> Tensor:
        """A flat ``(b, kv_len * kv_heads, e)`` key gradient as ``(b, kv_len, kv_heads, e)``."""
        if self.heads_outer:
            return x.view(self.b, self.kv_heads, self.kv_len, -1).transpose(1, 2)
        return x.view(self.b, self.kv_len, self.kv_heads, -1)

    def gather(self, slot: str, x: Tensor, index: Tensor, rows: int) -> Tensor:
        """``x (b, N, e)`` at flat ``index [A, R, ...]`` as ``[b * A, R, M, e]``,
        converted to the work dtype, in a buffer reused from tile to tile (one
        per ``slot``): with ``out=`` the copy runs at memory speed, without it
        5-10x slower on this CPU (tools/bench_sparse.py)."""
        shape = (x.shape[0], index.numel(), x.shape[-1])
        numel = math.prod(shape)
        buffer = self._buffers.get(slot)
        if buffer is None or buffer.numel() < numel or buffer.dtype != x.dtype:
            buffer = self._buffers[slot] = x.new_empty(numel)
        picked = torch.index_select(x, 1, index.flatten(), out=buffer[:numel].view(shape))
        return picked.view(x.shape[0] * self.lanes, rows, -1, x.shape[-1]).to(self.work)

    # ----------------------------------------------------------- masks
    def mask(self, rows: Tensor, keys: Tensor, positions: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """The tile's additive mask, broadcastable to ``[b * A, R, G * bs, kc *
        bs]``: 0 where the key counts, -inf elsewhere; None when every key
        counts. Second: bool ``[b * A, R, G * bs]``, True for queries with no
        key in this tile (only a key_padding_mask empties a row)."""
        count, kc = keys.shape
        masked = None                                                        # [R, bs | 1, kc, bs]
        if self.causal:  # future blocks are dropped: only diagonal blocks cut keys
            diagonal = keys == (rows % self.nb)[:, None]
            masked = diagonal[:, None, :, None] & self.future[None, :, None, :]
        if self.beyond is not None:  # the end of the last block, past kv_len
            tail = (keys == self.nb - 1)[:, None, :, None] & self.beyond
            masked = tail if masked is None else masked | tail
        if masked is not None:
            masked = masked.flatten(2)                                        # [R, bs | 1, kc * bs]
            if masked.shape[1] > 1 and self.per_lane > 1:
                masked = masked.repeat(1, self.per_lane, 1)                   # [R, G * bs, kc * bs]
            masked = masked[None]
        empty = None
        if self.key_padding_mask is not None:
            ignored = self.key_padding_mask[:, positions]                     # [b, R, kc * bs]
            ignored = ignored[:, None, :, None, :].expand(self.b, self.lanes, count, 1, kc * self.bs)
            ignored = ignored.reshape(self.b * self.lanes, count, 1, kc * self.bs)
            masked = ignored if masked is None else masked | ignored
            empty = masked.all(-1)
            if empty.shape[-1] == 1:
                empty = empty.expand(-1, -1, self.per_lane * self.bs)
        if masked is None:
            return None, None
        return torch.where(masked, self.minus_infinity, self.zero), empty

    def tiles(self, head_dim: int) -> Iterator[tuple[Tensor, list[Tensor]]]:
        """``(rows [R], [keys [R, kc] for each key tile])``: at most
        TILE_ELEMENTS gathered key elements per tile, at least one row and
        one block."""
        per_block = self.b * self.lanes * self.bs * head_dim
        for rows, keys in self.groups:
            c = keys.shape[1]
            kc = min(c, max(1, TILE_ELEMENTS // per_block))
            step = max(1, TILE_ELEMENTS // (per_block * kc))
            for r0 in range(0, rows.numel(), step):
                chunk = keys[r0: r0 + step]
                yield rows[r0: r0 + step], [chunk[:, k0: k0 + kc] for k0 in range(0, c, kc)]


def _heads_outer(k: Tensor) -> bool:
    """Whether keys ``(b, n, heads, e)`` are stored heads-outer, as ``(b,
    heads, n, e)`` (transformers' projections and KV caches): then ``_flat``
    keeps heads outer, so gathers read them in place instead of copying the
    whole cache on every call."""
    b, n, h, e = k.shape
    if h == 1 or n == 1 or k.stride(-1) != 1:
        return False
    return k.stride(1) != h * k.stride(2) and k.stride(2) == n * k.stride(1)


def _flat(x: Tensor, heads_outer: bool = False) -> Tensor:
    """``(b, n, heads, e)`` -> ``(b, n * heads, e)`` (position-major) or, with
    ``heads_outer``, ``(b, heads * n, e)``: a view where the strides allow (the
    last dimension made contiguous first: kernels need it)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if heads_outer:
        x = x.transpose(1, 2)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _dropout_keep(like: Tensor, keys: int, p: float, seed: int, tile: int) -> Tensor:
    """The keep mask of one tile (queries ``like``, ``keys`` keys), scaled by
    1 / (1 - p): a pure function of (seed, tile), so the backward regenerates
    exactly the forward's mask."""
    generator = torch.Generator(device=like.device).manual_seed((seed + 7919 * tile) % (1 << 63))
    keep = torch.rand((*like.shape[:3], keys), generator=generator, device=like.device) >= p
    return keep.to(like.dtype).div_(1 - p)


def _has_nonfinite(keys: Tensor) -> bool:
    """Whether a masked tile must leave the fused kernel: it ADDS its mask to
    the scores, so a NaN or inf in a masked key (a future key of a causal
    diagonal block) would poison rows that never attend it; the explicit
    path fills masked scores instead, as SDPA's causal kernels do. One sum
    over the tile's keys (a NaN or inf makes it non-finite; an overflow to
    inf only sends a finite tile down the exact explicit path), 1/bs of the
    tile's attention work."""
    return not bool(torch.isfinite(keys.sum()))


def _tile_forward(qt, kt, vt, mask, scale: float, keep: Optional[Tensor], fused: bool) -> tuple[Tensor, Tensor]:
    """Attention of one tile: ``(out [B, R, M, d], lse [B, R, M])``."""
    if fused and not (mask is not None and _has_nonfinite(kt)):
        out, lse = _FLASH(qt, kt, vt, attn_mask=mask, scale=scale)[:2]
        return out, lse
    s = torch.matmul(qt, kt.transpose(-1, -2)).mul_(scale)
    if mask is not None:
        s = s.masked_fill(torch.isneginf(mask), float("-inf"))  # not an add: a NaN in a masked key stays out
    top = s.amax(-1, keepdim=True)
    shift = top.masked_fill(torch.isneginf(top), 0.0)
    p = s.sub_(shift).exp_()
    total = p.sum(-1, keepdim=True)
    if keep is not None:
        p.mul_(keep)
    out = torch.matmul(p, vt).div_(total.clamp_min(torch.finfo(total.dtype).tiny))
    lse = torch.where(total > 0, shift + total.log(), EMPTY_LSE).squeeze(-1)
    return out, lse


def _tile_backward(d_out, qt, kt, vt, out, lse, mask, scale: float, keep: Optional[Tensor],
                   fused: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one tile from the rows' final ``out`` and ``lse``
    (``EMPTY_LSE`` for empty rows: their masked scores give 0)."""
    if fused and not (mask is not None and _has_nonfinite(kt)):
        return _FLASH_BACKWARD(d_out, qt, kt, vt, out, lse, 0.0, False, attn_mask=mask, scale=scale)
    delta = (d_out * out).sum(-1)  # sum_t P_it dP_it = dO_i . O_i (with dropout, O is the dropped output)
    s = torch.matmul(qt, kt.transpose(-1, -2)).mul_(scale)
    if mask is not None:
        s = s.masked_fill(torch.isneginf(mask), float("-inf"))
    p = s.sub_(lse.unsqueeze(-1)).exp_()
    dp = torch.matmul(d_out, vt.transpose(-1, -2))
    if keep is not None:
        dv = torch.matmul((p * keep).transpose(-1, -2), d_out)
        dp.mul_(keep)
    else:
        dv = torch.matmul(p.transpose(-1, -2), d_out)
    ds = dp.sub_(delta.unsqueeze(-1)).mul_(p).mul_(scale)
    return torch.matmul(ds, kt), torch.matmul(ds.transpose(-1, -2), qt), dv


# ------------------------------------------------------ the custom operators
def sparse_forward(
    q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
    key_padding_mask: Optional[Tensor], dropout_seed: Optional[Tensor],
    block_size: int, causal: bool, scale: float, dropout_p: float, trusted_layout: bool,
) -> tuple[Tensor, Tensor]:
    """Returns ``out (b, q_len, h, d)`` and ``lse (b, h, q_len)`` (work dtype).
    ``trusted_layout``: the layout is a module's (``_LayoutSource.layout``):
    valid by construction (generated here, checksummed on disk) and, when
    causal, without future blocks; so neither ``check_layout`` nor
    ``drop_future_blocks`` runs, each of which costs device-to-host syncs on
    a GPU at every decode step. Otherwise (the functional API) both do."""
    if not trusted_layout:  # reads values: several device-to-host syncs on a GPU
        check_layout(kv_num_blocks, kv_indices, -(-k.shape[1] // block_size))
    plan = _TilePlan(q, k, kv_num_blocks, kv_indices, key_padding_mask, block_size, causal, dropout_p,
                     trusted_layout)
    q_flat, k_flat, v_flat = _flat(q), _flat(k, plan.heads_outer), _flat(v, plan.heads_outer)
    seed = int(dropout_seed) if dropout_p > 0 else 0
    tile = 0
    done: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []  # (index, valid, out, lse) of every row tile
    for rows, key_tiles in plan.tiles(q.shape[-1]):
        index, valid = plan.query_index(rows)
        qt = plan.gather("q", q_flat, index, rows.numel())
        acc = acc_lse = None
        for keys in key_tiles:
            positions = plan.key_positions(keys)
            key_index = plan.key_index(rows, positions)
            mask, empty = plan.mask(rows, keys, positions)
            keep = None
            if dropout_p > 0:
                keep = _dropout_keep(qt, positions.shape[1], dropout_p, seed, tile)
            o, l = _tile_forward(qt, plan.gather("k", k_flat, key_index, rows.numel()),
                                 plan.gather("v", v_flat, key_index, rows.numel()), mask, scale, keep, plan.fused)
            if empty is not None:
                l = l.masked_fill(empty, EMPTY_LSE)  # the fused kernel reports 0 for empty rows
            if acc is None:
                acc, acc_lse = o, l
            else:
                merge_(acc, acc_lse, o, l)
            tile += 1
        done.append((index, valid, acc, acc_lse))
    # Invalid query slots write to one extra row (position q_len), sliced off.
    b, q_len, h = plan.b, plan.q_len, plan.h
    out = q.new_zeros(b, (q_len + 1) * h, v.shape[-1], dtype=plan.work)
    lse = q.new_full((b, (q_len + 1) * h), EMPTY_LSE, dtype=plan.work)
    if done:
        # One scatter at the end rather than one per tile: on a shared machine
        # every small parallel op risks a stall of milliseconds.
        index = torch.cat([i.masked_fill(~ok, q_len * h).flatten() for i, ok, _, _ in done])
        out.index_copy_(1, index, torch.cat([o.reshape(b, -1, o.shape[-1]) for _, _, o, _ in done], 1))
        lse.index_copy_(1, index, torch.cat([l.reshape(b, -1) for _, _, _, l in done], 1))
    out = out.view(b, q_len + 1, h, -1)[:, :q_len].to(q.dtype)
    lse = lse.view(b, q_len + 1, h)[:, :q_len].transpose(1, 2)
    return out.contiguous(), lse.contiguous()


# The operator (opaque to dynamo); ``sparse_forward`` itself stays callable, so
# that tools/bench_host.py can count the ops one call dispatches.
_forward_op = torch.library.custom_op("patternstore::block_sparse_forward", mutates_args=())(sparse_forward)


@_forward_op.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, key_padding_mask, dropout_seed,
      block_size, causal, scale, dropout_p, trusted_layout):
    b, q_len, h, _ = q.shape
    return q.new_empty(b, q_len, h, v.shape[-1]), q.new_empty(b, h, q_len, dtype=accumulate_dtype(q.dtype))


@torch.library.custom_op("patternstore::block_sparse_backward", mutates_args=())
def _backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    kv_num_blocks: Tensor, kv_indices: Tensor,
    key_padding_mask: Optional[Tensor], dropout_seed: Optional[Tensor],
    block_size: int, causal: bool, scale: float, dropout_p: float, trusted_layout: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``_forward_op``'s ``out`` with respect to ``q, k, v``."""
    # No check_layout: the forward checked these very arrays (when they were not trusted).
    plan = _TilePlan(q, k, kv_num_blocks, kv_indices, key_padding_mask, block_size, causal, dropout_p,
                     trusted_layout)
    b, q_len, h = plan.b, plan.q_len, plan.h
    # d_out gets one zero row (position q_len): invalid query slots read it,
    # so they add nothing to any gradient.
    d_out = F.pad(grad_out.to(plan.work), (0, 0, 0, 0, 0, 1)).view(b, (q_len + 1) * h, -1)
    q_flat, out_flat = _flat(q), _flat(out)
    k_flat, v_flat = _flat(k, plan.heads_outer), _flat(v, plan.heads_outer)
    lse = lse.to(plan.work).transpose(1, 2).reshape(b, q_len * h, 1)  # empty rows: EMPTY_LSE, exp(-inf - it) = 0
    dq = q.new_zeros(b, (q_len + 1) * h, q.shape[-1], dtype=plan.work)
    dk = k.new_zeros(b, plan.kv_len * plan.kv_heads, k.shape[-1], dtype=plan.work)
    dv = v.new_zeros(b, plan.kv_len * plan.kv_heads, v.shape[-1], dtype=plan.work)
    seed = int(dropout_seed) if dropout_p > 0 else 0
    tile = 0
    for rows, key_tiles in plan.tiles(q.shape[-1]):
        index, valid = plan.query_index(rows)
        count = rows.numel()
        target = index.masked_fill(~valid, q_len * h)
        qt, ot = plan.gather("q", q_flat, index, count), plan.gather("out", out_flat, index, count)
        dt = plan.gather("d_out", d_out, target, count)
        lt = plan.gather("lse", lse, index, count).squeeze(-1)
        dq_rows = None
        for keys in key_tiles:
            positions = plan.key_positions(keys)
            key_index = plan.key_index(rows, positions)
            mask, _ = plan.mask(rows, keys, positions)
            keep = None
            if dropout_p > 0:
                keep = _dropout_keep(qt, positions.shape[1], dropout_p, seed, tile)
            gq, gk, gv = _tile_backward(dt, qt, plan.gather("k", k_flat, key_index, count),
                                        plan.gather("v", v_flat, key_index, count), ot, lt, mask, scale, keep,
                                        plan.fused)
            dq_rows = gq if dq_rows is None else dq_rows.add_(gq)
            flat = key_index.flatten()
            dk.index_add_(1, flat, gk.reshape(b, flat.numel(), -1))
            dv.index_add_(1, flat, gv.reshape(b, flat.numel(), -1))
            tile += 1
        dq.index_add_(1, target.flatten(), dq_rows.reshape(b, -1, dq_rows.shape[-1]))
    return (
        dq.view(b, q_len + 1, h, -1)[:, :q_len].to(q.dtype).contiguous(),
        plan.unflat_keys(dk).to(k.dtype),
        plan.unflat_keys(dv).to(v.dtype),
    )


@_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, kv_num_blocks, kv_indices, key_padding_mask, dropout_seed,
      block_size, causal, scale, dropout_p, trusted_layout):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class _BlockSparseFunction(torch.autograd.Function):
    """Autograd of ``_forward_op`` as an ``autograd.Function`` with its own
    ``setup_context``: the form ``torch.func`` transforms accept (a custom
    op's ``register_autograd`` is not, torch 2.13). Its backward feeds the
    FINAL ``out`` and ``lse`` to ``_backward_op``."""

    @staticmethod
    def forward(q, k, v, kv_num_blocks, kv_indices, key_padding_mask, dropout_seed,
                block_size, causal, scale, dropout_p, trusted_layout):
        return _forward_op(q, k, v, kv_num_blocks, kv_indices, key_padding_mask, dropout_seed,
                           block_size, causal, scale, dropout_p, trusted_layout)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, v, kv_num_blocks, kv_indices, key_padding_mask, dropout_seed, *rest = inputs
        ctx.save_for_backward(q, k, v, output[0], output[1], kv_num_blocks, kv_indices,
                              key_padding_mask, dropout_seed)
        ctx.args = rest

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_lse: Optional[Tensor]):
        q, k, v, out, lse, kv_num_blocks, kv_indices, key_padding_mask, dropout_seed = ctx.saved_tensors
        dq, dk, dv = _BlockSparseBackwardFunction.apply(
            grad_out, q, k, v, out, lse, kv_num_blocks, kv_indices, key_padding_mask, dropout_seed, *ctx.args,
        )
        return dq, dk, dv, None, None, None, None, None, None, None, None, None


class _BlockSparseBackwardFunction(torch.autograd.Function):
    """``_backward_op`` under autograd: differentiating it again (double
    backward) is refused with a message instead of a silent wrong zero."""

    @staticmethod
    def forward(grad_out, q, k, v, out, lse, kv_num_blocks, kv_indices, key_padding_mask, dropout_seed,
                block_size, causal, scale, dropout_p, trusted_layout):
        return _backward_op(grad_out, q, k, v, out, lse, kv_num_blocks, kv_indices, key_padding_mask,
                            dropout_seed, block_size, causal, scale, dropout_p, trusted_layout)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "block-sparse attention has no double backward (a gradient of its gradients, e.g. "
            "create_graph=True then backward again, or torch.func.grad of torch.func.grad); use the dense "
            "reference F.scaled_dot_product_attention with a boolean mask for second derivatives"
        )


# ----------------------------------------------------------- functional core
def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_num_blocks: Tensor,
    kv_indices: Tensor,
    block_size: int,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Attention of ``q (b, q_len, h, d)`` over ``k, v (b, kv_len, h_kv, d)``
    restricted to a block layout (module docstring): returns ``(b, q_len, h, d)``.

    ``kv_num_blocks`` int32 ``[H, ceil(kv_len / block_size)]`` with ``H`` in
    {1, h}, ``kv_indices`` int32 ``[sum(kv_num_blocks)]``, both on ``q``'s
    device. Query rows are the last ``q_len`` positions. ``causal`` adds key
    <= query. ``softmax_scale`` defaults to ``d ** -0.5``. ``dropout_p`` drops
    attention probabilities (pass 0.0 in evaluation). ``key_padding_mask``
    bool ``(b, kv_len)``, True where a key must be ignored. Float16/bfloat16
    inputs are computed in float32 and returned in their dtype.
    """
    check_attention_inputs(q, k, v, key_padding_mask)
    b, q_len, h, d = q.shape
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    nb = (k.shape[1] + block_size - 1) // block_size  # the fake of _layout_op says the same: one symbolic size
    for name, t, dim in (("kv_num_blocks", kv_num_blocks, 2), ("kv_indices", kv_indices, 1)):
        if not isinstance(t, Tensor) or t.dtype != torch.int32 or t.dim() != dim:
            raise ValueError(f"{name} must be a {dim}-D int32 tensor")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if kv_num_blocks.shape[0] not in (1, h) or kv_num_blocks.shape[1] != nb:
        raise ValueError(
            f"kv_num_blocks must have shape [1 or heads={h}, ceil(kv_len / block_size)={nb}], "
            f"got {list(kv_num_blocks.shape)}"
        )
    dropout_p = check_dropout(dropout_p)
    scale = default_scale(q, check_softmax_scale(softmax_scale))
    return _attention(q, k, v, kv_num_blocks, kv_indices, block_size, check_is_causal(causal), scale, dropout_p,
                      key_padding_mask, trusted_layout=False)


def _attention(q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor, block_size: int,
               causal: bool, scale: float, dropout_p: float, key_padding_mask: Optional[Tensor],
               trusted_layout: bool) -> Tensor:
    """``block_sparse_attention`` after its checks (the module's path too)."""
    seed = None
    if dropout_p > 0:
        seed = torch.randint(0, 1 << 62, (), dtype=torch.int64)
    out, _ = _BlockSparseFunction.apply(
        q, k, v, kv_num_blocks, kv_indices, key_padding_mask, seed,
        block_size, causal, float(scale), dropout_p, trusted_layout,
    )
    return out


# ------------------------------------------------------------- store lookup
def describe_layouts(kind: str, block_size: int, seed: int, params: dict[str, Any],
                     store: Optional[PatternStore], max_seq_len: Optional[int]) -> str:
    """The self-describing string that names a module's layouts in any
    process: canonical JSON of the spec template (everything but the length
    and the head count), the capacity, and the store's directory ("" for the
    default store)."""
    if store is None:
        where = ""
    elif store.directory is not None:
        where = str(store.directory)
    else:  # a memory-only store exists in this process only
        where = f"memory:{id(store):x}"
    return json.dumps({"kind": kind, "block_size": block_size, "seed": seed, "params": params,
                       "max_seq_len": max_seq_len, "store": where}, sort_keys=True, separators=(",", ":"))


class _LayoutSource:
    """The layouts of one description (``describe_layouts``). ``layout(kv_len,
    h, device, causal)`` looks each one up once and keeps it (the last
    MAX_LAYOUTS used), so a steady-state call takes no store lock and copies
    nothing between devices.

    Capacity (docs/design.md section 7): in causal use of a prefix-stable
    layout the store entry fetched is that of a capacity, ``max_seq_len`` or
    the next power of two of the block count, and its first rows are used;
    store entries then grow with log(max length), not with the number of
    lengths."""

    MAX_LAYOUTS = 32
    # BlockMasks (flex path) kept: each holds 4 arrays of H * nb * nb int32
    # (16 MiB each for one head at 256K tokens, block 128).
    MAX_BLOCK_MASKS = 8

    def __init__(self, description: str, store: Optional[PatternStore] = None) -> None:
        fields = json.loads(description)
        self.kind, self.block_size, self.seed = fields["kind"], fields["block_size"], fields["seed"]
        self.params, self.max_seq_len = fields["params"], fields["max_seq_len"]
        self._directory = fields["store"]
        self._store = store
        self._layouts: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()
        self._block_masks: OrderedDict[tuple, Any] = OrderedDict()
        probe = self.spec(self.block_size << 20, 2)
        self.per_head = probe.layout_heads == 2
        self.prefix_stable = probe.is_prefix_stable
        self.unidirectional = probe.params["attention"] == "unidirectional"
        # The fewest blocks (a power of two) at which the spec is valid: a
        # global block index past a short length exists in causal use only
        # once the sequence reaches it, but the capacity layout must hold it.
        self.min_capacity_blocks = next(1 << e for e in range(21) if self._valid(self.block_size << e))

    @property
    def store(self) -> PatternStore:
        if self._store is None:
            if self._directory.startswith("memory:"):
                raise RuntimeError("this module was built with a memory-only PatternStore, which exists in the "
                                   "process that made it only; give it a store with a directory")
            return store_for(self._directory or None)
        return self._store

    def spec(self, seq_len: int, num_heads: int) -> SparseSpec:
        return SparseSpec(self.kind, seq_len=seq_len, block_size=self.block_size,
                          num_heads=num_heads, seed=self.seed, **self.params)

    def _valid(self, seq_len: int) -> bool:
        try:
            self.spec(seq_len, 1)
        except ValueError:
            return False
        return True

    def capacity(self, seq_len: int) -> int:
        """The length whose layout serves ``seq_len`` in causal use."""
        if self.max_seq_len is not None and seq_len <= self.max_seq_len and self._valid(self.max_seq_len):
            return self.max_seq_len
        nb = -(-seq_len // self.block_size)
        return max(1 << (nb - 1).bit_length(), self.min_capacity_blocks) * self.block_size

    def layout(self, kv_len: int, num_heads: int, device: torch.device, causal: bool) -> tuple[Tensor, Tensor]:
        key = (kv_len, num_heads, device, causal)
        hit = self._layouts.get(key)
        if hit is not None:
            try:
                self._layouts.move_to_end(key)
            except KeyError:  # another thread evicted it meanwhile; the tensors are still good
                pass
            return hit
        if causal and self.prefix_stable:
            pattern = self.store.get(self.spec(self.capacity(kv_len), num_heads), device)
            # Bidirectional rows also hold later blocks: the causal rule drops
            # them, so every kept entry lies inside the first rows' blocks.
            hit = drop_future_blocks(*prefix_rows(pattern["kv_num_blocks"], pattern["kv_indices"],
                                                  -(-kv_len // self.block_size)))
        else:
            pattern = self.store.get(self.spec(kv_len, num_heads), device)
            hit = (pattern["kv_num_blocks"], pattern["kv_indices"])
            if causal:  # once here, not at every call (the attention op trusts it: sparse_forward)
                hit = drop_future_blocks(*hit)
        _remember(self._layouts, key, hit, self.MAX_LAYOUTS)
        return hit

    def block_mask(self, seq_len: int, num_heads: int, device: torch.device, causal: bool, padded: bool):
        """The ``BlockMask`` of ``layout(seq_len, ...)`` (``padded``: every
        block partial, for a key_padding_mask), built once and kept (the last
        MAX_BLOCK_MASKS used): a steady-state call is this dict lookup."""
        key = (seq_len, num_heads, device, causal, padded)
        hit = self._block_masks.get(key)
        if hit is None:
            layout = self.layout(seq_len, num_heads, device, causal)
            hit = layout_block_mask(*layout, seq_len, self.block_size, causal=causal, padded=padded)
            _remember(self._block_masks, key, hit, self.MAX_BLOCK_MASKS)
        return hit


def _remember(cache: OrderedDict, key: Any, value: Any, limit: int) -> None:
    """Put ``value`` in the LRU ``cache`` and evict the oldest entries past
    ``limit``. Threads may share the cache without a lock: an entry another
    thread evicted first is simply gone (the values stay valid)."""
    cache[key] = value
    while len(cache) > limit:
        try:
            cache.popitem(last=False)
        except KeyError:
            break


# Sources by description: a cache, never the only way to a layout (any
# process rebuilds a source from its description). Strong and bounded, so a
# program that holds no module (an exported one) keeps its layouts too.
_SOURCES: OrderedDict[str, _LayoutSource] = OrderedDict()
MAX_SOURCES = 64


def _source(description: str, store: Optional[PatternStore] = None) -> _LayoutSource:
    source = _SOURCES.get(description)
    if source is None:
        source = _SOURCES.setdefault(description, _LayoutSource(description, store))
        _remember(_SOURCES, description, source, MAX_SOURCES)
    return source


@torch.library.custom_op("patternstore::sparse_layout", mutates_args=())
def _layout_op(q: Tensor, k: Tensor, description: str, causal: bool) -> tuple[Tensor, Tensor]:
    """``(kv_num_blocks, kv_indices)`` of the layouts ``description`` names
    (``describe_layouts``) for the key length of ``k``, the head count of
    ``q`` and their device."""
    kv_num_blocks, kv_indices = _source(description).layout(k.shape[1], q.shape[2], q.device, causal)
    # An operator's outputs belong to its caller: a compiled graph may reuse a
    # dead output's memory for another buffer. Handing out the cached tensors
    # themselves could overwrite them; a copy costs O(nb + nnz) int32s.
    return kv_num_blocks.clone(), kv_indices.clone()


@_layout_op.register_fake
def _(q, k, description, causal):
    source = _source(description)
    h, kv_len = q.shape[2], k.shape[1]
    nnz = torch.library.get_ctx().new_dynamic_size()
    nb = (kv_len + source.block_size - 1) // source.block_size
    return (q.new_empty(h if source.per_head else 1, nb, dtype=torch.int32),
            q.new_empty(nnz, dtype=torch.int32))


_MASK_ARRAYS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


@torch.library.custom_op("patternstore::sparse_block_mask", mutates_args=())
def _block_mask_op(q: Tensor, k: Tensor, description: str, causal: bool, padded: bool) -> list[Tensor]:
    """The eight index arrays of the kept ``BlockMask`` (``_LayoutSource.
    block_mask``) for the length, head count and device of ``q``: what a
    compiled region sees of the flex path's lookup (copies, as in
    ``_layout_op``)."""
    mask = _source(description).block_mask(k.shape[1], q.shape[2], q.device, causal, padded)
    return [getattr(mask, name).clone() for name in _MASK_ARRAYS]


@_block_mask_op.register_fake
def _(q, k, description, causal, padded):
    source = _source(description)
    heads = q.shape[2] if source.per_head else 1
    nb = (k.shape[1] + source.block_size - 1) // source.block_size
    counts, rows = (1, heads, nb), (1, heads, nb, nb)
    return [q.new_empty(rows if name.endswith("indices") else counts, dtype=torch.int32) for name in _MASK_ARRAYS]


# ------------------------------------------------------------------- module
class BlockSparseAttention(nn.Module):
    """Block-sparse attention whose layout comes from the pattern store.

    ``kind`` and ``**params`` are those of ``patternstore.SparseSpec``
    (DeepSpeed's names); the layout for ``(kind, length, block_size, heads,
    seed, params)`` is fetched from ``store`` (``None``: ``default_store()``)
    on the first call at each key length. ``forward(q, k, v, is_causal=False,
    key_padding_mask=None)`` with q ``(batch, q_len, heads, head_dim)`` and k,
    v ``(batch, kv_len, kv_heads, head_dim)``: the query rows are the last
    ``q_len`` positions (a decode step, a chunk of a prefill). The causal rule
    applies when the layout is unidirectional or ``is_causal``; then a
    prefix-stable layout is taken from the layout of ``max_seq_len`` (or of
    the next power of two of the block count). ``dropout`` applies to
    attention probabilities in training.

    Pickles, deep-copies and exports as its layout description and store
    directory: it finds its layouts again in any process.
    """

    def __init__(
        self,
        kind: str,
        *,
        block_size: int = 128,
        seed: int = 0,
        softmax_scale: float | None = None,
        dropout: float = 0.0,
        store: Optional[PatternStore] = None,
        max_seq_len: Optional[int] = None,
        **params: Any,
    ) -> None:
        super().__init__()
        if "num_heads" in params or "seq_len" in params:
            raise ValueError("num_heads and seq_len come from the input (batch, seq_len, heads, head_dim); "
                             "do not pass them")
        dropout = check_dropout(dropout)
        softmax_scale = check_softmax_scale(softmax_scale)
        if store is not None and not isinstance(store, PatternStore):
            raise ValueError(f"store must be a PatternStore or None, got {type(store).__name__}")
        if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int)
                                        or max_seq_len < 1):
            raise ValueError(f"max_seq_len must be an int >= 1 or None, got {max_seq_len!r}")
        # Validate kind and params now with a length no length-dependent rule
        # rejects; rules that depend on the length (a global block beyond the
        # sequence) raise at the first call with that length.
        probe = SparseSpec(kind, seq_len=block_size << 20, block_size=block_size, seed=seed, **params)
        self.kind, self.block_size, self.seed = kind, block_size, seed
        self.params = dict(probe.params)
        self.softmax_scale, self.dropout = softmax_scale, float(dropout)
        self.max_seq_len = max_seq_len
        self._description = describe_layouts(kind, block_size, seed, self.params, store, max_seq_len)
        self._source: Optional[_LayoutSource] = _source(self._description, store)

    @property
    def layouts(self) -> _LayoutSource:
        """This process's lookup of the module's layouts (rebuilt after unpickling)."""
        if self._source is None:
            self._source = _source(self._description)
        return self._source

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"{type(self).__name__} cannot be compiled by torch.jit.script (its kernels are custom ops "
            f"and Python control flow); use torch.compile(module) or torch.export instead"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_source"] = None  # process-local: rebuilt from _description where it is unpickled
        return state

    def forward(self, q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        check_attention_inputs(q, k, v, key_padding_mask)  # before the lookup: bad input costs no work
        source = self.layouts
        causal = check_is_causal(is_causal) or source.unidirectional
        if causal and q.shape[1] != k.shape[1] and not source.prefix_stable:
            raise ValueError(
                f"causal attention with fewer queries than keys (q_len={q.shape[1]}, kv_len={k.shape[1]}: a "
                f"decode step) needs a prefix-stable layout, whose rows do not depend on the length; "
                f"{self.kind!r} with {self.params} is not (attention='unidirectional' layouts are)"
            )
        dropout_p = self.dropout if self.training else 0.0
        if attention_path(q.device.type, q.shape[1], k.shape[1], dropout_p, self.block_size) == "flex":
            return self._flex_forward(q, k, v, causal, key_padding_mask)
        if q.device.type == "meta":
            # Shape inference on meta tensors: the lookup op's fake gives the
            # entry count a data-dependent size, which meta tensors cannot
            # carry, so the layout is looked up for the CPU and its shapes
            # taken to the meta device (values are never read there).
            kv_num_blocks, kv_indices = (x.to(q.device) for x in self.layouts.layout(
                k.shape[1], q.shape[2], torch.device("cpu"), causal))
        else:
            # Detached: the lookup reads shapes only, and an operator input that
            # requires grad would route it through an autograd.Function without
            # setup_context, which torch.func transforms refuse.
            kv_num_blocks, kv_indices = _layout_op(q.detach(), k.detach(), self._description, causal)
        return _attention(q, k, v, kv_num_blocks, kv_indices, self.block_size, causal,
                          default_scale(q, self.softmax_scale), dropout_p, key_padding_mask, trusted_layout=True)

    def _flex_forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool,
                      key_padding_mask: Optional[Tensor]) -> Tensor:
        """The flex path (note above FLEX_DEVICE_TYPES): eager, the kept
        BlockMask itself; compiled, its arrays through ``_block_mask_op``."""
        n, heads = k.shape[1], q.shape[2]
        padded = key_padding_mask is not None
        if torch.compiler.is_compiling():
            arrays = _block_mask_op(q.detach(), k.detach(), self._description, causal, padded)  # as _layout_op
            mask = block_mask_of(arrays, n, self.block_size, structural_mask_mod(n, causal))
        else:
            mask = self.layouts.block_mask(n, heads, q.device, causal, padded)
        if padded:
            mask = with_key_padding(mask, key_padding_mask)
        out = _flex_attention()(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
            scale=default_scale(q, self.softmax_scale), enable_gqa=heads != k.shape[2],
            kernel_options=flex_tiles(self.block_size) or None,
        )
        return out.transpose(1, 2)

    def spec(self, seq_len: int, num_heads: int) -> SparseSpec:
        """The spec of the layout at that length (without capacity), e.g. for
        ``store.get(module.spec(n, h)).to_block_mask()``."""
        return self.layouts.spec(seq_len, num_heads)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, block_size={self.block_size}, seed={self.seed}, params={self.params}"
