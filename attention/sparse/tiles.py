"""The tiles of block-sparse attention: the gather plan and the loops that
run a layout's rows through the kernel layer (``attend`` /
``attend_backward``), forward and backward.

Layout of the tensors (attention/sparse/module.py states the semantics): ``q``
and the output ``(batch, q_len, heads, head_dim)``, ``k`` ``(batch, kv_len,
kv_heads, head_dim)``, ``v`` ``(batch, kv_len, kv_heads, v_dim)``; the CSR
layout ``kv_num_blocks [H, nb]``, ``kv_indices [nnz]``.

Only the query blocks that hold a query row are visited. Rows (head, query
block) are grouped by their number ``c`` of active blocks (``row_groups``:
``(rows [R], keys [R, c])``; the caller may pass them precomputed, so a call
makes no device-to-host copy); each group runs in tiles of ``R`` rows by
``kc`` key blocks: query, key and value blocks are gathered by position with
``index_select`` straight from the caller's tensors (viewed as ``(batch,
positions * heads, e)``, never copied as a whole), into buffers reused from
tile to tile, so a decode step costs the key blocks of its rows, not
``kv_len``. A tile is one ``attend`` call with queries ``[batch * A, R, G *
bs, d]`` against keys ``[batch * A, R, kc * bs, d]`` and a bool mask: with
one shared layout ``A = kv_heads`` and the ``G = heads / kv_heads`` query
heads of a key/value head share its gathered keys (no key is repeated for
GQA); with a per-head layout ``A = G = 1``. Rows with more key blocks than a
tile holds (global rows) run as several key tiles merged by their
log-sum-exps, so no call gathers more than ``TILE_ELEMENTS`` key elements.
The backward runs the same tiles from the saved ``out`` and ``lse`` and
scatter-adds the gradients (``index_add_``).

Masked keys are FILLED out of the scores, never added, so a NaN or inf in a
masked key (a future key of a causal diagonal block, a padded key) never
reaches an output; the k and v rows of padded keys are zeroed too (the whole
tensors or, where a call gathers fewer keys than the sequence holds, each
tile's), so a NaN or Inf VALUE of a padded key never reaches an output or a
gradient (a future key's value still meets ``0 * NaN``, as in SDPA); a row whose keys are all masked outputs 0 with lse
``EMPTY_LSE``. Syncs: with precomputed groups and a trusted layout, none
(dropout reads its seed on the host: one).
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from patternstore.csr import check_layout, drop_future_blocks

from attention.kernels.softmax_parts import EMPTY_LSE, accumulate_dtype, merge_
from attention.kernels.attend import attend, attend_backward
from attention.kernels.sinks import apply_sinks, sinks_grad

__all__ = ["TILE_ELEMENTS", "USE_CPU_FLASH_KERNEL", "Groups", "row_groups", "TilePlan", "tile_backend",
           "sparse_forward", "sparse_backward", "with_sinks", "tiles_sinks_grad"]

# (rows [R], keys [R, c]) of each block count c > 0 (``row_groups``).
Groups = list[tuple[Tensor, Tensor]]

# Key (and value) elements gathered per tile: 4 Mi = 16 MiB each in float32.
# The sweep of 1, 4 and 16 Mi (forward + backward, bigbird 16K) showed no
# difference larger than the machine's noise; 4 Mi bounds memory.
TILE_ELEMENTS = 1 << 22

# On the CPU, without dropout, each tile runs through the kernel layer's
# choice for the CPU (ATen's fused CPU flash kernel); otherwise (other
# devices, dropout, or this flag off) through its "matmul" kernel. Tests run
# both. Chosen by measurement: the fused kernel leads in 5 of 8 cases
# (docs/bench.md, block-sparse, CPU forward).
USE_CPU_FLASH_KERNEL = True


def tile_backend(device_type: str, dropout_p: float) -> Optional[str]:
    """``attend``'s backend for the tiles (note above USE_CPU_FLASH_KERNEL)."""
    return None if USE_CPU_FLASH_KERNEL and device_type == "cpu" and dropout_p == 0 else "matmul"


def row_groups(kv_num_blocks: Tensor, kv_indices: Tensor, causal: bool, first_block: int) -> Groups:
    """``(rows [R], keys [R, c])`` for every block count ``c > 0`` among the
    rows of query blocks ``>= first_block``: flat row ids ``h * nb + i`` and
    key block ids ``j`` (int64). With ``causal``, key blocks after the query
    block are dropped first. Reads the counts on the host (one
    device-to-host copy on a GPU): callers on a hot path compute it once per
    layout (``LayoutSource.plan``)."""
    if causal:
        kv_num_blocks, kv_indices = drop_future_blocks(kv_num_blocks, kv_indices)
    heads, nb = kv_num_blocks.shape
    counts = kv_num_blocks.flatten().long()
    offsets = torch.cumsum(counts, 0) - counts
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


class TilePlan:
    """Everything one call needs: the gather indices of a tile (module
    docstring: queries ``[b * A, R, G * bs, d]``, keys ``[b * A, R, kc * bs,
    d]``), its mask, and buffers reused from tile to tile."""

    def __init__(self, q: Tensor, k: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
                 groups: Groups, key_padding_mask: Optional[Tensor], block_size: int, causal: bool,
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
        # Precomputed by the caller (LayoutSource.plan: no device sync here), or
        # grouped now; a trusted causal layout holds no future block already.
        self.groups = groups or row_groups(kv_num_blocks, kv_indices, causal and not trusted_layout,
                                           self.offset // block_size)
        self._buffers: dict[str, Tensor] = {}
        device = q.device
        self.slot = torch.arange(block_size, device=device)
        self.future = self.slot[None, :] > self.slot[:, None]           # [bs, bs] key offset > query offset
        self.beyond = self.slot >= kv_len - (nb - 1) * block_size if kv_len % block_size else None
        self.key_padding_mask = key_padding_mask
        # Where padded k and v rows are zeroed (``without_padded_values``): in
        # each tile when the tiles gather no more keys than the sequence holds
        # (a decode step gathers only its rows' keys), else once, whole.
        gathered = sum(rows.numel() * keys.shape[1] for rows, keys in self.groups) * block_size * self.lanes
        self.zero_tiles = key_padding_mask is not None and gathered <= kv_len * kv_heads
        self.heads_outer = heads_outer(k)  # the flat order of keys and values (``flat``)
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
        """Flat indices into the keys as ``flat(k, self.heads_outer)`` lays
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
    def padding(self, positions: Tensor) -> Optional[Tensor]:
        """bool ``[b * A, R, 1, kc * bs]``: the tile's keys that
        ``key_padding_mask`` marks; None without one."""
        if self.key_padding_mask is None:
            return None
        count, width = positions.shape
        ignored = self.key_padding_mask[:, positions]                         # [b, R, kc * bs]
        ignored = ignored[:, None, :, None, :].expand(self.b, self.lanes, count, 1, width)
        return ignored.reshape(self.b * self.lanes, count, 1, width)

    def without_padded_values(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k and v with the rows of padded keys zeroed, where that is cheaper
        than zeroing them in every gathered tile (``gather_keys``): a NaN or
        Inf there would meet its 0 probability (``0 * NaN`` in ``p @ v``, and
        in the backward ``dS @ k``). Whole tensors when the tiles gather more
        keys than the sequence holds (a prefill gathers each key for every
        row whose layout covers it); else, a decode step, in the tiles, which
        gather only its rows' keys. Only a padded call pays either."""
        if self.key_padding_mask is None or self.zero_tiles:
            return k, v
        padded_rows = self.key_padding_mask[:, :, None, None]
        return k.masked_fill(padded_rows, 0.0), v.masked_fill(padded_rows, 0.0)

    def gather_keys(self, k_flat: Tensor, v_flat: Tensor, key_index: Tensor, rows: int,
                    padding: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """The tile's keys and values (``gather``), the rows of padded keys
        zeroed where ``without_padded_values`` left that to the tiles."""
        kt, vt = self.gather("k", k_flat, key_index, rows), self.gather("v", v_flat, key_index, rows)
        if padding is not None and self.zero_tiles:
            padded_rows = padding.transpose(-1, -2)                           # [b * A, R, kc * bs, 1]
            kt.masked_fill_(padded_rows, 0.0)
            vt.masked_fill_(padded_rows, 0.0)
        return kt, vt

    def mask(self, rows: Tensor, keys: Tensor, padding: Optional[Tensor]) -> Optional[Tensor]:
        """The tile's mask, bool broadcastable to ``[b * A, R, G * bs, kc *
        bs]``, True where the key does not count (causal future, past
        kv_len, ``padding``); None when every key counts."""
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
        if padding is not None:
            masked = padding if masked is None else masked | padding
        return masked

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


def heads_outer(k: Tensor) -> bool:
    """Whether keys ``(b, n, heads, e)`` are stored heads-outer, as ``(b,
    heads, n, e)`` (transformers' projections and KV caches): then ``flat``
    keeps heads outer, so gathers read them in place instead of copying the
    whole cache on every call."""
    b, n, h, e = k.shape
    if h == 1 or n == 1 or k.stride(-1) != 1:
        return False
    return k.stride(1) != h * k.stride(2) and k.stride(2) == n * k.stride(1)


def flat(x: Tensor, heads_outer: bool = False) -> Tensor:
    """``(b, n, heads, e)`` -> ``(b, n * heads, e)`` (position-major) or, with
    ``heads_outer``, ``(b, heads * n, e)``: a view where the strides allow (the
    last dimension made contiguous first: kernels need it)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if heads_outer:
        x = x.transpose(1, 2)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def dropout_keep(like: Tensor, keys: int, p: float, seed: int, tile: int) -> Tensor:
    """The keep mask of one tile (queries ``like``, ``keys`` keys), bool: a
    pure function of (seed, tile), so the backward regenerates exactly the
    forward's mask."""
    generator = torch.Generator(device=like.device).manual_seed((seed + 7919 * tile) % (1 << 63))
    return torch.rand((*like.shape[:3], keys), generator=generator, device=like.device) >= p





def sparse_forward(
    q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor, groups: Groups,
    key_padding_mask: Optional[Tensor], dropout_seed: Optional[Tensor],
    block_size: int, causal: bool, scale: float, dropout_p: float, trusted_layout: bool,
    backend: Optional[str] = None, softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    """``out (b, q_len, h, v_dim)`` and ``lse (b, h, q_len)`` (work dtype).
    ``groups``: ``row_groups`` of the layout for these lengths, or empty to
    group here. ``trusted_layout``: the layout is a module's
    (``LayoutSource``): valid by construction (generated here, checksummed on
    disk) and, when causal, without future blocks; so neither
    ``check_layout`` nor ``drop_future_blocks`` runs, each of which costs
    device-to-host syncs on a GPU. Otherwise (the functional API) both do.
    ``backend``: ``attend``'s, None for ``tile_backend``'s choice;
    ``softcap``: ``attend``'s."""
    if not trusted_layout:  # reads values: several device-to-host syncs on a GPU
        check_layout(kv_num_blocks, kv_indices, -(-k.shape[1] // block_size))
    b, q_len, h, _ = q.shape
    if b == 0:  # an empty batch: an empty output, as SDPA gives
        return q.new_zeros(0, q_len, h, v.shape[-1]), q.new_zeros(0, h, q_len, dtype=accumulate_dtype(q.dtype))
    backend = tile_backend(q.device.type, dropout_p) if backend is None else backend
    plan = TilePlan(q, k, kv_num_blocks, kv_indices, groups, key_padding_mask, block_size, causal, trusted_layout)
    k, v = plan.without_padded_values(k, v)
    q_flat, k_flat, v_flat = flat(q), flat(k, plan.heads_outer), flat(v, plan.heads_outer)
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
            keep = dropout_keep(qt, positions.shape[1], dropout_p, seed, tile) if dropout_p > 0 else None
            padding = plan.padding(positions)
            kt, vt = plan.gather_keys(k_flat, v_flat, key_index, rows.numel(), padding)
            o, l = attend(qt, kt, vt, causal=False, scale=scale, mask=plan.mask(rows, keys, padding),
                          dropout_p=dropout_p, keep=keep, backend=backend,
                          softcap=softcap)
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
        lse.index_copy_(1, index, torch.cat([l.to(plan.work).reshape(b, -1) for _, _, _, l in done], 1))
    out = out.view(b, q_len + 1, h, -1)[:, :q_len].to(q.dtype)
    lse = lse.view(b, q_len + 1, h)[:, :q_len].transpose(1, 2)
    return out.contiguous(), lse.contiguous()


def sparse_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    kv_num_blocks: Tensor, kv_indices: Tensor, groups: Groups,
    key_padding_mask: Optional[Tensor], dropout_seed: Optional[Tensor],
    block_size: int, causal: bool, scale: float, dropout_p: float, trusted_layout: bool,
    backend: Optional[str] = None, softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``sparse_forward``'s ``out`` with respect to ``q, k, v``
    (no check_layout: the forward checked these very arrays)."""
    if q.shape[0] == 0:  # an empty batch
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    backend = tile_backend(q.device.type, dropout_p) if backend is None else backend
    plan = TilePlan(q, k, kv_num_blocks, kv_indices, groups, key_padding_mask, block_size, causal, trusted_layout)
    b, q_len, h = plan.b, plan.q_len, plan.h
    # d_out gets one zero row (position q_len): invalid query slots read it,
    # so they add nothing to any gradient.
    d_out = F.pad(grad_out.to(plan.work), (0, 0, 0, 0, 0, 1)).view(b, (q_len + 1) * h, -1)
    q_flat, out_flat = flat(q), flat(out)
    k, v = plan.without_padded_values(k, v)
    k_flat, v_flat = flat(k, plan.heads_outer), flat(v, plan.heads_outer)
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
            keep = dropout_keep(qt, positions.shape[1], dropout_p, seed, tile) if dropout_p > 0 else None
            padding = plan.padding(positions)
            kt, vt = plan.gather_keys(k_flat, v_flat, key_index, count, padding)
            gq, gk, gv = attend_backward(dt, qt, kt, vt, ot, lt, causal=False, scale=scale,
                                         mask=plan.mask(rows, keys, padding), dropout_p=dropout_p, keep=keep,
                                         backend=backend, softcap=softcap)
            dq_rows = gq if dq_rows is None else dq_rows.add_(gq)
            index_k = key_index.flatten()
            dk.index_add_(1, index_k, gk.reshape(b, index_k.numel(), -1))
            dv.index_add_(1, index_k, gv.reshape(b, index_k.numel(), -1))
            tile += 1
        dq.index_add_(1, target.flatten(), dq_rows.reshape(b, -1, dq_rows.shape[-1]))
    return (
        dq.view(b, q_len + 1, h, -1)[:, :q_len].to(q.dtype).contiguous(),
        # contiguous, as the operator's fake kernel says (unflat_keys may be a heads-outer view)
        plan.unflat_keys(dk).to(k.dtype, memory_format=torch.contiguous_format),
        plan.unflat_keys(dv).to(v.dtype, memory_format=torch.contiguous_format),
    )


def with_sinks(out: Tensor, lse: Tensor, sinks: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """The tiles' final ``(out (b, q_len, h, v_dim), lse (b, h, q_len))``
    with ``sinks`` ``(h,)`` merged in (``attention.kernels.sinks``; the
    backward takes these as the final out and lse); as they are for None."""
    if sinks is None:
        return out, lse
    out, lse = apply_sinks(out, lse.transpose(1, 2), sinks)
    return out, lse.transpose(1, 2).contiguous()


def tiles_sinks_grad(grad_out: Tensor, out: Tensor, lse: Tensor, sinks: Tensor) -> Tensor:
    """``sinks_grad`` from ``with_sinks``'s out and lse ``(b, h, q_len)``."""
    return sinks_grad(grad_out, out, lse.transpose(1, 2), sinks)
