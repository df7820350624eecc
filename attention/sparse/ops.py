"""The custom operators of block-sparse attention, its autograd Functions
(with ``torch.func`` rules) and the functional API ``block_sparse_attention``.

Operators, opaque to dynamo, each with a fake implementation that gives
shapes (docs/design.md section 4):

- ``attention::sparse_forward`` / ``attention::sparse_backward``: the tiles
  (attention/sparse/tiles.py). Their ``group_rows`` / ``group_keys`` lists
  carry ``row_groups`` precomputed by the caller (a graph holds them as
  constants, so the call makes no device-to-host sync); None (or empty
  lists, as programs saved before took): the operator groups the rows
  itself (one sync). None, not an empty list, is what a graph with a
  symbolic length passes: AOTInductor's runtime hands an empty ``Tensor[]``
  argument over as None (torch 2.13), which the ``Tensor[]?`` schema takes.
- ``attention::sparse_layout`` / ``attention::sparse_block_mask``: a store
  lookup by description, for graphs whose length is symbolic only
  (``dynamic=True``, ``torch.export`` with a ``Dim``), which cannot bake a
  layout at trace time (attention/sparse/layouts.py). After the first call at
  a length it is a lock-free cache hit; the first call reads the store.

``torch.func``: the autograd Functions have ``setup_context`` and explicit
``vmap`` rules that fold the vmapped dimension into the batch dimension (one
operator call for the whole vmapped batch: attention is independent across
the batch and the layout is shared by it). ``generate_vmap_rule`` would run
the forward under vmap, where the operators have no batching rule. A layout
batched by vmap is refused. The backward Function refuses a second backward
with a message; it has the same vmap rule, so ``vmap(grad(...))`` and
``jacrev`` work.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from attention.kernels.softmax_parts import accumulate_dtype
from attention.checks import check_attention_inputs, check_dropout, check_is_causal, check_softmax_scale, default_scale
from attention.sparse.layouts import source
from attention.sparse.tiles import sparse_backward, sparse_forward, tiles_sinks_grad, with_sinks
from attention.checks import check_count
from attention.checks import check_sinks, check_softcap
from attention.packed import check_cu_seqlens
from attention.sparse.packed import packed_sparse_attention

__all__ = ["block_sparse_attention", "sparse_attention", "layout_op", "block_mask_op",
           "BLOCK_MASK_ARRAYS"]


def _groups(rows: Optional[list[Tensor]], keys: Optional[list[Tensor]]) -> list[tuple[Tensor, Tensor]]:
    return list(zip(rows or [], keys or []))


# ------------------------------------------------------------ the tiles
# Written out: schema inference takes no optional tensor list (torch 2.13).
_FORWARD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor kv_num_blocks, Tensor kv_indices, Tensor[]? group_rows, "
                   "Tensor[]? group_keys, Tensor? key_padding_mask, Tensor? dropout_seed, SymInt block_size, "
                   "bool causal, float scale, float dropout_p, bool trusted_layout, str? backend, float? softcap=None, "
                   "Tensor? sinks=None) -> (Tensor, Tensor)")
_BACKWARD_SCHEMA = ("(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor kv_num_blocks, "
                    "Tensor kv_indices, Tensor[]? group_rows, Tensor[]? group_keys, Tensor? key_padding_mask, "
                    "Tensor? dropout_seed, SymInt block_size, bool causal, float scale, float dropout_p, "
                    "bool trusted_layout, str? backend, float? softcap=None) -> (Tensor, Tensor, Tensor)")


@torch.library.custom_op("attention::sparse_forward", mutates_args=(), schema=_FORWARD_SCHEMA)
def forward_op(
    q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
    group_rows: Optional[list[Tensor]], group_keys: Optional[list[Tensor]],
    key_padding_mask: Optional[Tensor], dropout_seed: Optional[Tensor],
    block_size: int, causal: bool, scale: float, dropout_p: float, trusted_layout: bool,
    backend: Optional[str], softcap: Optional[float] = None, sinks: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """``(out (b, q_len, h, v_dim), lse (b, h, q_len))``: ``attention.sparse.tiles.sparse_forward``, with ``sinks``
    ``(h,)`` merged in (``attention.kernels.sinks``: the backward takes these as the final out and lse)."""
    out, lse = sparse_forward(q, k, v, kv_num_blocks, kv_indices, _groups(group_rows, group_keys), key_padding_mask,
                              dropout_seed, block_size, causal, scale, dropout_p, trusted_layout, backend, softcap)
    return with_sinks(out, lse, sinks)


def _forward_fake(q: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    b, q_len, h, _ = q.shape
    return q.new_empty(b, q_len, h, v.shape[-1]), q.new_empty(b, h, q_len, dtype=accumulate_dtype(q.dtype))


@forward_op.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, group_rows, group_keys, key_padding_mask, dropout_seed,
      block_size, causal, scale, dropout_p, trusted_layout, backend, softcap=None, sinks=None):
    return _forward_fake(q, v)


@torch.library.custom_op("attention::sparse_backward", mutates_args=(), schema=_BACKWARD_SCHEMA)
def backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    kv_num_blocks: Tensor, kv_indices: Tensor, group_rows: Optional[list[Tensor]],
    group_keys: Optional[list[Tensor]],
    key_padding_mask: Optional[Tensor], dropout_seed: Optional[Tensor],
    block_size: int, causal: bool, scale: float, dropout_p: float, trusted_layout: bool,
    backend: Optional[str], softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``attention::sparse_forward``'s ``out`` with respect to ``q, k, v``."""
    return sparse_backward(grad_out, q, k, v, out, lse, kv_num_blocks, kv_indices, _groups(group_rows, group_keys),
                           key_padding_mask, dropout_seed, block_size, causal, scale, dropout_p, trusted_layout,
                           backend, softcap)


@backward_op.register_fake
def _(grad_out, q, k, v, out, lse, kv_num_blocks, kv_indices, group_rows, group_keys, key_padding_mask,
      dropout_seed, block_size, causal, scale, dropout_p, trusted_layout, backend, softcap=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# ----------------------------------------------------------- the lookups
def _layout(q: Tensor, k: Tensor, description: str, causal: bool) -> tuple[Tensor, Tensor]:
    """``(kv_num_blocks, kv_indices)`` of the layouts ``description`` names
    for the key length of ``k``, the head count of ``q`` and their device."""
    kv_num_blocks, kv_indices = source(description).layout(k.shape[1], q.shape[2], q.device, causal)
    # An operator's outputs belong to its caller: a compiled graph may reuse a
    # dead output's memory for another buffer. Handing out the cached tensors
    # themselves could overwrite them; a copy costs O(nb + nnz) int32s.
    return kv_num_blocks.clone(), kv_indices.clone()


def _layout_fake(q: Tensor, k: Tensor, description: str) -> tuple[Tensor, Tensor]:
    """Both sizes unbacked: a block count written as ``ceil(n / block_size)``
    of a symbolic length would make export guard it >= 2 (sizes 0 and 1 are
    specialized), raising the floor of a ``Dim`` to ``block_size + 1``."""
    layouts = source(description)
    ctx = torch.library.get_ctx()
    nb, nnz = ctx.new_dynamic_size(), ctx.new_dynamic_size()
    return (q.new_empty(q.shape[2] if layouts.per_head else 1, nb, dtype=torch.int32),
            q.new_empty(nnz, dtype=torch.int32))


layout_op = torch.library.custom_op("attention::sparse_layout", _layout, mutates_args=())
layout_op.register_fake(lambda q, k, description, causal: _layout_fake(q, k, description))

BLOCK_MASK_ARRAYS = 8  # len(flex.BLOCK_MASK_FIELDS)


def _block_mask(q: Tensor, k: Tensor, description: str, causal: bool, padded: bool) -> list[Tensor]:
    """The ``flex.BLOCK_MASK_FIELDS`` arrays of the kept ``BlockMask`` for the
    length, head count and device of ``q`` (copies, as in ``_layout``)."""
    from attention.block_mask import BLOCK_MASK_FIELDS

    mask = source(description).block_mask(k.shape[1], q.shape[2], q.device, causal, padded)
    return [getattr(mask, name).clone() for name in BLOCK_MASK_FIELDS]


def _block_mask_fake(q: Tensor, k: Tensor, description: str) -> list[Tensor]:
    layouts = source(description)
    heads = q.shape[2] if layouts.per_head else 1
    nb = (k.shape[1] + layouts.block_size - 1) // layouts.block_size
    shapes = [(1, heads, nb), (1, heads, nb, nb)] * (BLOCK_MASK_ARRAYS // 2)
    return [q.new_empty(shape, dtype=torch.int32) for shape in shapes]


block_mask_op = torch.library.custom_op("attention::sparse_block_mask", _block_mask, mutates_args=())
block_mask_op.register_fake(lambda q, k, description, causal, padded: _block_mask_fake(q, k, description))


# --------------------------------------------------------------- autograd
def _fold(x: Optional[Tensor], dim: Optional[int], size: int) -> Optional[Tensor]:
    """A vmapped tensor (vmap dimension ``dim``, None: not vmapped) with the
    vmap dimension folded into its batch dimension: ``(size * b, ...)``."""
    if x is None:
        return None
    x = x.movedim(dim, 0) if dim is not None else x.expand(size, *x.shape)
    return x.reshape(size * x.shape[1], *x.shape[2:])


def _unfold(x: Tensor, size: int) -> Tensor:
    return x.view(size, x.shape[0] // size, *x.shape[1:])


def _refuse_batched_layout(in_dims: tuple) -> None:
    """in_dims of kv_num_blocks, kv_indices, group_rows, group_keys (lists: a list of dims or None)."""
    flat = [d for dims in in_dims for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    if any(d is not None for d in flat):
        raise ValueError("block-sparse attention under vmap takes one layout for the whole vmapped batch; "
                         "kv_num_blocks and kv_indices must not be vmapped")


class SparseFunction(torch.autograd.Function):
    """``attention::sparse_forward`` under autograd (``setup_context``: the
    form ``torch.func`` accepts); its backward feeds the FINAL ``out`` and
    ``lse`` to ``attention::sparse_backward``. Its arguments are the
    operator's, each named: dynamo binds an autograd.Function's arguments by
    its signature, and a ``*args`` there made it pass the context as one."""

    @staticmethod
    def forward(q, k, v, kv_num_blocks, kv_indices, group_rows, group_keys, key_padding_mask, dropout_seed,
                block_size, causal, scale, dropout_p, trusted_layout, backend, softcap, sinks):
        return forward_op(q, k, v, kv_num_blocks, kv_indices, group_rows, group_keys, key_padding_mask,
                          dropout_seed, block_size, causal, scale, dropout_p, trusted_layout, backend, softcap, sinks)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, v, kv_num_blocks, kv_indices, group_rows, group_keys, key_padding_mask, dropout_seed, *options = inputs
        # Every tensor through save_for_backward (dynamo traces no tensor kept as a ctx attribute).
        ctx.save_for_backward(q, k, v, output[0], output[1], kv_num_blocks, kv_indices, key_padding_mask,
                              dropout_seed, options[-1], *(group_rows or []), *(group_keys or []))
        ctx.groups, ctx.options = len(group_rows or []), options[:-1]

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_lse: Optional[Tensor]):
        q, k, v, out, lse, kv_num_blocks, kv_indices, key_padding_mask, dropout_seed, sinks, *groups = \
            ctx.saved_tensors
        rows, keys = (list(groups[:ctx.groups]), list(groups[ctx.groups:])) if ctx.groups else (None, None)
        block_size, causal, scale, dropout_p, trusted_layout, backend, softcap = ctx.options
        dq, dk, dv = SparseBackwardFunction.apply(grad_out, q, k, v, out, lse, kv_num_blocks, kv_indices, rows, keys,
                                                  key_padding_mask, dropout_seed, block_size, causal, scale,
                                                  dropout_p, trusted_layout, backend, softcap)
        d_sinks = None
        if sinks is not None and ctx.needs_input_grad[16]:
            d_sinks = tiles_sinks_grad(grad_out, out, lse, sinks)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None, None, None, d_sinks

    @staticmethod
    def vmap(info, in_dims, q, k, v, kv_num_blocks, kv_indices, group_rows, group_keys, key_padding_mask,
             dropout_seed, block_size, causal, scale, dropout_p, trusted_layout, backend, softcap, sinks):
        _refuse_batched_layout(in_dims[3:7])
        if in_dims[16] is not None:
            raise ValueError("block-sparse attention under vmap takes one set of sinks for the whole vmapped batch")
        size = info.batch_size
        q_, k_, v_ = (_fold(x, d, size) for x, d in zip((q, k, v), in_dims[:3]))
        out, lse = SparseFunction.apply(q_, k_, v_, kv_num_blocks, kv_indices, group_rows, group_keys,
                                        _fold(key_padding_mask, in_dims[7], size), dropout_seed, block_size,
                                        causal, scale, dropout_p, trusted_layout, backend, softcap, sinks)
        return (_unfold(out, size), _unfold(lse, size)), (0, 0)


class SparseBackwardFunction(torch.autograd.Function):
    """``attention::sparse_backward`` under autograd: differentiating it again
    (double backward) is refused with a message instead of a silent wrong
    zero; vmapped like ``SparseFunction``."""

    @staticmethod
    def forward(grad_out, q, k, v, out, lse, kv_num_blocks, kv_indices, group_rows, group_keys, key_padding_mask,
                dropout_seed, block_size, causal, scale, dropout_p, trusted_layout, backend, softcap):
        return backward_op(grad_out, q, k, v, out, lse, kv_num_blocks, kv_indices, group_rows, group_keys,
                           key_padding_mask, dropout_seed, block_size, causal, scale, dropout_p, trusted_layout,
                           backend, softcap)

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

    @staticmethod
    def vmap(info, in_dims, grad_out, q, k, v, out, lse, kv_num_blocks, kv_indices, group_rows, group_keys,
             key_padding_mask, dropout_seed, block_size, causal, scale, dropout_p, trusted_layout, backend, softcap):
        _refuse_batched_layout(in_dims[6:10])
        size = info.batch_size
        folded = [_fold(x, d, size) for x, d in zip((grad_out, q, k, v, out, lse), in_dims[:6])]
        grads = SparseBackwardFunction.apply(*folded, kv_num_blocks, kv_indices, group_rows, group_keys,
                                             _fold(key_padding_mask, in_dims[10], size), dropout_seed, block_size,
                                             causal, scale, dropout_p, trusted_layout, backend, softcap)
        return tuple(_unfold(g, size) for g in grads), (0, 0, 0)


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
                     groups: list[tuple[Tensor, Tensor]], block_size: int, causal: bool, scale: float,
                     dropout_p: float, key_padding_mask: Optional[Tensor], trusted_layout: bool,
                     softcap: Optional[float] = None, sinks: Optional[Tensor] = None) -> Tensor:
    """``block_sparse_attention`` after its checks (the module's path too):
    ``groups`` precomputed (``LayoutPlan.groups``) or empty."""
    seed = torch.randint(0, 1 << 62, (), dtype=torch.int64) if dropout_p > 0 else None
    rows, keys = ([r for r, _ in groups], [c for _, c in groups]) if groups else (None, None)
    out, _ = SparseFunction.apply(
        q, k, v, kv_num_blocks, kv_indices, rows, keys, key_padding_mask,
        seed, block_size, causal, float(scale), dropout_p, trusted_layout, None, softcap, sinks,
    )
    return out


# ------------------------------------------------------ functional core
def block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor, block_size: int, *,
    causal: bool = False, softmax_scale: float | None = None, dropout_p: float = 0.0,
    key_padding_mask: Tensor | None = None, softcap: float | None = None, sinks: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """Attention of ``q (b, q_len, h, d)`` over ``k (b, kv_len, h_kv, d)``,
    ``v (b, kv_len, h_kv, v_dim)`` restricted to a block layout
    (attention/sparse/module.py): returns ``(b, q_len, h, v_dim)``.

    ``kv_num_blocks`` int32 ``[H, ceil(kv_len / block_size)]`` with ``H`` in
    {1, h}, ``kv_indices`` int32 ``[sum(kv_num_blocks)]``, both on ``q``'s
    device. Query rows are the last ``q_len`` positions. ``causal`` adds key
    <= query. ``softmax_scale`` defaults to ``d ** -0.5``. ``dropout_p`` drops
    attention probabilities (pass 0.0 in evaluation). ``key_padding_mask``
    bool ``(b, kv_len)``, True where a key must be ignored. ``softcap`` caps
    the scaled scores, ``c * tanh(s / c)``; ``sinks`` ``(h,)`` are logits that
    join each row's softmax denominator only (``attention.kernels.sinks``). Float16/bfloat16
    inputs are computed in float32 and returned in their dtype.

    ``cu_seqlens`` (1-D integer ``[0, end_1, ..., total]``, batch 1,
    ``q_len == kv_len``): packed documents, none attending another. The
    given layout is then every document's CORNER layout: document ``i`` of
    ``nb_i = ceil(len_i / block_size)`` blocks gets the layout's rows ``<
    nb_i`` restricted to key blocks ``< nb_i``, with its first block at its
    first token (what a prefix-stable kind's layout at the document's own
    length is; attention/sparse/packed.py). ``key_padding_mask`` is ``(1,
    total)``; ``softcap`` and ``sinks`` as without it.
    """
    check_attention_inputs(q, k, v, key_padding_mask)
    softcap, sinks = check_softcap(softcap), check_sinks(sinks, q)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, q, k)
    b, q_len, h, d = q.shape
    block_size = check_count("block_size", block_size)
    nb = (k.shape[1] + block_size - 1) // block_size
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
    if cu_seqlens is not None:
        return packed_sparse_attention(q, k, v, cu_seqlens, key_padding_mask, layout=(kv_num_blocks, kv_indices),
                                       block_size=block_size, causal=check_is_causal(causal), scale=scale,
                                       dropout_p=dropout_p, softcap=softcap, sinks=sinks)
    return sparse_attention(q, k, v, kv_num_blocks, kv_indices, [], block_size, check_is_causal(causal), scale,
                            dropout_p, key_padding_mask, trusted_layout=False, softcap=softcap, sinks=sinks)
