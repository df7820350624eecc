"""Dilated attention as ONE ``flex_attention`` call over the residue-ordered sequence.

The function is docs/design.md section 2.1's ``softmax(S + log M) @ V``. In
residue order (``attention.residue``) the ``M > 0`` mask is block-sparse
(``attention.dilated.residue_layout``), so one compiled flex call computes it:

- gather q, k, v into residue order (one ``index_select`` each, the index
  computed by arithmetic inside the compiled region, no permutation tensor);
- ``flex_attention`` with the BlockMask of the layout; ``mask_mod`` keeps
  ``M > 0`` (plus ``key <= query`` on the ORIGINAL positions when causal, and
  not-padded keys), ``score_mod`` adds ``log M``. Both recount M from the
  plan's ints (compile-time constants): per branch a segment compare and a
  residue compare, no tensor beyond the caller's padding mask;
- gather the output back to natural order.

Padded keys' k and v rows are zeroed first (inside the compiled region): a
NaN or Inf in a padded key or value never reaches an output.

Grouped-query attention goes through flex's ``enable_gqa`` (k, v are never
repeated). ``ordered=True`` takes q, k, v, the padding mask and returns the
output already in residue order (no gathers): a model that keeps its
activations in that order pays for the permutation once, not per layer, and
gives RoPE the ids ``attention.residue.residue_order(n, R)``.

Limits, each a clear ValueError before any work: no ``torch.export`` (nor
AOTInductor; ``FLEX_NOT_EXPORTED``); ``q_len == kv_len`` (decode
and chunked prefill belong to the per-branch path
``attention.dilated.dilated_attention``, whose strided views cost a query row
exactly the keys it attends, with no n-dependent reordering of the cache);
``block_size`` a multiple of ``attention.kernels.flex.FLEX_MIN_BLOCK``; on the CPU,
flex compiles the forward only and for float32 and half types, so a CPU call
that needs gradients is refused (the per-branch path serves it). Dropout is
not offered (flex has none).

Compile: the flex call is the package's one compiled ``flex_attention``
(``attention.kernels.flex.compiled_flex``), a graph per (plan, causal,
padded, ordered, GQA) and shape; the two gathers run eagerly around it (on
the CPU 1.6% of the call, docs/bench.md), or inside a caller's graph. The
BlockMask is built eagerly from the per-process layout cache and kept per
(plan, length, block, causal, padded, device) in a bounded cache, so no
store, lock or device copy happens in the graph.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from patternstore.fields import as_int

from attention.dilated.plan import Branches, DilatedPlan, branch_offsets, check_plan, plan_branches
from attention.caches import register_cached_function
from attention.block_mask import BLOCK_MASK_FIELDS, build_block_mask
from attention.kernels.flex import FLEX_MIN_BLOCK, compiled_flex, flex_tiles
from attention.checks import check_attention_inputs, check_is_causal, check_softmax_scale, default_scale
from attention.residue import residue_index, residue_modulus, residue_position
from attention.dilated.residue_layout import ResidueLayout, layout_period, residue_layout

__all__ = [
    "FUSED_BLOCK",
    "dilated_flex_attention",
    "residue_block_mask",
    "block_mask_from_layout",
    "fused_forward",
    "residue_mods",
]

# Block of the layout and of flex's tiles by default: flex's own largest tile
# (attention.kernels.flex.FLEX_DEFAULT_TILE).
FUSED_BLOCK = 128
# BlockMasks kept per process: at 1M tokens (benchmark spec, 16 heads, block
# 128) one holds about 40 MB of index arrays.
_MASKS_KEPT = 8

def _multiplicity(branches: Branches, seq_len: int, h: Tensor, pq: Tensor, pk: Tensor) -> Tensor:
    """M: how many branches select (query position ``pq``, key position
    ``pk``) on head ``h``. A selected position has ``p mod s = offset (mod
    rate)``, and the offset is below the rate, so two positions of one
    segment are a pair of the branch iff their in-segment residues agree and
    equal the head's offset."""
    count = None
    for w, r, heads in branches:
        s = min(w, seq_len)
        offset = branch_offsets(heads, h)  # -1 where the branch skips the head
        if s >= seq_len:  # one segment: no segment compare
            rq, rk, same = pq % r, pk % r, None
        else:
            rq, rk = pq % s % r, pk % s % r
            same = pq // s == pk // s
        hit = (rq == offset) & (rk == rq) if r > 1 else (offset == 0) & (pk >= 0)
        if same is not None:
            hit = hit & same
        count = hit.to(torch.int32) if count is None else count + hit.to(torch.int32)
    return count


def residue_mods(
    branches: Branches, seq_len: int, modulus: int, is_causal: bool, key_padding_mask: Optional[Tensor],
    ordered: bool,
) -> tuple[Callable, Callable]:
    """(score_mod, mask_mod) of flex over the residue-ordered sequence: indices
    are residue-order indices, turned into positions by arithmetic.
    ``key_padding_mask``: (batch, n) bool, in residue order when ``ordered``."""

    def positions(q_idx: Tensor, kv_idx: Tensor) -> tuple[Tensor, Tensor]:
        return residue_position(q_idx, seq_len, modulus), residue_position(kv_idx, seq_len, modulus)

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        pq, pk = positions(q_idx, kv_idx)
        return score + _multiplicity(branches, seq_len, h, pq, pk).to(score.dtype).log()

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        pq, pk = positions(q_idx, kv_idx)
        keep = _multiplicity(branches, seq_len, h, pq, pk) > 0
        if is_causal:
            keep = keep & (pk <= pq)
        if key_padding_mask is not None:
            keep = keep & ~key_padding_mask[b, kv_idx if ordered else pk]
        return keep

    return score_mod, mask_mod


# ------------------------------------------------------------- block masks
def block_mask_from_layout(
    layout: ResidueLayout, transposed: ResidueLayout, *, with_full: bool, device: torch.device
) -> BlockMask:
    """The flex BlockMask (no mask_mod: ``fused_forward`` attaches its own) of
    a residue layout and its transpose: the partial blocks, and with
    ``with_full`` the full blocks apart (flex skips their mask_mod); without,
    every block is partial (a padding mask must reach every block). Rows are
    as wide as the longest row, not nb: at 1M tokens nb wide would be 4 GiB."""
    return build_block_mask(
        layout.kv_num_blocks, layout.kv_indices, seq_len=layout.seq_len, block_size=layout.block_size,
        partial=~layout.full if with_full else None,
        transposed=(transposed.kv_num_blocks, transposed.kv_indices, ~transposed.full if with_full else None),
        device=device,
    )


def _repeat(base: BlockMask, seq_len: int, modulus: int) -> BlockMask:
    """The BlockMask at ``seq_len`` from the one at its layout period
    (``attention.dilated.residue_layout.layout_period``): every class's rows repeated
    along the diagonal, their block indices shifted in every class. Padding
    slots (zeros past a row's count) stay valid indices and are never read."""
    heads, base_nb = base.kv_num_blocks.shape[1:]
    steps = base_nb // modulus
    copies = seq_len // base.seq_lengths[0]

    def counts(x: Optional[Tensor]) -> Optional[Tensor]:
        if x is None:
            return None
        return x.view(1, heads, modulus, 1, steps).expand(1, heads, modulus, copies, steps).reshape(1, heads, -1)

    def indices(x: Optional[Tensor]) -> Optional[Tensor]:
        if x is None:
            return None
        shift = (torch.arange(copies, dtype=x.dtype, device=x.device) * steps).view(copies, 1, 1)
        moved = (x // steps * (steps * copies) + x % steps).view(1, heads, modulus, 1, steps, -1)
        return (moved + shift).reshape(1, heads, modulus * copies * steps, -1)

    arrays = [counts(x) if i % 2 == 0 else indices(x) for i, x in enumerate(_mask_arrays(base))]
    return BlockMask((seq_len, seq_len), *arrays, BLOCK_SIZE=base.BLOCK_SIZE)


@register_cached_function
@functools.lru_cache(maxsize=_MASKS_KEPT)
def residue_block_mask(
    plan: DilatedPlan, seq_len: int, block_size: int, is_causal: bool, with_full: bool, device: torch.device
) -> BlockMask:
    """``block_mask_from_layout`` of ``residue_layout(...)`` on ``device``,
    kept per process (bounded). Where the layout repeats with a period, the
    BlockMask of one period is built and repeated on the device (measured
    at 1M tokens: the layout's CSR and the BlockMask from it cost about 10x
    the repeat; tools/results/residue.json)."""
    period = layout_period(plan, seq_len, block_size)
    length = period or seq_len
    layout = residue_layout(plan, length, block_size, is_causal)
    transposed = residue_layout(plan, length, block_size, is_causal, transposed=True)
    mask = block_mask_from_layout(layout, transposed, with_full=with_full, device=device)
    mask = _repeat(mask, seq_len, residue_modulus(g.rate for g in plan.groups)) if period else mask
    return _as_wide_as_the_sequence(mask, seq_len, block_size) if torch.device(device).type == "cpu" else mask


def _as_wide_as_the_sequence(mask: BlockMask, seq_len: int, block_size: int) -> BlockMask:
    """The index arrays zero-padded to one slot per block. The masks here are
    as wide as their longest row (at 1M tokens a full-width array would hold
    16 heads x 8192^2 int32, 4 GiB), which CUDA's kernels take; torch 2.13's
    CPU flex lowering asserts ``width * block >= seq_len`` (measured: n 2048,
    segments 256/512/1024, InductorError). Slots past a row's count are
    never read, so the work is unchanged."""
    blocks = -(-seq_len // block_size)
    arrays = [x if x is None or i % 2 == 0 or x.shape[-1] >= blocks else
              torch.nn.functional.pad(x, (0, blocks - x.shape[-1])) for i, x in enumerate(_mask_arrays(mask))]
    return BlockMask(mask.seq_lengths, *arrays, BLOCK_SIZE=mask.BLOCK_SIZE)


# ----------------------------------------------------------- the forward
def fused_forward(
    q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, key_padding_mask: Optional[Tensor],
    branches: Branches, modulus: int, is_causal: bool, scale: float, ordered: bool,
    attend: Callable = flex_attention, kernel_options: Optional[dict] = None,
) -> Tensor:
    """The fused path after the checks, what is compiled: gathers, one
    ``attend`` (flex_attention's signature) call, gather back. q ``(B, n, H,
    d)``, k ``(B, n, H_kv, d)``, v ``(B, n, H_kv, d_v)`` -> ``(B, n, H, d_v)``."""
    n = q.shape[1]
    if key_padding_mask is not None:
        # A padded key's NaN or Inf value would meet its 0 probability in p @ v (0 * NaN): zeroed
        # (mask, k and v are in one order, natural or residue).
        rows = key_padding_mask[:, :, None, None]
        k, v = k.masked_fill(rows, 0.0), v.masked_fill(rows, 0.0)
    if not ordered:
        order = residue_position(torch.arange(n, device=q.device), n, modulus)
        q, k, v = (x.index_select(1, order) for x in (q, k, v))
    score_mod, mask_mod = residue_mods(branches, n, modulus, is_causal, key_padding_mask, ordered)
    mask = BlockMask(block_mask.seq_lengths, *_mask_arrays(block_mask), BLOCK_SIZE=block_mask.BLOCK_SIZE,
                     mask_mod=mask_mod)
    out = attend(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod, block_mask=mask,
        scale=scale, enable_gqa=q.shape[2] != k.shape[2], kernel_options=kernel_options,
    ).transpose(1, 2)  # (B, n, H, d_v) in residue order
    if not ordered:
        out = out.index_select(1, residue_index(torch.arange(n, device=q.device), n, modulus))
    return out


def _mask_arrays(mask: BlockMask) -> tuple[Optional[Tensor], ...]:
    """The eight index arrays of a BlockMask, in its constructor's order (the bridge's one list)."""
    return tuple(getattr(mask, name) for name in BLOCK_MASK_FIELDS)


@torch.compiler.assume_constant_result
def _baked_mask_arrays(num_heads: int, flat_plan: tuple[int, ...], seq_len: int, block_size: int, is_causal: bool,
                       with_full: bool, device: str) -> tuple[Optional[Tensor], ...]:
    """``residue_block_mask``'s arrays, called by dynamo at trace time when a
    caller compiles a model around this path: the graph holds them as
    constants, so no cache, lock or layout build runs in it (as the
    block-sparse modules' ``baked_block_mask``). The plan comes as its flat
    ints: dynamo passes plain ints to such a function, not nested tuples."""
    plan = DilatedPlan.from_flat(num_heads, flat_plan)
    return _mask_arrays(residue_block_mask(plan, seq_len, block_size, is_causal, with_full, torch.device(device)))


# torch.export (and so AOTInductor) of this path fails inside torch 2.13 (a
# data-dependent guard on the residue layout at a static length,
# "unhashable type: non-nested SymInt" with a Dim): refused up front instead.
FLEX_NOT_EXPORTED = (
    "implementation='flex' (dilated_flex_attention) cannot be exported: torch.export and AOTInductor trace "
    "FlexAttention's residue layout as data-dependent; export implementation='fast', the same function "
    "('auto' exports as 'fast')"
)


def _check_fused_inputs(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], block_size: object) -> int:
    """ValueError naming the argument unless the call suits the fused path; the block size as an int."""
    if torch.compiler.is_exporting():
        raise ValueError(FLEX_NOT_EXPORTED)
    check_attention_inputs(q, k, k, key_padding_mask)  # v apart: its head_dim may differ
    if not isinstance(v, Tensor):
        raise ValueError(f"v must be a torch.Tensor, got {type(v).__name__}")
    if v.dim() != 4 or v.shape[:3] != k.shape[:3] or v.dtype != k.dtype or v.device != k.device:
        raise ValueError(
            f"v must be (batch, kv_len, kv_heads, head_dim_v) with k's dtype and device; got {tuple(v.shape)} "
            f"{v.dtype} on {v.device}, k {tuple(k.shape)} {k.dtype} on {k.device}"
        )
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"the fused dilated path needs q_len == kv_len, got q_len={q.shape[1]}, kv_len={k.shape[1]}; "
            "decode and chunked prefill take the per-branch path (attention.dilated.dilated_attention), "
            "which costs a query row the keys it attends"
        )
    size = as_int(block_size)
    if size is None or size < 1 or size % FLEX_MIN_BLOCK:
        raise ValueError(f"block_size must be a positive multiple of {FLEX_MIN_BLOCK}, got {block_size!r}")
    if q.device.type == "cpu":
        if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"on the CPU flex_attention takes float32, float16 or bfloat16, got dtype {q.dtype}")
        if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
            raise ValueError(
                "flex_attention has no CPU backward: for gradients on the CPU use the per-branch path "
                "(attention.dilated.dilated_attention), or run under torch.no_grad()"
            )
    return size


def dilated_flex_attention(
    q: Tensor, k: Tensor, v: Tensor, plan: DilatedPlan, *, is_causal: bool = False, scale: Optional[float] = None,
    key_padding_mask: Optional[Tensor] = None, ordered: bool = False, block_size: int = FUSED_BLOCK,
) -> Tensor:
    """Dilated attention (the function of ``attention.dilated.dilated_attention``)
    as one compiled flex call. q ``(B, n, H, d)``, k ``(B, n, H_kv, d)``, v
    ``(B, n, H_kv, d_v)``, ``key_padding_mask`` ``(B, n)`` bool (True =
    padding) -> ``(B, n, H, d_v)``. ``ordered``: every (B, n, ...) tensor in and
    out is in residue order (``attention.residue.to_residue_order`` with
    ``residue_modulus`` of the plan's rates)."""
    block_size = _check_fused_inputs(q, k, v, key_padding_mask, block_size)
    check_plan(plan, q.shape[2])
    is_causal = check_is_causal(is_causal)
    if not isinstance(ordered, bool):
        raise ValueError(f"ordered must be True or False, got {ordered!r}")
    scale = default_scale(q, check_softmax_scale(scale))
    n = q.shape[1]
    if n < FLEX_MIN_BLOCK:
        raise ValueError(f"the fused dilated path needs at least {FLEX_MIN_BLOCK} tokens, got {n}; shorter "
                         "sequences take the per-branch path (attention.dilated.dilated_attention)")
    # A sequence shorter than one block: flex (CPU, torch 2.13) computes wrong rows (measured: n 40, block
    # 48 or 64, errors of 1.0 against the reference; n 40, block 32 exact), so the block shrinks to fit.
    block_size = min(block_size, n // FLEX_MIN_BLOCK * FLEX_MIN_BLOCK)
    modulus = residue_modulus(g.rate for g in plan.groups)
    if q.device.type == "cpu":  # no gradients here (checked): CPU flex refuses inputs that require grad at all
        q, k, v = q.detach(), k.detach(), v.detach()
    if torch.compiler.is_compiling():  # inside a caller's graph: the mask is a trace-time constant
        arrays = _baked_mask_arrays(plan.num_heads, tuple(plan.flat), n, block_size, is_causal,
                                    key_padding_mask is None, str(q.device))
        mask = BlockMask((n, n), *arrays, BLOCK_SIZE=(block_size, block_size))
    else:
        mask = residue_block_mask(plan, n, block_size, is_causal, key_padding_mask is None, q.device)
    return fused_forward(q, k, v, mask, key_padding_mask, plan_branches(plan), modulus, is_causal, scale, ordered,
                         attend=compiled_flex(q.device.type), kernel_options=flex_tiles(block_size) or None)
