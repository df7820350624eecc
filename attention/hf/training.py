"""The training path of a compiled Hugging Face layer (``attention.hf``):
a forward that returns what its backward needs, and that backward.

Under ``torch.compile`` / ``torch.export`` a layer is one opaque custom op.
When its inputs require gradients the op is ``attention::hf_attend_lse``:
the padded forward (``attention.hf.padding``) that also returns each query
row's log-sum-exp (``attention.hf.traced`` merges a layer's sinks into
both), and whose autograd saves ``(query, key, value, out, lse)``; its backward, ``attention::hf_attend_backward``, runs the kernels'
backward from that saved ``out`` and ``lse`` over the same padded runs: no
second forward.

Guarantees:
- exact: the gradients the eager model gets (the modules' own backward
  kernels, fed the final ``out`` and ``lse`` of each run; with sinks, the
  ``out`` and ``lse`` after them);
- the ops return what their fake kernels say: ``out`` contiguous ``(batch,
  q_len, heads, head_dim_v)`` in the query's dtype, ``lse`` contiguous
  ``(batch, q_len, heads)`` in ``lse_dtype`` (float64 for float64, else
  float32), gradients contiguous in the shapes of transformers' query, key
  and value ``(batch, heads, seq, head_dim)`` whatever their strides;
- padded query rows output 0, get log-sum-exp -inf and zero gradient; cache
  rows past the fill level get zero gradient.
Limits: block-sparse modules run their tiles ("gather" path) here on every
device (the CUDA flex path keeps no log-sum-exp a backward can take); the
modules are built without dropout (``attention.hf`` refuses dropout under
compile).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from attention.dilated.module import DilatedAttention
from attention.dilated.ops import dilated_backward, dilated_forward
from attention.hf.padding import PaddedRun, padded_runs, unpadded
from attention.checks import check_attention_inputs, default_scale
from attention.kernels.softmax_parts import lse_dtype
from attention.sparse.module import BlockSparseAttention
from attention.sparse.ops import backward_op, forward_op

__all__ = ["attend_with_lse", "attend_backward"]


def _views(query: Tensor, key: Tensor, value: Tensor, filled: int) -> tuple[Tensor, Tensor, Tensor]:
    """transformers' (batch, heads, seq, head_dim) as the modules' (batch, seq, heads, head_dim) views of the filled rows."""
    return query.transpose(1, 2), key[:, :, :filled].transpose(1, 2), value[:, :, :filled].transpose(1, 2)


def _run_inputs(run: PaddedRun, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return q[run.rows, run.first_query:], k[run.rows, run.start:], v[run.rows, run.start:]


def attend_with_lse(attention: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                    attention_mask: Optional[Tensor], is_causal: bool) -> tuple[Tensor, Tensor]:
    """``attend_padded``'s output and its log-sum-exp (module docstring)."""
    batch, heads, q_len, _ = query.shape
    filled, runs = padded_runs(attention_mask, batch, q_len, key.shape[2])
    q, k, v = _views(query, key, value, filled)
    if unpadded(runs, batch):  # the kernels' outputs as they are (contiguous: the fake kernel's promise)
        with torch.no_grad():
            out, lse = _forward(attention, q, k, v, is_causal, None)
        return out.contiguous(), lse.contiguous()
    out = query.new_zeros(batch, q_len, heads, value.shape[-1])
    lse = torch.full((batch, q_len, heads), float("-inf"), dtype=lse_dtype(query.dtype), device=query.device)
    with torch.no_grad():
        for run in runs:
            run_out, run_lse = _forward(attention, *_run_inputs(run, q, k, v), is_causal, run.key_padding_mask)
            out[run.rows, run.first_query:] = run_out
            lse[run.rows, run.first_query:] = run_lse
    return out, lse


def attend_backward(attention: nn.Module, grad: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor,
                    lse: Tensor, attention_mask: Optional[Tensor], is_causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for transformers' query, key and value from the saved
    ``out`` and ``lse`` of ``attend_with_lse`` (module docstring)."""
    batch, _, q_len, _ = query.shape
    filled, runs = padded_runs(attention_mask, batch, q_len, key.shape[2])
    q, k, v = _views(query, key, value, filled)
    grads = tuple(torch.zeros(x.shape, dtype=x.dtype, device=x.device) for x in (query, key, value))
    dq, dk, dv = _views(*grads, filled)
    with torch.no_grad():
        for run in runs:
            rows, first, start = run.rows, run.first_query, run.start
            run_grads = _backward(attention, grad[rows, first:], *_run_inputs(run, q, k, v), out[rows, first:],
                                  lse[rows, first:], is_causal, run.key_padding_mask)
            for whole, part in zip((dq[rows, first:], dk[rows, start:], dv[rows, start:]), run_grads):
                whole.copy_(part)
    return grads


# ------------------------------------------------ one run, through the kernels
def _forward(attention: nn.Module, q: Tensor, k: Tensor, v: Tensor, is_causal: bool,
             key_padding_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(out (b, q_len, h, d_v), lse (b, q_len, h)) of one call of the module's function."""
    check_attention_inputs(q, k, v, key_padding_mask)
    if isinstance(attention, DilatedAttention):
        flat_plan, scale = _dilated_arguments(attention, q)
        return dilated_forward(q, k, v, key_padding_mask, flat_plan, is_causal, scale)
    if isinstance(attention, BlockSparseAttention):
        layout, options = _sparse_arguments(attention, q, k, is_causal)
        out, lse = forward_op(q, k, v, *layout, key_padding_mask, None, *options)
        return out, lse.transpose(1, 2)
    raise TypeError(f"no training path for {type(attention).__name__}")


def _backward(attention: nn.Module, grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              is_causal: bool, key_padding_mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of one call from its final ``out`` and ``lse`` (b, q_len, h)."""
    if isinstance(attention, DilatedAttention):
        flat_plan, scale = _dilated_arguments(attention, q)
        return dilated_backward(grad, q, k, v, out, lse, key_padding_mask, flat_plan, is_causal, scale)
    layout, options = _sparse_arguments(attention, q, k, is_causal)
    return backward_op(grad, q, k, v, out, lse.transpose(1, 2), *layout, key_padding_mask, None, *options)


def _dilated_arguments(attention: DilatedAttention, q: Tensor) -> tuple[list[int], float]:
    if attention.ordered:
        raise ValueError("the compiled training path takes natural order (a module with ordered=False)")
    return list(attention.plan(q.shape[2]).flat), default_scale(q, attention.softmax_scale)


def _sparse_arguments(attention: BlockSparseAttention, q: Tensor, k: Tensor, is_causal: bool) -> tuple[tuple, tuple]:
    """The tiles' layout arguments (kv_num_blocks, kv_indices, group rows,
    group keys) and options (block_size, causal, scale, dropout 0, trusted
    layout, default backend) for this call, as the module's forward takes them."""
    q_len, kv_len = q.shape[1], k.shape[1]
    causal = attention.causal(is_causal, q_len, kv_len)
    plan = attention.layouts.plan(kv_len, q.shape[2], q.device, causal, (kv_len - q_len) // attention.block_size)
    layout = (plan.kv_num_blocks, plan.kv_indices, [r for r, _ in plan.groups], [c for _, c in plan.groups])
    return layout, (attention.block_size, causal, default_scale(q, attention.softmax_scale), 0.0, True, None)
