"""The ops a compiled or exported Hugging Face model calls (``attention.hf``):
under ``torch.compile`` / ``torch.export`` a full-attention layer is one
opaque custom op of the ``attention::`` namespace.

- ``attention::hf_attend``: a decode step ``attention.hf.decode`` serves
  (one query row, the static cache's fixed-shape mask), with no host read,
  so a CUDA graph can capture it;
- ``attention::hf_attend_padded``: every other call without gradients,
  through the padded path (``attention.hf.padding``);
- ``attention::hf_attend_lse`` and its backward ``attention::hf_attend_backward``:
  the training path (``attention.hf.training``).

Guarantees:
- the graph holds only a key string per layer: ``traced_module_key`` runs
  at trace time (``assume_constant_result``) and builds the module, checks
  the settings and looks the pattern up there; at run time the op reads the
  module from a plain dict (no lock, no store lookup), and rebuilds it from
  the key where it is missing (``register()`` or the bound dropped it, or an
  exported program runs in another process): the key is portable;
- the row layout, the static cache's fill level and the padding are data,
  not graph structure: one graph serves every padding pattern;
- each forward op takes the layer's attention sinks (gpt-oss's ``s_aux``,
  one logit per query head, or None) and merges them as the eager module
  does; the training op saves the final out and log-sum-exp (sinks merged
  in), from which its backward gives query, key and value their exact
  gradients and the sinks theirs (``attention.kernels.sinks.sinks_grad``);
- each op returns exactly what its fake kernel says (shapes, strides,
  dtypes; tests/test_op_fakes.py), and its result is the eager layer's.
Limits: ``hf_attend_padded`` and the training ops read the row layout on the
host (tagged ``cudagraph_unsafe``: never captured); ``hf_attend`` and
``hf_attend_padded`` have no autograd (a layer whose inputs require grad
takes ``hf_attend_lse``).
"""

from __future__ import annotations

import json
from typing import Optional

import torch
from torch import Tensor, nn

from attention.caches import BoundedCache, process_cache
import attention.hf.decode as hf_decode
from attention.hf.modules import MAX_MODULES, attention_module
from attention.hf.padding import attend_padded
from attention.hf.training import attend_backward, attend_with_lse
from attention.kernels.sinks import apply_sinks, sinks_grad
from attention.kernels.softmax_parts import lse_dtype

__all__ = ["op_modules", "traced_capturable", "traced_module_key"]

# The ops' modules by key: traced_module_key fills it, register() empties it.
op_modules: BoundedCache[nn.Module] = process_cache(MAX_MODULES)


@torch.compiler.assume_constant_result
def traced_module_key(
    impl: str, frozen_settings: tuple, scaling: Optional[float], dropout: float,
    heads: tuple[int, int, int, int], is_causal: bool, softcap: Optional[float] = None,
) -> str:
    """The op's key for these settings, with the module built and kept and
    its pattern looked up for ``heads`` = (heads, kv_heads, head_dim,
    v_head_dim): one call on meta tensors (no compute), so the op's first
    run finds the plan in the module's cache instead of the store."""
    key = json.dumps([impl, frozen_settings, scaling, dropout, softcap])
    attention = op_modules.get(key)
    if attention is None:
        attention = op_modules.put(key, attention_module(impl, dict(frozen_settings), scaling, dropout, softcap))
    count, kv_count, head_dim, v_head_dim = heads
    q = torch.empty(1, 1, count, head_dim, device="meta")
    attention(q, q.new_empty(1, 1, kv_count, head_dim), q.new_empty(1, 1, kv_count, v_head_dim), is_causal=is_causal)
    return key


def _op_module(key: str) -> nn.Module:
    attention = op_modules.get(key)  # no lock: one dict read
    if attention is None:  # register() or the bound dropped it, or an exported program runs in a new process
        impl, frozen_settings, scaling, dropout, softcap = json.loads(key)
        attention = op_modules.put(key, attention_module(
            impl, {name: value for name, value in frozen_settings}, scaling, dropout, softcap
        ))
    return attention


@torch.compiler.assume_constant_result
def traced_capturable(module_key: str, device_type: str, one_row: bool, fixed_mask: bool, is_causal: bool) -> bool:
    """Whether the layer's op can run inside a CUDA-graph capture: a decode
    step ``attention.hf.decode`` serves on one of its devices (decided at trace time)."""
    probe = torch.empty(1, 2, 1, 1, device="meta") if fixed_mask else None  # serves reads the mask's shape
    return device_type in hf_decode.DEVICE_TYPES and hf_decode.serves(_op_module(module_key), 1 if one_row else 2,
                                                                      probe, is_causal)


# Tagged: inductor must not capture an op that reads the device on the host.
_HOST_READS = tuple(tag for tag in (getattr(torch.Tag, "cudagraph_unsafe", None),) if tag is not None)


def _attend(query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor], module_key: str,
            is_causal: bool, sinks: Optional[Tensor]) -> Tensor:
    attention = _op_module(module_key)
    with torch.no_grad():
        out = hf_decode.step(attention, query, key, value, attention_mask, is_causal, sinks)
    if out is None:
        raise ValueError("attention::hf_attend computes the decode steps attention.hf.decode serves (one query row, "
                         "the fixed-shape mask); attention::hf_attend_padded computes every other call")
    return out.contiguous()


@torch.library.custom_op("attention::hf_attend", mutates_args=())
def _attend_op(
    query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor], module_key: str, is_causal: bool,
    sinks: Optional[Tensor] = None,
) -> Tensor:
    """A decode step ``attention.hf.decode`` serves, with ``sinks`` (one
    logit per query head, or None): capturable (``traced_capturable`` chose it)."""
    return _attend(query, key, value, attention_mask, module_key, is_causal, sinks)


@torch.library.custom_op("attention::hf_attend_padded", mutates_args=(), tags=_HOST_READS)
def _attend_padded_op(
    query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor], module_key: str, is_causal: bool,
    sinks: Optional[Tensor] = None,
) -> Tensor:
    """A layer's attention through the padded path (host reads: never
    captured); ``sinks`` (one logit per query head, or None) as the module takes them."""
    attention = _op_module(module_key)
    with torch.no_grad():
        return attend_padded(attention, query, key, value, attention_mask, is_causal, sinks).contiguous()


def _attend_fake(query, key, value, attention_mask, module_key, is_causal, sinks=None):
    batch, heads, q_len, _ = query.shape
    return query.new_empty(batch, q_len, heads, value.shape[-1])


# No autograd: a traced layer whose inputs (sinks included) require grad takes attention::hf_attend_lse
# (a backward through these two raises torch's "no autograd formula was registered").
for _op in (_attend_op, _attend_padded_op):
    _op.register_fake(_attend_fake)


# The training path (attention.hf.training): the forward keeps its FINAL
# out and log-sum-exp (sinks merged in) and the backward starts from them.
@torch.library.custom_op("attention::hf_attend_lse", mutates_args=(), tags=_HOST_READS)
def _attend_lse_op(
    query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor], module_key: str, is_causal: bool,
    sinks: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """A layer's attention through the padded path, with each query row's
    log-sum-exp: ``(out (batch, q_len, heads, head_dim_v), lse (batch,
    q_len, heads))``, both contiguous; ``sinks`` (one logit per query head,
    or None) merged into both (``attention.kernels.sinks.apply_sinks``)."""
    out, lse = attend_with_lse(_op_module(module_key), query, key, value, attention_mask, is_causal)
    if sinks is None:
        return out, lse
    with torch.no_grad():
        return apply_sinks(out, lse, sinks)  # new contiguous tensors in out's and lse's dtypes


@_attend_lse_op.register_fake
def _(query, key, value, attention_mask, module_key, is_causal, sinks=None):
    batch, heads, q_len, _ = query.shape
    return (query.new_empty(batch, q_len, heads, value.shape[-1]),
            query.new_empty(batch, q_len, heads, dtype=lse_dtype(query.dtype)))


@torch.library.custom_op("attention::hf_attend_backward", mutates_args=(), tags=_HOST_READS)
def _attend_backward_op(
    grad: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
    attention_mask: Optional[Tensor], module_key: str, is_causal: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``attention::hf_attend_lse``'s ``out`` for query, key and
    value from its saved final ``out`` and ``lse`` (exact with sinks too: a
    sink is a key with a zero value, inside ``lse``): contiguous, in their shapes."""
    return attend_backward(_op_module(module_key), grad, query, key, value, out, lse, attention_mask, is_causal)


@_attend_backward_op.register_fake
def _(grad, query, key, value, out, lse, attention_mask, module_key, is_causal):
    return tuple(x.new_empty(x.shape) for x in (query, key, value))  # contiguous, as the real op's


def _attend_setup(ctx, inputs, output) -> None:
    query, key, value, attention_mask, ctx.module_key, ctx.is_causal, sinks = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)  # internal: the layer returns only ``out``
    ctx.save_for_backward(query, key, value, out, lse, attention_mask, sinks)


def _attend_backward(ctx, grad, grad_lse):
    query, key, value, out, lse, attention_mask, sinks = ctx.saved_tensors
    grads = _attend_backward_op(grad, query, key, value, out, lse, attention_mask, ctx.module_key, ctx.is_causal)
    d_sinks = sinks_grad(grad, out, lse, sinks) if sinks is not None and ctx.needs_input_grad[6] else None
    return *grads, None, None, None, d_sinks


_attend_lse_op.register_autograd(_attend_backward, setup_context=_attend_setup)
