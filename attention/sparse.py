"""Block-sparse attention over a stored CSR layout (DESIGN.md section 2).

Layout of every tensor, stated once: ``q, k, v`` and the output are
``(batch, seq, heads, head_dim)``. The layout is ``kv_num_blocks`` int32 ``[H, nb]`` and ``kv_indices``
int32 ``[nnz]`` (``patternstore.csr``), ``nb = ceil(seq / block_size)``,
``H = 1`` (one layout for every head) or ``H = heads``.

Semantics: query position ``i`` of head ``j`` attends the set ``K(i)`` of key
positions that lie in the active key blocks of its query block ``i //
block_size``, are ``< seq`` (a partial last block is zero-padded, and padding
never enters a softmax), are ``<= i`` when ``causal``, and are not marked in
``key_padding_mask``. It takes ONE softmax over all of ``K(i)``, never one
per block::

    out_i = sum_{t in K(i)} exp(s_it - lse_i) v_t,   s_it = scale * q_i . k_t,
    lse_i = log sum_{t in K(i)} exp(s_it).

A query with an empty ``K(i)`` outputs 0 and gets zero gradient. Gradients are
exact (FlashAttention-2's backward from the saved ``lse``).

Execution. Rows (head, query block) are grouped by their number ``c`` of
active blocks; each group runs in tiles of ``R`` rows by ``kc`` key blocks:
whole query, key and value blocks are gathered with ``index_select`` into
buffers reused from tile to tile, and each tile is one attention call
(``[B', R, bs, d]`` queries against ``[B', R, kc * bs, d]`` keys, ``B' = batch
* heads / H``) that returns its output and log-sum-exp. Rows with more key
blocks than a tile holds (global rows, ``c = nb``) run as several key tiles
merged by their log-sum-exps, so no call gathers more than ``TILE_ELEMENTS``
key elements. The backward runs the same tiles from the saved ``out`` and
``lse`` and scatter-adds the key and value gradients (``index_add_``).

The CPU path was chosen by measurement (tools/bench_sparse.py): see the note
above ``USE_CPU_FLASH_KERNEL``.

Compile contract (DESIGN.md section 4): the data-dependent work (grouping rows
by count, Python loops over tiles) lives inside the custom operators
``attention::block_sparse_forward`` / ``_backward``, opaque to dynamo with fake
implementations that give shapes; the store lookup is the custom operator
``attention::sparse_layout``. ``torch.compile(fullgraph=True)`` therefore
sees three operators and reshapes, on a cold start as after warm-up.
"""

from __future__ import annotations

import json
import math
import weakref
from collections import OrderedDict
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from patternstore.csr import check_layout, drop_future_blocks
from patternstore.specs import SparseSpec
from patternstore.store import PatternStore, default_store

from .dilated import check_attention_inputs

__all__ = ["block_sparse_attention", "BlockSparseAttention"]

# Key (and value) elements gathered per tile: 4 Mi = 16 MiB each in float32.
# CPU_PATH_NOTE gives the sweep that chose it.
TILE_ELEMENTS = 1 << 22

# On the CPU, without dropout, each tile runs through ATen's fused CPU flash
# attention kernel (the one
# F.scaled_dot_product_attention dispatches to; the private op because it
# also returns the log-sum-exp that a merge and the backward need). Otherwise
# the same tiles run through matmuls (the "explicit" path). Tests run both.
USE_CPU_FLASH_KERNEL = True
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

CPU_PATH_NOTE = """filled in from tools/bench_sparse.py"""


# ----------------------------------------------------------------- the plan
def _row_groups(
    kv_num_blocks: Tensor, kv_indices: Tensor, causal: bool
) -> list[tuple[Tensor, Tensor]]:
    """``(rows [R], keys [R, c])`` for every block count ``c > 0``: flat row
    ids ``h * nb + i`` and flat key-block ids ``h * nb + j`` (int64). With
    ``causal``, key blocks after the query block are dropped first."""
    if causal:
        kv_num_blocks, kv_indices = drop_future_blocks(kv_num_blocks, kv_indices)
    heads, nb = kv_num_blocks.shape
    counts = kv_num_blocks.flatten().long()
    offsets = torch.cumsum(counts, 0) - counts
    head_base = torch.arange(heads * nb, device=counts.device) // nb * nb
    order = torch.argsort(counts, stable=True)
    values, lengths = torch.unique_consecutive(counts[order], return_counts=True)
    groups = []
    for c, rows in zip(values.tolist(), torch.split(order, lengths.tolist())):
        if c == 0:
            continue  # rows without key blocks: output 0, lse -inf
        slots = offsets[rows, None] + torch.arange(c, device=rows.device)
        groups.append((rows, kv_indices[slots].long() + head_base[rows, None]))
    return groups


def _tiles(groups: list[tuple[Tensor, Tensor]], per_block: int):
    """Yield ``(rows [R], [keys [R, kc] for each key tile])``: at most
    TILE_ELEMENTS gathered key elements per tile (``per_block`` per key
    block), at least one row and one block."""
    for rows, keys in groups:
        c = keys.shape[1]
        kc = min(c, max(1, TILE_ELEMENTS // per_block))
        step = max(1, TILE_ELEMENTS // (per_block * kc))
        for r0 in range(0, rows.numel(), step):
            chunk = keys[r0 : r0 + step]
            yield rows[r0 : r0 + step], [chunk[:, k0 : k0 + kc] for k0 in range(0, c, kc)]


def _blocked(x: Tensor, layout_heads: int, nb: int, bs: int) -> Tensor:
    """``(b, n, h, e)`` -> ``[b * h / H, H * nb, bs, e]``, zero-padded to nb * bs
    positions: flat row ``h * nb + i`` of a per-head layout (or row ``i`` of a
    shared one) indexes dimension 1."""
    b, n, h, e = x.shape
    if nb * bs != n:
        x = F.pad(x, (0, 0, 0, 0, 0, nb * bs - n))
    # contiguous: reshape may return a strided view, and index_select would
    # then copy the whole tensor for every tile.
    return x.permute(0, 2, 1, 3).reshape(b * h // layout_heads, layout_heads * nb, bs, e).contiguous()


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else computes (and keeps lse) in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _unblocked(y: Tensor, b: int, n: int, h: int) -> Tensor:
    """Inverse of ``_blocked``: ``[b * h / H, H * nb, bs, e]`` -> ``(b, n, h, e)``."""
    return y.reshape(b, h, -1, y.shape[-1])[:, :, :n].permute(0, 2, 1, 3).contiguous()


class _Problem:
    """Everything one call needs, in blocked form (see ``_blocked``). A tile
    is ``R`` query blocks (rows) by ``kc`` key blocks each: queries
    ``[B', R, bs, d]``, keys ``[B', R, kc * bs, d]``."""

    def __init__(self, q, k, v, kv_num_blocks, kv_indices, key_padding_mask, block_size, causal, dropout_p):
        b, n, h, _ = q.shape
        self.b, self.n, self.h, self.bs, self.causal = b, n, h, block_size, causal
        self.nb = nb = -(-n // block_size)
        check_layout(kv_num_blocks, kv_indices, nb)
        self.layout_heads = kv_num_blocks.shape[0]
        work = _work_dtype(q.dtype)
        self.q, self.k, self.v = (_blocked(t.to(work), self.layout_heads, nb, block_size) for t in (q, k, v))
        self.groups = _row_groups(kv_num_blocks, kv_indices, causal)
        self.fused = USE_CPU_FLASH_KERNEL and q.device.type == "cpu" and dropout_p == 0
        self._buffers: dict[str, Tensor] = {}
        # Block-local mask patterns: key offset > query offset (causal cut of
        # a diagonal block), key offsets past seq_len in the last block.
        offsets = torch.arange(block_size, device=q.device)
        self.future = offsets[None, :] > offsets[:, None]
        self.beyond = offsets >= n - (nb - 1) * block_size if n % block_size else None
        self.minus_infinity = torch.tensor(float("-inf"), dtype=work, device=q.device)
        self.zero = torch.tensor(0.0, dtype=work, device=q.device)
        self.padded = None
        if key_padding_mask is not None:  # True = ignore; padded positions ignored too
            self.padded = F.pad(key_padding_mask, (0, nb * block_size - n), value=True).view(b, nb, block_size)

    def blocked(self, x: Tensor) -> Tensor:
        return _blocked(x.to(self.q.dtype), self.layout_heads, self.nb, self.bs)

    def tiles(self):
        return _tiles(self.groups, self.q.shape[0] * self.bs * self.q.shape[-1])

    def select(self, slot: str, x: Tensor, index: Tensor) -> Tensor:
        """``x.index_select(1, index)`` written into a buffer reused from tile
        to tile (one per ``slot``): with ``out=`` the copy runs at memory
        speed, without it 5-10x slower on this CPU (tools/bench_sparse.py)."""
        shape = (x.shape[0], index.numel(), *x.shape[2:])
        numel = math.prod(shape)
        buffer = self._buffers.get(slot)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[slot] = x.new_empty(numel)
        return torch.index_select(x, 1, index, out=buffer[:numel].view(shape))

    def gather(self, slot: str, x: Tensor, index: Tensor) -> Tensor:
        """Blocks ``index [R, c]`` of blocked ``x`` as ``[B', R, c * bs, e]``."""
        rows, c = index.shape
        return self.select(slot, x, index.flatten()).view(x.shape[0], rows, c * self.bs, x.shape[-1])

    def mask(self, rows: Tensor, keys: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """The tile's additive mask, broadcastable to ``[B', R, bs, kc * bs]``:
        0 where key t is in K(i), -inf elsewhere; None when every key counts.
        Second: bool, broadcastable to ``[B', R, bs]``, True for queries with
        no key in this tile (only a key_padding_mask can empty a row)."""
        nb, count = self.nb, keys.shape[0]
        column = keys % nb                                                     # key block, [R, kc]
        masked = None                                                          # [R, bs | 1, kc, bs]
        if self.causal:  # future blocks are dropped: only diagonal blocks cut keys
            diagonal = column == (rows % nb)[:, None]
            masked = diagonal[:, None, :, None] & self.future[None, :, None, :]
        if self.beyond is not None:  # the zero-padded end of the last block
            tail = (column == nb - 1)[:, None, :, None] & self.beyond
            masked = tail if masked is None else masked | tail
        if masked is not None:
            masked = masked.flatten(2)[None]                                   # [1, R, bs | 1, kc * bs]
        empty = None
        if self.padded is not None:
            batch_rows = self.q.shape[0]
            ignored = self.padded[:, column].view(self.b, 1, count, 1, -1)
            ignored = ignored.expand(self.b, batch_rows // self.b, count, 1, -1).reshape(batch_rows, count, 1, -1)
            masked = ignored if masked is None else masked | ignored
            empty = masked.all(-1)
        if masked is None:
            return None, None
        return torch.where(masked, self.minus_infinity, self.zero), empty


def _dropout_keep(like: Tensor, keys: int, p: float, seed: int, tile: int) -> Tensor:
    """The keep mask of one tile (queries ``like``, ``keys`` keys), scaled by
    1 / (1 - p): a pure function of (seed, tile), so the backward regenerates
    exactly the forward's mask."""
    generator = torch.Generator(device=like.device).manual_seed((seed + 7919 * tile) % (1 << 63))
    keep = torch.rand((*like.shape[:3], keys), generator=generator, device=like.device) >= p
    return keep.to(like.dtype).div_(1 - p)


def _tile_forward(qt, kt, vt, mask, scale: float, keep: Optional[Tensor], fused: bool) -> tuple[Tensor, Tensor]:
    """Attention of one tile: ``(out [B', R, bs, d], lse [B', R, bs])``."""
    if fused:
        return _FLASH(qt, kt, vt, attn_mask=mask, scale=scale)
    s = torch.matmul(qt, kt.transpose(-1, -2)).mul_(scale)
    if mask is not None:
        s.add_(mask)
    top = s.amax(-1, keepdim=True)
    shift = top.masked_fill(torch.isneginf(top), 0.0)
    p = s.sub_(shift).exp_()
    total = p.sum(-1, keepdim=True)
    if keep is not None:
        p.mul_(keep)
    out = torch.matmul(p, vt).div_(total.clamp_min(torch.finfo(total.dtype).tiny))
    lse = torch.where(total > 0, shift + total.log(), float("-inf")).squeeze(-1)
    return out, lse


def _merge(acc: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """Two partial softmaxes over disjoint key sets of the same queries."""
    merged = torch.logaddexp(acc_lse, lse)
    safe = merged.masked_fill(torch.isneginf(merged), 0.0)
    acc = acc * torch.exp(acc_lse - safe).unsqueeze(-1) + out * torch.exp(lse - safe).unsqueeze(-1)
    return acc, merged


def _tile_backward(d_out, qt, kt, vt, out, lse, delta, mask, scale: float, keep: Optional[Tensor],
                   fused: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one tile from the rows' final ``out`` and ``lse`` (+inf
    for empty rows) and ``delta = rowsum(d_out * out)``."""
    if fused:
        return _FLASH_BACKWARD(d_out, qt, kt, vt, out, lse, 0.0, False, attn_mask=mask, scale=scale)
    s = torch.matmul(qt, kt.transpose(-1, -2)).mul_(scale)
    if mask is not None:
        s.add_(mask)
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
@torch.library.custom_op("attention::block_sparse_forward", mutates_args=())
def _forward_op(
    q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
    key_padding_mask: Optional[Tensor], dropout_seed: Optional[Tensor],
    block_size: int, causal: bool, scale: float, dropout_p: float,
) -> tuple[Tensor, Tensor]:
    """Returns ``out (b, n, h, d)`` and ``lse [b, h, nb * bs]`` (rows past n are padding)."""
    pb = _Problem(q, k, v, kv_num_blocks, kv_indices, key_padding_mask, block_size, causal, dropout_p)
    seed = int(dropout_seed) if dropout_p > 0 else 0
    tile = 0
    done: list[tuple[Tensor, Tensor, Tensor]] = []  # (rows, out, lse) of every row tile
    for rows, key_tiles in pb.tiles():
        qt = pb.select("q", pb.q, rows)
        acc = acc_lse = None
        for keys in key_tiles:
            mask, empty = pb.mask(rows, keys)
            keep = None
            if dropout_p > 0:
                keep = _dropout_keep(qt, keys.shape[1] * block_size, dropout_p, seed, tile)
            o, l = _tile_forward(qt, pb.gather("k", pb.k, keys), pb.gather("v", pb.v, keys), mask, scale,
                                 keep, pb.fused)
            if empty is not None:
                l = l.masked_fill(empty, float("-inf"))  # the fused kernel reports 0 for empty rows
            acc, acc_lse = (o, l) if acc is None else _merge(acc, acc_lse, o, l)
            tile += 1
        done.append((rows, acc, acc_lse))
    # One scatter at the end rather than one per tile: on a shared machine
    # every small parallel op risks a stall of milliseconds.
    out = pb.v.new_zeros(*pb.q.shape[:3], pb.v.shape[-1])
    lse = pb.q.new_full(pb.q.shape[:3], float("-inf"))
    if done:
        rows = torch.cat([r for r, _, _ in done])
        out.index_copy_(1, rows, torch.cat([o for _, o, _ in done], dim=1))
        lse.index_copy_(1, rows, torch.cat([l for _, _, l in done], dim=1))
    return (
        _unblocked(out, pb.b, pb.n, pb.h).to(q.dtype),
        lse.reshape(pb.b, pb.h, pb.nb * block_size),
    )


@_forward_op.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, key_padding_mask, dropout_seed,
      block_size, causal, scale, dropout_p):
    b, n, h, _ = q.shape
    nb = (n + block_size - 1) // block_size
    return q.new_empty(b, n, h, v.shape[-1]), q.new_empty(b, h, nb * block_size, dtype=_work_dtype(q.dtype))


@torch.library.custom_op("attention::block_sparse_backward", mutates_args=())
def _backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    kv_num_blocks: Tensor, kv_indices: Tensor,
    key_padding_mask: Optional[Tensor], dropout_seed: Optional[Tensor],
    block_size: int, causal: bool, scale: float, dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``_forward_op``'s ``out`` with respect to ``q, k, v``."""
    pb = _Problem(q, k, v, kv_num_blocks, kv_indices, key_padding_mask, block_size, causal, dropout_p)
    d_out, out = pb.blocked(grad_out), pb.blocked(out)
    # delta_i = sum_t P_it dP_it = dO_i . O_i (with dropout, O is the dropped output).
    delta = None if pb.fused else (d_out * out).sum(-1)
    lse = lse.to(pb.q.dtype).reshape(pb.q.shape[:3])
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))  # empty rows: exp(-inf - inf) = 0
    dq, dk, dv = torch.zeros_like(pb.q), torch.zeros_like(pb.k), torch.zeros_like(pb.v)
    seed = int(dropout_seed) if dropout_p > 0 else 0
    tile = 0
    for rows, key_tiles in pb.tiles():
        qt, d_rows, o_rows, l_rows = (pb.select(name, x, rows) for name, x in
                                      (("q", pb.q), ("d_out", d_out), ("out", out), ("lse", lse)))
        delta_rows = None if delta is None else pb.select("delta", delta, rows)
        dq_rows = None
        for keys in key_tiles:
            mask, _ = pb.mask(rows, keys)
            keep = None
            if dropout_p > 0:
                keep = _dropout_keep(qt, keys.shape[1] * block_size, dropout_p, seed, tile)
            gq, gk, gv = _tile_backward(d_rows, qt, pb.gather("k", pb.k, keys), pb.gather("v", pb.v, keys),
                                        o_rows, l_rows, delta_rows, mask, scale, keep, pb.fused)
            dq_rows = gq if dq_rows is None else dq_rows.add_(gq)
            flat = keys.flatten()
            dk.index_add_(1, flat, gk.reshape(dk.shape[0], flat.numel(), block_size, -1))
            dv.index_add_(1, flat, gv.reshape(dv.shape[0], flat.numel(), block_size, -1))
            tile += 1
        dq.index_copy_(1, rows, dq_rows)
    b, n, h = pb.b, pb.n, pb.h
    return (
        _unblocked(dq, b, n, h).to(q.dtype),
        _unblocked(dk, b, n, h).to(k.dtype),
        _unblocked(dv, b, n, h).to(v.dtype),
    )


@_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, kv_num_blocks, kv_indices, key_padding_mask, dropout_seed,
      block_size, causal, scale, dropout_p):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, kv_num_blocks, kv_indices, key_padding_mask, dropout_seed, *rest = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], kv_num_blocks, kv_indices,
                          key_padding_mask, dropout_seed)
    ctx.args = rest


def _backward(ctx, grad_out: Tensor, grad_lse: Tensor):
    q, k, v, out, lse, kv_num_blocks, kv_indices, key_padding_mask, dropout_seed = ctx.saved_tensors
    dq, dk, dv = _backward_op(
        grad_out.contiguous(), q, k, v, out, lse, kv_num_blocks, kv_indices,
        key_padding_mask, dropout_seed, *ctx.args,
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


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
    """Attention of ``q`` over ``k, v`` (all ``(b, n, h, d)``) restricted to a
    block layout (module docstring): returns ``(b, n, h, d)``.

    ``kv_num_blocks`` int32 ``[H, ceil(n / block_size)]`` with ``H`` in {1, h},
    ``kv_indices`` int32 ``[sum(kv_num_blocks)]``, both on ``q``'s device.
    ``causal`` adds key <= query. ``softmax_scale`` defaults to ``d ** -0.5``.
    ``dropout_p`` drops attention probabilities (pass 0.0 in evaluation).
    ``key_padding_mask`` bool ``(b, n)``, True where a key must be ignored.
    Float16/bfloat16 inputs are computed in float32 and returned in their dtype.
    """
    check_attention_inputs(q, k, v, key_padding_mask)
    b, n, h, d = q.shape
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    nb = -(-n // block_size)
    for name, t, dim in (("kv_num_blocks", kv_num_blocks, 2), ("kv_indices", kv_indices, 1)):
        if not isinstance(t, Tensor) or t.dtype != torch.int32 or t.dim() != dim:
            raise ValueError(f"{name} must be a {dim}-D int32 tensor")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if kv_num_blocks.shape[0] not in (1, h) or kv_num_blocks.shape[1] != nb:
        raise ValueError(
            f"kv_num_blocks must have shape [1 or heads={h}, ceil(seq_len / block_size)={nb}], "
            f"got {list(kv_num_blocks.shape)}"
        )
    _check_probability("dropout_p", dropout_p)
    _check_scale(softmax_scale)
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    seed = None
    if dropout_p > 0:
        seed = torch.randint(0, 1 << 62, (), dtype=torch.int64)
    out, _ = _forward_op(
        q, k, v, kv_num_blocks, kv_indices, key_padding_mask, seed,
        block_size, bool(causal), float(scale), float(dropout_p),
    )
    return out


def _check_probability(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")


def _check_scale(value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value)):
        raise ValueError(f"softmax_scale must be a finite float or None, got {value!r}")


# ------------------------------------------------------------- store lookup
class _LayoutSource:
    """Where one module's layouts come from: a spec template (everything but
    seq_len and num_heads) and a store. ``layout(n, h, device)`` looks the
    layout up once per (n, h, device) and keeps the tensors (the last
    MAX_LENGTHS used), so steady-state calls take no store lock and copy
    nothing between devices."""

    MAX_LENGTHS = 16

    def __init__(self, kind: str, block_size: int, seed: int, params: dict[str, Any], store) -> None:
        self.kind, self.block_size, self.seed, self.params, self.store = kind, block_size, seed, params, store
        self._layouts: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()

    def spec(self, seq_len: int, num_heads: int) -> SparseSpec:
        return SparseSpec(self.kind, seq_len=seq_len, block_size=self.block_size,
                          num_heads=num_heads, seed=self.seed, **self.params)

    def layout(self, seq_len: int, num_heads: int, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (seq_len, num_heads, device)
        hit = self._layouts.get(key)
        if hit is not None:
            try:
                self._layouts.move_to_end(key)
            except KeyError:  # another thread evicted it meanwhile; the tensors are still good
                pass
        else:
            store = self.store if self.store is not None else default_store()
            pattern = store.get(self.spec(seq_len, num_heads), device)
            hit = (pattern["kv_num_blocks"], pattern["kv_indices"])
            self._layouts[key] = hit
            while len(self._layouts) > self.MAX_LENGTHS:
                self._layouts.popitem(last=False)
        return hit

    def __deepcopy__(self, memo):  # a copied module shares the source (and its store)
        return self


_SOURCES: "weakref.WeakValueDictionary[str, _LayoutSource]" = weakref.WeakValueDictionary()


@torch.library.custom_op("attention::sparse_layout", mutates_args=())
def _layout_op(like: Tensor, source: str, block_size: int, per_head: bool) -> tuple[Tensor, Tensor]:
    """``(kv_num_blocks, kv_indices)`` of registered source ``source`` for the
    sequence length, head count and device of ``like (b, n, h, d)``."""
    _, n, h, _ = like.shape
    kv_num_blocks, kv_indices = _SOURCES[source].layout(n, h, like.device)
    # An operator's outputs belong to its caller: a compiled graph may reuse a
    # dead output's memory for another buffer. Handing out the cached tensors
    # themselves could overwrite them; a copy costs O(nb + nnz) int32s.
    return kv_num_blocks.clone(), kv_indices.clone()


@_layout_op.register_fake
def _(like, source, block_size, per_head):
    _, n, h, _ = like.shape
    nnz = torch.library.get_ctx().new_dynamic_size()
    nb = (n + block_size - 1) // block_size
    return (like.new_empty(h if per_head else 1, nb, dtype=torch.int32),
            like.new_empty(nnz, dtype=torch.int32))


# ------------------------------------------------------------------- module
class BlockSparseAttention(nn.Module):
    """Block-sparse attention whose layout comes from the pattern store.

    ``kind`` and ``**params`` are those of ``patternstore.SparseSpec``
    (DeepSpeed's names); the layout for ``(kind, seq_len, block_size, heads,
    seed, params)`` is fetched from ``store`` (``None``: ``default_store()``)
    on the first call at each sequence length. ``forward(q, k, v,
    is_causal=False, key_padding_mask=None)`` on ``(batch, seq, heads,
    head_dim)``; the causal rule applies when the layout is unidirectional or
    ``is_causal``. ``dropout`` applies to attention probabilities in training.
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
        **params: Any,
    ) -> None:
        super().__init__()
        if "num_heads" in params or "seq_len" in params:
            raise ValueError("num_heads and seq_len come from the input (batch, seq_len, heads, head_dim); "
                             "do not pass them")
        _check_probability("dropout", dropout)
        _check_scale(softmax_scale)
        if store is not None and not isinstance(store, PatternStore):
            raise ValueError(f"store must be a PatternStore or None, got {type(store).__name__}")
        # Validate kind and params now with a length no length-dependent rule
        # rejects; rules that depend on the length (a global block beyond the
        # sequence) raise at the first call with that length.
        probe = SparseSpec(kind, seq_len=block_size << 20, block_size=block_size, seed=seed, **params)
        self.kind, self.block_size, self.seed = kind, block_size, seed
        self.params = dict(probe.params)
        self.softmax_scale, self.dropout = softmax_scale, float(dropout)
        self.unidirectional = self.params["attention"] == "unidirectional"
        self.per_head = SparseSpec(kind, seq_len=block_size << 20, block_size=block_size, num_heads=2,
                                   seed=seed, **params).layout_heads == 2
        store_token = "default" if store is None else f"{type(store).__name__}@{id(store):x}"
        self._source_id = "|".join(
            [kind, str(block_size), str(seed), json.dumps(sorted(self.params.items())), store_token]
        )
        source = _SOURCES.get(self._source_id)
        if source is None:
            source = _LayoutSource(kind, block_size, seed, self.params, store)
            _SOURCES[self._source_id] = source
        self._source = source  # keeps the registry entry alive as long as the module

    def forward(self, q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        check_attention_inputs(q, k, v, key_padding_mask)  # before the lookup: bad input costs no work
        kv_num_blocks, kv_indices = _layout_op(q, self._source_id, self.block_size, self.per_head)
        return block_sparse_attention(
            q, k, v, kv_num_blocks, kv_indices, self.block_size,
            causal=bool(is_causal) or self.unidirectional,
            softmax_scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0,
            key_padding_mask=key_padding_mask,
        )

    def spec(self, seq_len: int, num_heads: int) -> SparseSpec:
        """The spec of the layout this module uses for that input shape, e.g.
        for ``store.get(module.spec(n, h)).to_block_mask()``."""
        return self._source.spec(seq_len, num_heads)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, block_size={self.block_size}, seed={self.seed}, params={self.params}"
