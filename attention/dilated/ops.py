"""The dilated custom ops and their autograd, in the ``attention::`` namespace:

- ``attention::dilated_forward(q, k, v, key_padding_mask, flat_plan,
  is_causal, scale, softcap=None, sinks=None) -> (out, lse)``: the fast
  path (``attention.dilated.fast``); with ``sinks`` ``(h,)`` the out and lse are
  those with the sinks merged in (``attention.kernels.sinks``), which the backward
  takes as the final ones;
- ``attention::dilated_backward(grad_out, q, k, v, out, lse,
  key_padding_mask, flat_plan, is_causal, scale, softcap=None) -> (dq, dk, dv)``;
- ``attention::dilated_reference(...)``: the reference path (no dropout) as
  one op with ``dilated_forward``'s signature: what the reference
  implementation runs under ``torch.compile``, so the graph does not follow
  the length through the reference's Python loops.

``flat_plan`` is ``DilatedPlan.flat`` (the group rows back to back, the same
at every length), so a graph holding these ops is length-free. Every op is
opaque to ``torch.compile`` and does no store I/O.

Transforms. Each op has a vmap rule that folds the vmapped dimension into the
batch dimension (the ops treat batch rows independently, so this is exact
and one call, where the per-sample fallback would loop). The forward ops get
their gradient from ``dilated_backward`` fed the final ``out`` and ``lse``
(exact for the combined softmax); ``DilatedFunction`` is the same autograd
as a ``torch.autograd.Function`` with ``setup_context`` and
``generate_vmap_rule=True`` (its forward only calls ops that have vmap
rules), so ``grad``, ``vjp``, ``vmap``, ``vmap(grad)`` and ``jacrev`` compose.
Double backward raises a clear error (``NoDoubleBackward``), also under vmap.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from attention.dilated.fast import backward_groups, forward_groups
from attention.dilated.plan import DilatedPlan, check_plan, groups_from_flat
from attention.dilated.reference import reference_attention
from attention.checks import check_attention_inputs, check_is_causal, check_softmax_scale, default_scale
from attention.kernels.softmax_parts import lse_dtype
from attention.checks import check_sinks, check_softcap
from attention.kernels.sinks import apply_sinks, sinks_grad
from attention.dilated.packed import dilated_packed_forward
from attention.packed import check_cu_seqlens

__all__ = ["dilated_attention", "fast_attention", "dilated_forward", "dilated_backward", "dilated_reference",
           "DilatedFunction", "NoDoubleBackward"]


# ------------------------------------------------------------ the ops
def _forward(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], flat_plan: list[int],
    is_causal: bool, scale: float, softcap: Optional[float] = None, sinks: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """-> (out (b, q_len, h, d_v) in q's dtype, lse (b, q_len, h))."""
    out, lse = forward_groups(q, k, v, key_padding_mask, groups_from_flat(flat_plan), is_causal, scale, softcap=softcap)
    return (out, lse) if sinks is None else apply_sinks(out, lse, sinks)


def _reference(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], flat_plan: list[int],
    is_causal: bool, scale: float, softcap: Optional[float] = None, sinks: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """``reference_attention`` (no dropout) -> (out, lse)."""
    plan = DilatedPlan.from_flat(q.shape[2], flat_plan)
    return reference_attention(q, k, v, plan, is_causal, scale, key_padding_mask, 0.0, with_lse=True,
                               softcap=softcap, sinks=sinks)


def _backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    key_padding_mask: Optional[Tensor], flat_plan: list[int], is_causal: bool, scale: float,
    softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), each group's kernel backward fed the final ``out`` and
    ``lse`` at its rows, summed in place in the inputs' dtype."""
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    backward_groups(grad_out, q, k, v, out, lse, key_padding_mask, groups_from_flat(flat_plan), is_causal, scale,
                    dq, dk, dv, softcap=softcap)
    return dq, dk, dv


def _forward_fake(q, k, v, key_padding_mask, flat_plan, is_causal, scale, softcap=None, sinks=None):
    return q.new_empty((*q.shape[:3], v.shape[-1])), q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype))


def _backward_fake(grad_out, q, k, v, out, lse, key_padding_mask, flat_plan, is_causal, scale, softcap=None):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _fold(x: Tensor, dim: Optional[int], size: int) -> Tensor:
    """(size, b, ...) folded to (size * b, ...): the vmapped dim moved in front
    of the batch dim (an input vmap does not batch is repeated)."""
    x = x.movedim(dim, 0) if dim is not None else x.expand(size, *x.shape)
    return x.flatten(0, 1)


def _folding_vmap(op, batched: int):
    """The rule of an op whose first ``batched`` arguments have a batch
    dimension (a later tensor, the sinks, is per head: never vmapped)."""
    def rule(info, in_dims, *args):
        size = info.batch_size
        if any(d is not None for a, d in zip(args[batched:], in_dims[batched:]) if isinstance(a, Tensor)):
            raise ValueError("dilated attention under vmap takes one set of sinks for the whole vmapped batch")
        folded = [_fold(a, d, size) if isinstance(a, Tensor) and i < batched else a
                  for i, (a, d) in enumerate(zip(args, in_dims))]
        outputs = op(*folded)
        return tuple(o.unflatten(0, (size, -1)) for o in outputs), (0,) * len(outputs)
    return rule


def _setup(ctx, inputs, output) -> None:
    q, k, v, key_padding_mask, flat_plan, is_causal, scale, softcap, sinks = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)  # internal: the modules return only ``out``
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, sinks)
    ctx.flat_plan, ctx.is_causal, ctx.scale, ctx.softcap = flat_plan, is_causal, scale, softcap


def _gradients(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding_mask, sinks = ctx.saved_tensors
    with torch.no_grad():
        grads = dilated_backward(grad_out, q, k, v, out, lse, key_padding_mask, ctx.flat_plan, ctx.is_causal,
                                 ctx.scale, ctx.softcap)
        d_sinks = None if sinks is None or not ctx.needs_input_grad[8] else sinks_grad(grad_out, out, lse, sinks)
    anchors = [x for x in (grad_out, q, k, v) if x.requires_grad]
    if torch.is_grad_enabled() and anchors:
        # create_graph: gradients that depend on the inputs through a node
        # whose backward names the limit (instead of a silent detach).
        grads = NoDoubleBackward.apply(anchors[0], *grads)
    return (*grads, None, None, None, None, None, d_sinks)


def _define(name: str, function, fake, autograd: bool, batched: int):
    op = torch.library.custom_op(name, function, mutates_args=())
    op.register_fake(fake)
    op.register_vmap(_folding_vmap(op, batched))
    if autograd:
        op.register_autograd(_gradients, setup_context=_setup)
    return op


dilated_backward = _define("attention::dilated_backward", _backward, _backward_fake, autograd=False, batched=7)
dilated_forward = _define("attention::dilated_forward", _forward, _forward_fake, autograd=True, batched=4)
dilated_reference = _define("attention::dilated_reference", _reference, _forward_fake, autograd=True, batched=4)


# ------------------------------------------------------------ autograd
class DilatedFunction(torch.autograd.Function):
    """``dilated_forward`` with its gradient as an autograd Function:
    ``torch.compile`` traces it into the graph around the opaque ops, and
    ``torch.func`` transforms take it (module docstring)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, key_padding_mask, flat_plan, is_causal, scale, softcap, sinks):  # type: ignore[override]
        return dilated_forward(q, k, v, key_padding_mask, flat_plan, is_causal, scale, softcap, sinks)

    setup_context = staticmethod(_setup)
    backward = staticmethod(_gradients)


class NoDoubleBackward(torch.autograd.Function):
    """Identity on ``grads`` whose backward is a clear error (double backward
    of the dilated ops); ``anchor``, an input that requires grad, attaches
    it. Its vmap rule is generated (identity views), so ``vmap(grad)`` runs."""

    generate_vmap_rule = True

    @staticmethod
    def forward(anchor, *grads):  # type: ignore[override]
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        raise RuntimeError(
            "double backward (gradients of gradients) of the dilated custom ops (the fast path, and the "
            "reference under torch.compile) is not supported; DilatedAttention(implementation='reference') "
            "supports it in eager mode"
        )


# ------------------------------------------------------------ functional API
def dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: DilatedPlan,
    *,
    is_causal: bool = False,
    softmax_scale: Optional[float] = None,
    key_padding_mask: Optional[Tensor] = None,
    softcap: Optional[float] = None,
    sinks: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
) -> Tensor:
    """The same function as ``dilated_attention_reference`` (no dropout),
    fast: fused kernels on strided views, in-place merge, memory bounded by
    chunking. Exact gradients for q, k, v (and ``sinks``) through
    ``torch.autograd`` and ``torch.func``. v may have its own head_dim: the
    output has v's. ``softcap``, ``sinks``: ``attention.kernels.sinks``.
    ``cu_seqlens``: packed documents (``attention.packed``), each attended as
    a sequence of its own (``attention.dilated.packed``; autograd only, no
    vmap), ``softcap`` and ``sinks`` as without it."""
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, q, k)
    check_attention_inputs(q, k, v, key_padding_mask)
    check_plan(plan, q.shape[2])
    is_causal = check_is_causal(is_causal)
    scale = default_scale(q, check_softmax_scale(softmax_scale))
    softcap, sinks = check_softcap(softcap), check_sinks(sinks, q)
    if cu_seqlens is not None:
        return dilated_packed_forward(q, k, v, key_padding_mask, cu_seqlens, list(plan.flat), is_causal, scale,
                                      softcap, sinks)[0]
    return fast_attention(q, k, v, plan.flat, is_causal, scale, key_padding_mask, softcap, sinks)


def fast_attention(q: Tensor, k: Tensor, v: Tensor, flat_plan: Sequence[int], is_causal: bool, scale: float,
                   key_padding_mask: Optional[Tensor], softcap: Optional[float] = None,
                   sinks: Optional[Tensor] = None) -> Tensor:
    """Unchecked core of ``dilated_attention``."""
    out, _ = DilatedFunction.apply(q, k, v, key_padding_mask, list(flat_plan), is_causal, scale, softcap, sinks)
    return out
